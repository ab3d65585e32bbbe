"""Entry point: `python -m dapo_jax.main [--config=configs/<name>.py] --workdir=DIR [--config.x=y ...]`.

Multi-host: started by a cluster launcher (SLURM srun, a Cloud TPU pod's `--worker=all`, Open MPI) every
process finds the others by itself; elsewhere pass --coordinator_address, --num_processes and --process_id
(see launch/). Every process runs this same program; process 0 writes the logs, metrics and plots.
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Path to a configs/<name>.py file.", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Where metrics, checkpoints and plots go; a run resumes from it.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Start jax.distributed: auto (explicit flags or a detected SLURM / TPU pod / MPI launcher), on, off.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0's coordinator (multi-host without a launcher).")
flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host without a launcher).")
flags.DEFINE_integer("process_id", -1, "This process's index in [0, num_processes).")
FLAGS = flags.FLAGS


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every save and restore step at INFO; keep its warnings, and its INFO with --verbosity=1."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or logging.get_verbosity() >= 1 or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  from dapo_jax import distributed  # after flag parsing: importing jax reads XLA_FLAGS
  distributed.set_cpu_devices(FLAGS.config.get("hardware", {}).get("cpu_devices", 0))
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, mode=FLAGS.distributed)
  from dapo_jax import train
  if distributed.is_main():
    logging.info("config:\n%s", FLAGS.config)
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if distributed.is_main():
    print({k: round(v, 4) for k, v in result.items()})


if __name__ == "__main__":
  app.run(main)
