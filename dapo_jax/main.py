"""Entry point: `python -m dapo_jax.main [--config=configs/<name>.py] --workdir=DIR [--config.x=y ...]`."""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Path to a configs/<name>.py file.", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Where metrics, checkpoints and plots go; a run resumes from it.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from dapo_jax import train  # after flag parsing: importing jax reads XLA_FLAGS
  logging.info("config:\n%s", FLAGS.config)
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print({k: round(v, 4) for k, v in result.items()})


if __name__ == "__main__":
  app.run(main)
