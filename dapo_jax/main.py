"""Entry point: `python -m dapo_jax.main [--config=configs/<name>.py] --workdir=DIR [--config.x=y ...]`.

Multi-host: started by a cluster launcher (SLURM srun, a Cloud TPU pod's `--worker=all`, Open MPI) every
process finds the others by itself; elsewhere pass --coordinator_address, --num_processes and --process_id
(see launch/). Every process runs this same program; process 0 writes the logs, metrics and plots. The console
shows the config, the memory estimate and a progress line; `--verbosity=1` adds the libraries' INFO lines.
"""

from absl import app, flags
from ml_collections import config_flags

from dapo_jax import cli, paths

paths.make_configs_importable()
config_flags.DEFINE_config_file("config", paths.DEFAULT_CONFIG, "Path to a configs/<name>.py file.", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Where metrics, checkpoints and plots go; a run resumes from it.")
cli.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_unless_verbose()
  cli.start(FLAGS.config)
  from dapo_jax import distributed, train
  if distributed.is_main():
    print(f"config:\n{FLAGS.config}")
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if distributed.is_main():
    print({k: round(v, 4) for k, v in result.items()})


if __name__ == "__main__":
  app.run(main)
