"""Flags and start-up shared by the entry points (training, evaluation): multi-host and CPU device set-up."""

from absl import flags


def define_distributed_flags() -> None:
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "Start jax.distributed: auto (explicit flags or a detected SLURM / TPU pod / MPI launcher), on, "
                    "off.")
  flags.DEFINE_string("coordinator_address", "",
                      "host:port of process 0's coordinator (multi-host without a launcher).")
  flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host without a launcher).")
  flags.DEFINE_integer("process_id", -1, "This process's index in [0, num_processes).")


def quiet_unless_verbose() -> None:
  """INFO lines (absl's, dataset preparation's, orbax's, jax's) only with --verbosity=1 or more; warnings
  always. Call after flag parsing."""
  from absl import logging
  if flags.FLAGS.verbosity < 1:
    logging.set_verbosity(logging.WARNING)


def start(config) -> None:
  """Splits the host CPU into devices as the config asks and joins the other processes, if any. Call after
  flag parsing and before anything touches a JAX backend."""
  from dapo_jax import distributed  # after flag parsing: importing jax reads XLA_FLAGS
  F = flags.FLAGS
  distributed.set_cpu_devices(config.get("hardware", {}).get("cpu_devices", 0))
  distributed.initialize(F.coordinator_address, F.num_processes, F.process_id, mode=F.distributed)


def define_checkpoint_flags() -> None:
  """--config and --checkpoint of the programs that read a trained policy (evaluation, export)."""
  from ml_collections import config_flags
  from dapo_jax import paths
  paths.make_configs_importable()
  config_flags.DEFINE_config_file("config", paths.DEFAULT_CONFIG, "The run's config file (default: a training "
                                  "workdir's own run_config.json, else configs/default.py).", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A Hugging Face checkpoint dir or a training workdir.", required=True)


def checkpoint_config():
  """(config, the run_config.json it came from or None): a training workdir given as --checkpoint without
  --config is read with its config as it ran (model overrides and all), not configs/default.py."""
  import json
  from pathlib import Path
  import ml_collections
  from ml_collections import config_flags
  F = flags.FLAGS
  run_config = Path(F.checkpoint).expanduser() / "run_config.json"
  if run_config.is_file() and not F["config"].present:
    config = ml_collections.ConfigDict(json.loads(run_config.read_text()))
    for field, value in config_flags.get_override_values(F["config"]).items():
      apply_override(config, field, value, run_config)
    return config, run_config
  return F.config, None


def apply_override(config, field: str, value, source) -> None:
  """`--config.<field>=value` onto a config read from `source`; a field it lacks is refused, not dropped."""
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    if part not in node or not hasattr(node[part], "items"):
      raise SystemExit(f"--config.{field}: {source} has no field {field!r}; its sections: {sorted(config)}")
    node = node[part]
  if leaf not in node:
    where = ".".join(parents) or "the top level"
    raise SystemExit(f"--config.{field}: {source} has no field {field!r} (in {where}: {sorted(node)})")
  node[leaf] = value


def start_checkpoint_program():
  """Start-up of a program that reads a trained policy: (config, mesh, log), after `start`; `log` prints on
  process 0 only."""
  config, run_config = checkpoint_config()
  quiet_unless_verbose()
  start(config)
  from dapo_jax import config_lib, distributed, sharding
  log = print if distributed.is_main() else (lambda *_: None)
  if run_config:
    log(f"config: {run_config}")
  return config, sharding.make_mesh(config_lib.mesh_axes(config)), log
