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


def start(config) -> None:
  """Splits the host CPU into devices as the config asks and joins the other processes, if any. Call after
  flag parsing and before anything touches a JAX backend."""
  from dapo_jax import distributed  # after flag parsing: importing jax reads XLA_FLAGS
  F = flags.FLAGS
  distributed.set_cpu_devices(config.get("hardware", {}).get("cpu_devices", 0))
  distributed.initialize(F.coordinator_address, F.num_processes, F.process_id, mode=F.distributed)
