"""A resumable prompt iterator: epoch-wise shuffles fixed by the seed, position saved in checkpoints."""

from __future__ import annotations

import numpy as np


class PromptIterator:
  """Yields batches of rows in a seeded order; `state()` / `restore()` continue exactly where it stopped.

  Each process takes every `num_processes`-th row of the shuffled order, so hosts see disjoint data.
  """

  def __init__(self, rows: list, seed: int, *, process_index: int = 0, num_processes: int = 1):
    if not rows:
      raise ValueError("PromptIterator: no rows")
    self.rows, self.seed = rows, seed
    self.process_index, self.num_processes = process_index, num_processes
    self.epoch, self.index = 0, 0
    self._order = self._make_order()

  def _make_order(self):
    order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))
    return order[self.process_index::self.num_processes]

  def next_batch(self, n: int) -> list:
    out = []
    while len(out) < n:
      if self.index >= len(self._order):
        self.epoch += 1
        self.index = 0
        self._order = self._make_order()
      take = min(n - len(out), len(self._order) - self.index)
      out.extend(self.rows[i] for i in self._order[self.index:self.index + take])
      self.index += take
    return out

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict):
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._order = self._make_order()
