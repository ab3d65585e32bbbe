"""Entry point: `python -m dapo_jax.main [--config=configs/<name>.py] --workdir=DIR [--config.x=y ...]`.

Multi-host: started by a cluster launcher (SLURM srun, a Cloud TPU pod's `--worker=all`, Open MPI) every
process finds the others by itself; elsewhere pass --coordinator_address, --num_processes and --process_id
(see launch/). Every process runs this same program; process 0 writes the logs, metrics and plots.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from dapo_jax import cli, paths

paths.make_configs_importable()
config_flags.DEFINE_config_file("config", paths.DEFAULT_CONFIG, "Path to a configs/<name>.py file.", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Where metrics, checkpoints and plots go; a run resumes from it.")
cli.define_distributed_flags()
FLAGS = flags.FLAGS


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every save and restore step at INFO; keep its warnings, and its INFO with --verbosity=1."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or logging.get_verbosity() >= 1 or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  cli.start(FLAGS.config)
  from dapo_jax import distributed, train
  if distributed.is_main():
    logging.info("config:\n%s", FLAGS.config)
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if distributed.is_main():
    print({k: round(v, 4) for k, v in result.items()})


if __name__ == "__main__":
  app.run(main)
