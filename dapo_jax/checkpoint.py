"""Orbax checkpoints holding everything a run needs to continue bitwise: the train state (parameters,
optimizer state, counters) and a JSON record (data position, dynamic-sampling carry-over, config).

Saves are asynchronous and keep the last K. Restoring walks back from the newest checkpoint: one that fails
to read (truncated, corrupted, half-written, or of another model) is reported with a warning, moved aside to
`<step>.unreadable` in the same folder (kept, for inspection) and the previous one is used. Moving it matters:
orbax writes no step at or below the newest one on disk, so a run resumed from step 10 past an unreadable
step 20 would otherwise silently save nothing until step 30.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import io
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dapo_jax import paths


def _encode(x):
  """JSON-able form of the carry-over (lists of dicts of numpy arrays), exact: numeric arrays as base64 of
  their .npy bytes (a quarter of the size of a list of float32 as text, and faster to read), object arrays
  (texts) as lists."""
  if isinstance(x, dict):
    return {k: _encode(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_encode(v) for v in x]
  if isinstance(x, np.ndarray):
    if x.dtype == object:
      return {"__ndarray__": x.tolist(), "dtype": str(x.dtype), "shape": list(x.shape)}
    buffer = io.BytesIO()
    np.save(buffer, x, allow_pickle=False)
    return {"__npy__": base64.b64encode(buffer.getvalue()).decode("ascii")}
  if isinstance(x, np.generic):
    return x.item()
  return x


def _decode(x):
  if isinstance(x, dict):
    if "__npy__" in x:
      return np.load(io.BytesIO(base64.b64decode(x["__npy__"])), allow_pickle=False)
    if "__ndarray__" in x:  # also every array of a checkpoint written before the .npy form
      return np.asarray(x["__ndarray__"], dtype=x["dtype"]).reshape(x["shape"])
    return {k: _decode(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_decode(v) for v in x]
  return x


class _ClosedLoopTolerant(asyncio.SelectorEventLoop):
  """An event loop that drops callbacks handed to it after it closed (they could never run). When a read of
  a damaged checkpoint or a write to a full disk fails, orbax closes its loop while tensorstore still
  completes the other reads and writes; each completion then posts to the closed loop, and tensorstore prints
  the RuntimeError("Event loop is closed") of every one (hundreds of tracebacks, burying the real error)."""

  def call_soon_threadsafe(self, callback, *args, context=None):
    if self.is_closed():
      return None
    return super().call_soon_threadsafe(callback, *args, context=context)


class _Policy(asyncio.DefaultEventLoopPolicy):
  _loop_factory = _ClosedLoopTolerant


def _tolerate_closed_loops() -> None:
  if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
    asyncio.set_event_loop_policy(_Policy())


class _FailedSaveLeftovers(logging.Filter):
  def filter(self, record):
    return "exception was never retrieved" not in record.getMessage()


def _quiet_failed_save_leftovers() -> None:
  """After a save failed (and was reported once, as a CheckpointWriteError): its hundreds of unfinished
  tensorstore writes are collected later, mostly at exit, each printing a traceback of the same cause
  ("Task exception was never retrieved", "Exception ignored in <coroutine ...>", and on a loaded machine
  "coroutine ... was never awaited" at exit). Those are dropped; every other unraisable error still prints."""
  logging.getLogger("asyncio").addFilter(_FailedSaveLeftovers())
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
  previous = sys.unraisablehook

  def hook(unraisable):
    obj = getattr(unraisable, "object", None)
    if getattr(getattr(obj, "cr_code", None), "co_filename", "").find("orbax") >= 0 or \
        isinstance(unraisable.exc_value, ImportError) and "shutting down" in str(unraisable.exc_value):
      return
    previous(unraisable)
  sys.unraisablehook = hook
  gc.collect()


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, a lost mount): the run stops, its last good one kept."""


class Checkpointer:

  def __init__(self, directory: str | Path, *, max_to_keep: int = 3, asynchronous: bool = True):
    _tolerate_closed_loops()
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, record: dict, *, wait: bool = False):
    """Saves `step`; one already saved is left as it is. Raises if orbax refuses a new step."""
    if step in self.manager.all_steps():
      return
    with self._writing(step):
      saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                              record=ocp.args.JsonSave(_encode(record))))
    if not saved:
      raise RuntimeError(f"checkpoint step {step} was not written to {self.directory}: orbax refused it (steps "
                         f"on disk: {self.steps()}); move the newer steps out of the folder to go on")
    if wait:
      self.wait()

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    """Orbax's failure to write (raised at the save, or at a later wait for an asynchronous one) as one
    error whose first line is the cause."""
    failure = None
    try:
      yield
    except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise several types
      cause = str(e).splitlines()[0][:500] if str(e) else type(e).__name__
      what = (f"checkpoint step {step} (or an earlier one, still being written)" if step is not None else
              "a checkpoint being written asynchronously")
      hint = " (the disk is full: free space, or point --workdir elsewhere)" if "RESOURCE_EXHAUSTED" in cause or \
          "No space left" in cause else ""
      failure = f"{what} could not be written to {self.directory}{hint}: {type(e).__name__}: {cause}"
    if failure is not None:
      _quiet_failed_save_leftovers()
      raise CheckpointWriteError(failure)

  def restore_latest(self, abstract_state: Any, *, up_to: int | None = None) -> tuple[int, Any, dict] | None:
    """(step, state, record) of the newest readable checkpoint (at most step `up_to`), or None."""
    self.manager.wait_until_finished()
    for step in reversed([s for s in self.steps() if up_to is None or s <= up_to]):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
        state = restored["state"]
        jax.block_until_ready(state)
        return step, state, _decode(restored["record"])
      except Exception as e:  # noqa: BLE001 -- any read failure means this checkpoint is unusable
        aside = self._move_aside(step)
        logging.warning("checkpoint %s/%d is unreadable (%s: %s); moved to %s, trying the previous one",
                        self.directory, step, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "",
                        aside.name)
    return None

  def _move_aside(self, step: int) -> Path:
    """Renames an unreadable step's folder out of orbax's sight (one process renames, all wait)."""
    aside = self.directory / f"{step}.unreadable"
    if aside.exists():
      aside = self.directory / f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint: step {step} moved aside")
    self.manager.reload()
    return aside

  def wait(self):
    with self._writing(None):
      self.manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def save_tree(path: str | Path, tree: Any, *, writer: str = "") -> bool:
  """Writes a pytree of (sharded) arrays to `path`, atomically (a temporary name, then renamed). Returns False,
  leaving `path` as it was, when `path` already exists (another run wrote it first).

  Runs that may write the same `path` at once (a cache) name themselves with `writer`, the same in every process
  of a run and different between runs: each writes a folder of its own beside `path` and renames it into place,
  where orbax's own temporary name, `path`'s alone, would mix their files."""
  path = Path(path).absolute()
  if not writer:
    try:
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
    except ValueError:  # orbax: "Destination ... already exists"
      if not path.is_dir():
        raise
      return False
    return True
  # No early return when `path` exists: every process of the run must join orbax's save, whatever it sees.
  own = path.with_name(f".{path.name}.{writer}")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(own, tree, force=True)  # force: what this writer left when it was killed mid-save
  return jax.process_index() != 0 or paths.rename_into_place(own, path)


def restore_tree(path: str | Path, like: Any) -> Any:
  """Reads what `save_tree` wrote, with the shapes, dtypes and shardings of `like`'s arrays."""
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(Path(path).absolute(), target)
