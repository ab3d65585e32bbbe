"""Scoring many responses in parallel worker processes, each item under a time limit.

A pathological response (a regex that backtracks for minutes, a huge LaTeX expression) cannot stall
training: a worker raises at the item's deadline (SIGALRM), and if a worker is stuck in C code that ignores
signals, the parent's watchdog kills the pool and scores the stuck item as a failure. Timed-out items get
score -1.0, acc False, pred "[TIMEOUT]" and are counted.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from typing import Any, Sequence

from dapo_jax.rewards import registry

TIMEOUT_PRED = "[TIMEOUT]"


class _ItemTimeout(Exception):
  pass


def _alarm(signum, frame):
  raise _ItemTimeout()


def _ignore_interrupts():
  # Ctrl-C reaches the whole process group. The parent turns it into "checkpoint and stop" after the step;
  # a worker it killed would lose its in-flight items, scored as timeouts by the watchdog.
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _score_chunk(name: str, items: list[tuple[str, Any, dict]], timeout_s: float) -> list[dict]:
  fn = registry.get(name)
  signal.signal(signal.SIGALRM, _alarm)
  out = []
  for solution, truth, extra in items:
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
      out.append(_validated(fn(solution, truth, **extra), name))
    except _ItemTimeout:
      out.append(timeout_result())
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
  return out


def _validated(result: Any, name: str) -> dict:
  if not isinstance(result, dict) or "score" not in result or "acc" not in result:
    raise TypeError(f"reward {name!r} must return a dict with 'score' and 'acc', got {result!r}")
  result = dict(result)
  result["score"] = float(result["score"])
  result["acc"] = bool(result["acc"])
  return result


def timeout_result() -> dict:
  return {"score": -1.0, "acc": False, "pred": TIMEOUT_PRED, "timeout": True}


class RewardExecutor:
  """`RewardExecutor("math_dapo", workers=2, timeout_s=5.0).score(solutions, ground_truths)`.

  workers=0 scores in this process (still under the per-item time limit when on the main thread).
  Worker processes start with "forkserver": forking a process that runs JAX's threads is unsafe.
  """

  def __init__(self, name: str, *, workers: int = 2, timeout_s: float = 5.0, chunk_size: int = 16,
               watchdog_slack_s: float = 30.0):
    registry.get(name)  # fail now, in the parent, on an unknown name
    if timeout_s <= 0:
      raise ValueError(f"RewardExecutor.timeout_s must be positive, got {timeout_s}")
    self.name, self.workers, self.timeout_s, self.chunk_size = name, workers, timeout_s, chunk_size
    self.watchdog_slack_s = watchdog_slack_s
    self._pool = None
    self.timeouts = 0

  def _get_pool(self):
    if self._pool is None:
      self._pool = mp.get_context("forkserver").Pool(self.workers, initializer=_ignore_interrupts)
    return self._pool

  def close(self):
    if self._pool is not None:
      self._pool.terminate()
      self._pool.join()
      self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def score(self, solutions: Sequence[str], ground_truths: Sequence[Any],
            extras: Sequence[dict] | None = None) -> list[dict]:
    if len(solutions) != len(ground_truths):
      raise ValueError(f"score: {len(solutions)} solutions but {len(ground_truths)} ground truths")
    items = list(zip(solutions, ground_truths, extras or [{}] * len(solutions)))
    if self.workers == 0:
      results = _score_chunk(self.name, items, self.timeout_s)
    else:
      results = self._score_parallel(items)
    self.timeouts += sum(1 for r in results if r.get("timeout"))
    return results

  def _score_parallel(self, items):
    results: list[dict | None] = [None] * len(items)
    chunks = [list(range(i, min(i + self.chunk_size, len(items)))) for i in range(0, len(items), self.chunk_size)]
    while chunks:
      pool = self._get_pool()
      handles = [(c, pool.apply_async(_score_chunk, (self.name, [items[j] for j in c], self.timeout_s)))
                 for c in chunks]
      # Each item has its own alarm in the worker; the watchdog allows all of them plus start-up slack.
      deadline = time.monotonic() + self.timeout_s * (self.chunk_size + 1) * -(-len(chunks) // self.workers)
      deadline += self.watchdog_slack_s
      retry = []
      for c, handle in handles:
        try:
          for j, r in zip(c, handle.get(timeout=max(0.0, deadline - time.monotonic()))):
            results[j] = r
        except mp.TimeoutError:
          if len(c) == 1:
            results[c[0]] = timeout_result()
          else:  # score the stuck chunk item by item, so only the culprit fails
            retry.extend([j] for j in c)
      if retry:
        self.close()  # a worker ignored its alarm (stuck in C code): kill the pool
      chunks = retry
    return results
