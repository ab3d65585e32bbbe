"""Scoring many responses in worker processes, each item under a time limit that holds whatever the reward
function does.

Each worker scores one item at a time. At the item's limit (`timeout_s`) an alarm raises `ItemTimeout`, a
`BaseException`, so a reward's own `except Exception` (math-verify has several) cannot swallow it. A worker
still busy `kill_after_s` later is stuck where signals do not reach (C code, a huge integer power): the parent
kills it, which also frees whatever memory it was growing, and starts a replacement; the other workers go on
with the other items meanwhile. Timed-out items score -1.0, acc False, pred "[TIMEOUT]" and are counted.

A worker imports and calls its reward once on a trivial item before it takes work, so a lazy first import
(math-verify's sympy, seconds) never runs under an item's alarm.
"""

from __future__ import annotations

import collections
import math
import multiprocessing as mp
import multiprocessing.connection
import signal
import threading
import time
import traceback
import warnings
from typing import Any, Sequence

from dapo_jax.rewards import registry

TIMEOUT_PRED = "[TIMEOUT]"
_WARMUP = ("Answer: 1", "1")


class ItemTimeout(BaseException):
  """Raised by the alarm at an item's limit. A BaseException: reward code catching Exception lets it through."""


def _alarm(signum, frame):
  raise ItemTimeout()


def timeout_result() -> dict:
  return {"score": -1.0, "acc": False, "pred": TIMEOUT_PRED, "timeout": True}


def _validated(result: Any, name: str) -> dict:
  if not isinstance(result, dict) or "score" not in result or "acc" not in result:
    raise TypeError(f"reward {name!r} must return a dict with 'score' and 'acc', got {result!r}")
  result = dict(result)
  result["score"] = float(result["score"])
  if not math.isfinite(result["score"]):
    raise ValueError(f"reward {name!r} returned a non-finite score {result['score']} (it would make every "
                     f"advantage of its group NaN)")
  result["acc"] = bool(result["acc"])
  return result


def _score_one(fn, name: str, item: tuple[str, Any, dict], timeout_s: float) -> dict:
  """One item under the alarm (the caller installed `_alarm`). A reward that raises is an error, not a score."""
  solution, truth, extra = item
  signal.setitimer(signal.ITIMER_REAL, timeout_s)
  try:
    return _validated(fn(solution, truth, **extra), name)
  except ItemTimeout:
    return timeout_result()
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)


_WARMED: set[str] = set()


def _warmed_up(name: str):
  """The reward, called once in this process on a trivial item with no alarm: an alarm that fires inside a
  first import leaves the module half-imported for the whole process (sympy: every later import fails)."""
  fn = registry.get(name)
  if name not in _WARMED:
    try:
      fn(*_WARMUP)
    except Exception:  # a reward that dislikes the warm-up item still has its imports done
      pass
    _WARMED.add(name)
  return fn


def _worker_main(conn, name: str, timeout_s: float):
  # Ctrl-C reaches the whole process group; the parent turns it into "checkpoint and stop" after the step.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  fn = _warmed_up(name)
  signal.signal(signal.SIGALRM, _alarm)
  conn.send("ready")
  while True:
    try:
      message = conn.recv()
    except (EOFError, OSError):
      return
    if message is None:
      return
    seq, item = message
    try:
      conn.send((seq, _score_one(fn, name, item, timeout_s), None))
    except ItemTimeout:  # the alarm fired between scoring and sending
      conn.send((seq, timeout_result(), None))
    except Exception:
      conn.send((seq, None, traceback.format_exc()))


class _Worker:
  def __init__(self, ctx, name: str, timeout_s: float):
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=_worker_main, args=(child, name, timeout_s), daemon=True)
    self.process.start()
    child.close()
    self.ready = False
    self.item: int | None = None  # the item in flight
    self.deadline = 0.0

  def kill(self):
    if self.process.is_alive():
      self.process.kill()
    self.process.join()
    self.conn.close()

  def stop(self):
    try:
      self.conn.send(None)
    except (BrokenPipeError, OSError):
      pass
    self.process.join(timeout=1.0)
    self.kill()


class RewardExecutor:
  """`RewardExecutor("math_dapo", workers=2, timeout_s=5.0).score(solutions, ground_truths)`.

  `workers=0` scores in this process, under the same alarm (on the main thread; a call stuck in C code cannot
  be interrupted there). Workers start with "forkserver" (forking a process that runs JAX's threads is
  unsafe) on first use and live until `close()`. `timeouts` counts timed-out items, `killed` the workers
  killed and replaced.
  """

  def __init__(self, name: str, *, workers: int = 2, timeout_s: float = 5.0, kill_after_s: float = 5.0,
               start_timeout_s: float = 300.0):
    registry.get(name)  # fail now, in the parent, on an unknown name
    if not isinstance(workers, int) or workers < 0:
      raise ValueError(f"RewardExecutor.workers must be an integer >= 0 (0: in this process), got {workers!r}")
    if not timeout_s > 0:
      raise ValueError(f"RewardExecutor.timeout_s must be positive, got {timeout_s}")
    if not kill_after_s > 0:
      raise ValueError(f"RewardExecutor.kill_after_s must be positive, got {kill_after_s}")
    self.name, self.workers, self.timeout_s, self.kill_after_s = name, workers, timeout_s, kill_after_s
    self.start_timeout_s = start_timeout_s
    self._workers: list[_Worker] = []
    self.timeouts = 0
    self.killed = 0

  def close(self):
    for w in self._workers:
      w.stop()
    self._workers = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def score(self, solutions: Sequence[str], ground_truths: Sequence[Any],
            extras: Sequence[dict] | None = None) -> list[dict]:
    if len(solutions) != len(ground_truths):
      raise ValueError(f"score: {len(solutions)} solutions but {len(ground_truths)} ground truths")
    items = list(zip(solutions, ground_truths, extras or [{}] * len(solutions)))
    results = self._score_here(items) if self.workers == 0 else self._score_parallel(items)
    self.timeouts += sum(1 for r in results if r.get("timeout"))
    return results

  def _score_here(self, items) -> list[dict]:
    fn = _warmed_up(self.name) if items else registry.get(self.name)
    if threading.current_thread() is not threading.main_thread():
      warnings.warn("RewardExecutor(workers=0) off the main thread: no time limit (alarms reach the main "
                    "thread only); use workers >= 1", stacklevel=3)
      return [_validated(fn(s, t, **e), self.name) for s, t, e in items]
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
      return [_score_one(fn, self.name, item, self.timeout_s) for item in items]
    finally:
      signal.signal(signal.SIGALRM, previous)

  def _start(self) -> _Worker:
    return _Worker(mp.get_context("forkserver"), self.name, self.timeout_s)

  def _raise_error(self, index: int, trace: str | None):
    self.close()
    raise RuntimeError(f"reward {self.name!r} failed on item {index} of the batch; the worker's traceback:\n"
                       f"{trace}")

  def _score_parallel(self, items) -> list[dict]:
    while len(self._workers) < self.workers:
      self._workers.append(self._start())
    started = time.monotonic()
    results: list[dict | None] = [None] * len(items)
    todo = collections.deque(range(len(items)))
    done = 0
    while done < len(items):
      now = time.monotonic()
      for w in self._workers:
        if w.ready and w.item is None and todo:
          j = todo.popleft()
          w.item, w.deadline = j, now + self.timeout_s + self.kill_after_s
          w.conn.send((j, items[j]))
      busy = [w for w in self._workers if w.item is not None]
      starting = [w for w in self._workers if not w.ready]
      if starting and not busy and now - started > self.start_timeout_s:
        self.close()
        raise RuntimeError(f"reward {self.name!r}: no worker became ready in {self.start_timeout_s:.0f} s")
      next_deadline = min((w.deadline for w in busy), default=now + 1.0)
      ready = mp.connection.wait([w.conn for w in busy + starting], timeout=max(0.0, next_deadline - now))
      for w in list(self._workers):
        if w.conn in ready:
          try:
            message = w.conn.recv()
          except (EOFError, OSError):
            message = "died"
          if message == "ready":
            w.ready, started = True, time.monotonic()
            continue
          if message != "died":
            seq, result, trace = message
            if trace is not None:
              self._raise_error(seq, trace)
            results[seq], w.item = result, None
            done += 1
            continue
        elif w.item is None or time.monotonic() < w.deadline:
          continue
        # Past its deadline (stuck where the alarm does not reach) or dead: kill, replace, fail its item.
        if w.item is None and not w.ready:
          self.close()
          raise RuntimeError(f"reward {self.name!r}: a worker died while starting (exit code "
                             f"{w.process.exitcode})")
        if w.item is not None:
          results[w.item] = timeout_result()
          done += 1
        w.kill()
        self.killed += 1
        self._workers[self._workers.index(w)] = self._start()
    return results
