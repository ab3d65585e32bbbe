"""Off-policy RL: the sampler runs `rollout.max_staleness` (k) steps ahead of the trainer.

The batch of step t is sampled with the weights of step max(0, t - k), where version v is the weights after v
updates. At the start of step t the trainer hands version t to the sampler (`WeightSync`: resharded onto the
rollout mesh, device to device) and trains on batch t while the sampler generates batch t + k on its own
thread, on its own devices when `mesh.rollout_devices` gives it some. The lag is fixed, not "whatever is
ready": the batches, and so the weights, are a function of the config alone, whichever side is faster, and a
checkpoint holds the k batches sampled ahead (`Generated.to_record`), so a killed run resumes bitwise.

The update's clip is centred on the trainer's log-probs under the weights it starts from (the proximal
policy); the gap to the sampler's log-probs (the lag, and any sampler/trainer mismatch) is what the rollout
correction (`rollout_correction.py`) weights or rejects. With k = 0 nothing runs on a thread: the synchronous
run, step for step.

    sampler = Sampler(generate, threaded=k > 0, mesh=rollout_mesh)
    sampler.submit(t + k, weight_sync(state.params), version=t)   # generate(t + k, policy, t) starts
    generated = sampler.result(t)                                   # batch t, waiting for it if need be
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dapo_jax import distributed
from dapo_jax import sharding
from dapo_jax.rollout import ScoredBatch


class Generated(NamedTuple):
  """A training step's batch as the sampler made it: the kept groups, the metrics of sampling and filtering
  them (timings included), and the weight version that sampled the step's new rows (carried rows keep their
  own in `batch.version_B`)."""
  step: int
  version: int
  batch: ScoredBatch
  metrics: dict[str, float]

  def to_record(self) -> dict[str, Any]:
    return {"step": self.step, "version": self.version, "batch": self.batch.to_record(),
            "metrics": json.dumps(self.metrics)}

  @classmethod
  def from_record(cls, record: dict[str, Any]) -> "Generated":
    return cls(int(record["step"]), int(record["version"]), ScoredBatch.from_record(record["batch"]),
               json.loads(str(record["metrics"])))


def version_for(step: int, staleness: int) -> int:
  """The weights that sample step `step`'s batch."""
  return max(0, step - staleness)


class Cancelled(Exception):
  """The sampler was closed while it generated: the run is ending."""


class WeightSync:
  """The trainer's weights as the sampler's policy ((graphdef, params)): put onto the rollout mesh's shardings
  of the same logical axes, device to device (no host copy of the model); on the training devices, the same
  arrays when the sampler runs between updates, else a copy (the update donates its weights). Times itself
  into `timings["timing_s/sync_weights"]`."""

  def __init__(self, graphdef, abstract_params, train_mesh: Mesh, rollout_mesh: Mesh, *, concurrent: bool):
    self.graphdef = graphdef
    self.same_devices = set(train_mesh.devices.flat) == set(rollout_mesh.devices.flat)
    self.shardings = sharding.state_shardings(abstract_params, rollout_mesh)
    self.concurrent = concurrent
    self._copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.shardings)

  def __call__(self, params, timings: dict) -> tuple:
    t0 = time.perf_counter()
    if self.same_devices:
      out = self._copy(params) if self.concurrent else params
    else:
      out = _reshard(params, self.shardings)
    jax.block_until_ready(out)
    timings["timing_s/sync_weights"] = timings.get("timing_s/sync_weights", 0.0) + time.perf_counter() - t0
    return self.graphdef, out


def _reshard(tree, shardings):
  """`tree`'s arrays on `shardings` (other devices). Where every process holds the same blocks on both (the
  meshes are split within every process, `sharding.split_meshes`, with one partition), each process moves its
  own blocks to its own devices; otherwise `jax.device_put`."""
  me = jax.process_index()

  def blocks(s, shape):
    return sorted(_index_key(i) for d, i in s.devices_indices_map(shape).items() if d.process_index == me)

  def move(x, target):
    if x.is_fully_addressable or blocks(x.sharding, x.shape) != blocks(target, x.shape):
      return jax.device_put(x, target)
    shards = {_index_key(s.index): s.data for s in x.addressable_shards}
    local = [(d, _index_key(i)) for d, i in target.devices_indices_map(x.shape).items() if d.process_index == me]
    return jax.make_array_from_single_device_arrays(x.shape, target,
                                                    [jax.device_put(shards[k], d) for d, k in local])
  return jax.tree.map(move, tree, shardings)


def _index_key(index) -> tuple:
  return tuple((s.start, s.stop, s.step) for s in index)


class Sampler:
  """Runs `generate(step, policy, version) -> Generated` for the submitted steps, in order: inline, when
  `result` asks (synchronous), or on a thread of its own, under the rollout mesh, from `submit` on. The thread's
  host exchanges between processes go through their own channel (`distributed.channel`), so they do not
  interleave with the trainer's device collectives. `timing_s/sampler_idle` is the time the thread waited for
  the weights of its next batch; an error in the thread is raised by `result`."""

  def __init__(self, generate: Callable[..., Generated], *, threaded: bool, mesh: Mesh):
    self.generate, self.threaded, self.mesh = generate, threaded, mesh
    self.done: dict[int, Generated] = {}
    self.submitted: list[int] = []
    self._jobs: queue.Queue = queue.Queue()
    self._cond = threading.Condition()
    self._error: BaseException | None = None
    self._closing = False
    self._thread = None
    if threaded:
      self._thread = threading.Thread(target=self._run, name="dapo-sampler", daemon=True)
      self._thread.start()

  @property
  def cancelled(self) -> bool:
    return self._closing

  def preload(self, generated: list[Generated]) -> None:
    """Batches sampled before a checkpoint (`pending` then), for the steps they were made for."""
    for g in generated:
      self.done[g.step] = g
      self.submitted.append(g.step)

  def has(self, step: int) -> bool:
    return step in self.submitted

  def submit(self, step: int, policy, version: int) -> None:
    self.submitted.append(step)
    self._jobs.put((step, policy, version))

  def _run_inline(self, until: int | None = None) -> None:
    """Unthreaded: generates the submitted batches in order, through step `until` (None: all)."""
    with jax.set_mesh(self.mesh):
      while not self._jobs.empty() and (until is None or until not in self.done):
        job = self._jobs.get()
        self.done[job[0]] = self.generate(*job)

  def result(self, step: int, timings: dict) -> Generated:
    """Step `step`'s batch; waits for it (`timing_s/wait_rollout`)."""
    if step not in self.submitted:
      raise RuntimeError(f"sampler: step {step}'s batch was never submitted")
    t0 = time.perf_counter()
    if not self.threaded:
      self._run_inline(until=step)
    with self._cond:
      while step not in self.done and self._error is None:
        self._cond.wait()
      if step not in self.done:
        raise self._error
    timings["timing_s/wait_rollout"] = time.perf_counter() - t0
    self.submitted.remove(step)
    return self.done.pop(step)

  def pending(self) -> list[Generated]:
    """Every submitted batch not yet taken, waiting for those still being sampled (for a checkpoint: after
    this the data iterator and the filter's state are those after the last of them)."""
    if not self.threaded:
      self._run_inline()
    with self._cond:
      while not all(s in self.done for s in self.submitted) and self._error is None:
        self._cond.wait()
      if self._error is not None:
        raise self._error
    return [self.done[s] for s in sorted(self.submitted)]

  def _run(self):
    channel = distributed.channel("sampler") if jax.process_count() > 1 else contextlib.nullcontext()
    with channel, jax.set_mesh(self.mesh):
      while True:
        t0 = time.perf_counter()
        job = self._jobs.get()
        idle = time.perf_counter() - t0
        if job is None:
          return
        try:
          generated = self.generate(*job)
        except BaseException as e:  # noqa: BLE001 -- raised again in the trainer's thread by result()
          with self._cond:
            self._error = e
            self._cond.notify_all()
          return
        generated.metrics["timing_s/sampler_idle"] = idle
        with self._cond:
          self.done[generated.step] = generated
          self._cond.notify_all()

  def close(self) -> None:
    """Stops the thread: a generation under way ends at its next check of `cancelled`."""
    if self._thread is not None and self._thread.is_alive():
      self._closing = True
      self._jobs.put(None)
      self._thread.join()
