"""Multi-host JAX: starting the distributed runtime, and moving small host data between processes.

Every process runs the same program (multi-controller JAX). The large state (parameters, optimizer state,
KV caches, update batches) lives in global `jax.Array`s sharded over all processes' devices. The small host
data of a step (prompt ids, rewards, dynamic-sampling decisions) is made identical on every process: each
process reads its own share of the prompts and scores its own share of the responses, and
`allgather_objects` exchanges the results, so every process takes the same decisions without talking again.

    distributed.initialize()                     # a no-op in a single process
    x = distributed.to_global(x_host, sharding)  # host array (same on every process) -> global jax.Array
    y = distributed.to_host(x)                   # global jax.Array -> the whole numpy array on every process

Exchanges of host data ride on a device collective over every device, which needs every process to issue them
in one order. Threads that run their own device programs beside each other (the sampler and the trainer of an
off-policy run, `off_policy.py`) each exchange through their own `channel`: the coordination service's
key-value store, which no device program waits on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np

# Environment variables by which a launcher says "this is one process of several".
_CLUSTER_SIGNS = {
    "SLURM": lambda env: int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env,
    "Cloud TPU pod": lambda env: "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env,
    "Open MPI": lambda env: int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1,
    "JAX_COORDINATOR_ADDRESS": lambda env: "JAX_COORDINATOR_ADDRESS" in env,
}


def detect_cluster(env: dict | None = None) -> str | None:
  """The launcher that started this process as one of several, or None for a single process."""
  env = dict(os.environ if env is None else env)
  for name, present in _CLUSTER_SIGNS.items():
    if present(env):
      return name
  return None


def set_cpu_devices(n: int) -> int:
  """Splits the host CPU into `n` JAX devices (-1: one per core; 0: leave JAX's default). Returns the count
  set, 0 when left alone (also when XLA_FLAGS already sets --xla_force_host_platform_device_count). Must run before anything touches a JAX backend; GPU and TPU are unaffected.

  One device per core suits small models on a CPU: a data mesh gives each core whole rows, and the sampler
  decodes each core's rows in its own loop, instead of splitting every small op of a step across the cores."""
  if not isinstance(n, int) or n < -1:
    raise ValueError(f"hardware.cpu_devices must be -1 (one per core), 0 (JAX's default) or a positive count, got {n!r}")
  if n == 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 0  # an explicit XLA_FLAGS count (launch/local_multiprocess.sh, the tests) wins
  n = len(os.sched_getaffinity(0)) if n == -1 else n
  jax.config.update("jax_num_cpu_devices", n)
  return n


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               local_device_ids: Sequence[int] | None = None, mode: str = "auto") -> bool:
  """Starts `jax.distributed` when asked to (explicit coordinator) or when a cluster launcher is detected.

  mode: "auto" (explicit flags, else a detected launcher, else single process), "on" (always; JAX
  auto-detects what the flags leave out) or "off". Returns whether the distributed runtime was started.
  Must run before anything touches a JAX backend.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode must be auto, on or off, got {mode!r}")
  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  cluster = detect_cluster()
  if mode == "off" or (mode == "auto" and not explicit and cluster is None):
    return False
  if explicit and not (coordinator_address and num_processes > 0 and process_id >= 0):
    raise ValueError("multi-host flags: give all of --coordinator_address, --num_processes and --process_id "
                     f"(got {coordinator_address!r}, {num_processes}, {process_id}), or none to auto-detect")
  if (os.environ.get("JAX_PLATFORMS", "") or "").split(",")[0] == "cpu":
    # CPU devices of different processes talk through gloo (TCP); without it cross-process collectives fail.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  if local_device_ids is not None:
    kwargs["local_device_ids"] = list(local_device_ids)
  jax.distributed.initialize(**kwargs)
  _orbax_barriers_on_the_coordinator()
  logging.info("jax.distributed: process %d of %d (%s), %d local / %d global devices", jax.process_index(),
               jax.process_count(), cluster or "explicit flags", jax.local_device_count(), jax.device_count())
  return True


def _orbax_barriers_on_the_coordinator() -> None:
  """Orbax's barriers through the coordination service instead of a device collective over every device: an
  asynchronous save's barrier runs on its own thread, and an off-policy run's sampler runs device programs of
  its own; collectives that two processes issue in different orders wait on each other forever."""
  import orbax.checkpoint  # noqa: F401 -- defines the flag
  from absl import flags
  try:
    flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = True
  except KeyError:  # an orbax without the flag: its barriers are collectives
    logging.warning("orbax has no experimental_orbax_use_distributed_barrier flag: its barriers are device collectives")


def is_main() -> bool:
  """Process 0 writes logs, metrics and plots; every process takes part in computation and checkpoints."""
  return jax.process_index() == 0


_local = threading.local()
_KV_TIMEOUT_MS = 3_600_000  # a generation or an update may take this long between two exchanges


@contextlib.contextmanager
def channel(name: str):
  """Within the block, this thread's host exchanges (`allgather_objects`, `barrier`) go through the coordination
  service's key-value store under `name`, apart from other threads' device collectives. Every process must
  enter the same channels and exchange in each the same sequence."""
  previous = getattr(_local, "channel", None)
  _local.channel = [name, 0]
  try:
    yield
  finally:
    _local.channel = previous


def _kv_exchange(payload: bytes | None) -> list[bytes]:
  """Every process's payload through the key-value store (None: a barrier). A process that reaches exchange n
  has read every payload of n - 1, so its payload of n - 2 is deleted then."""
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  name, n = _local.channel
  _local.channel[1] += 1
  me, count = jax.process_index(), jax.process_count()
  key = lambda k, i: f"dapo_jax/{name}/{k}/{i}"  # noqa: E731
  if payload is None:
    client.wait_at_barrier(f"dapo_jax/{name}/{n}", _KV_TIMEOUT_MS)
    return []
  client.key_value_set_bytes(key(n, me), payload)
  out = [client.blocking_key_value_get_bytes(key(n, i), _KV_TIMEOUT_MS) for i in range(count)]
  if n >= 2:
    client.key_value_delete(key(n - 2, me))
  return out


def barrier(name: str) -> None:
  if jax.process_count() > 1 and getattr(_local, "channel", None) is not None:
    _kv_exchange(None)
  elif jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def main_first(fn: Callable[[], Any], what: str) -> Any:
  """`fn()` on process 0, then on the others (process 0 fills caches the others then read), and a failure on
  any process raised on every process: a bare barrier would leave the others waiting for one that died."""
  if jax.process_count() == 1:
    return fn()

  def attempt():
    try:
      return fn(), None
    except Exception as e:  # noqa: BLE001 -- reported to every process, then re-raised here
      return None, e

  def raise_first(reports, error):
    failed = [(i, r) for i, r in enumerate(reports) if r is not None]
    if not failed:
      return
    if error is not None:
      raise error
    i, report = failed[0]
    raise RuntimeError(f"{what} failed on process {i}: {report}")

  result, error = attempt() if is_main() else (None, None)
  report = lambda e: None if e is None else f"{type(e).__name__}: {e}"  # noqa: E731
  raise_first(allgather_objects(report(error))[:1], error)
  if not is_main():
    result, error = attempt()
  raise_first(allgather_objects(report(error)), error)
  return result


def share(n: int, index: int | None = None, count: int | None = None) -> slice:
  """This process's contiguous block of `n` items (the blocks of all processes, in order, are 0..n-1)."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  base, extra = divmod(n, count)
  start = index * base + min(index, extra)
  return slice(start, start + base + (index < extra))


def allgather_objects(obj: Any) -> list:
  """Every process's `obj` (picklable), in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  if getattr(_local, "channel", None) is not None:
    return [pickle.loads(b) for b in _kv_exchange(pickle.dumps(obj))]
  from jax.experimental import multihost_utils
  payload = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int64))).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:payload.size] = payload
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [pickle.loads(gathered[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def gather_list(local: list) -> list:
  """Concatenates every process's list, in process order (the inverse of taking `share` blocks)."""
  return [x for part in allgather_objects(local) for x in part]


def to_global(x, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array that is the same on every process -> a global array; each device takes its slice."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(tree):
  """Global arrays -> numpy on every process (gathering the shards other processes hold)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else x
  return jax.tree.map(get, tree)
