"""A resumable prompt iterator: epoch-wise shuffles fixed by the seed, position saved in checkpoints."""

from __future__ import annotations

import numpy as np

from dapo_jax.distributed import share


class PromptIterator:
  """Yields batches of rows in a seeded order; `state()` / `restore()` continue exactly where it stopped.

  Batches are global: `next_batch(n)` advances every process by the same n rows of one shuffled order and
  returns this process's contiguous block of them, so the processes' blocks, in process order, are the batch
  a single process would read. The state is the same on every process, and a checkpoint written by one
  process count resumes under another.
  """

  def __init__(self, rows: list, seed: int, *, process_index: int = 0, num_processes: int = 1):
    if not rows:
      raise ValueError("PromptIterator: no rows")
    if not 0 <= process_index < num_processes:
      raise ValueError(f"PromptIterator: process_index {process_index} not in [0, {num_processes})")
    self.rows, self.seed = rows, seed
    self.process_index, self.num_processes = process_index, num_processes
    self.epoch, self.index = 0, 0
    self._order = self._make_order()

  def _make_order(self):
    return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))

  def next_batch(self, n: int) -> list:
    """This process's block of the next global batch of `n` rows."""
    batch = []
    while len(batch) < n:
      if self.index >= len(self._order):
        self.epoch += 1
        self.index = 0
        self._order = self._make_order()
      take = min(n - len(batch), len(self._order) - self.index)
      batch.extend(self._order[self.index:self.index + take])
      self.index += take
    return [self.rows[i] for i in batch[share(n, self.process_index, self.num_processes)]]

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict):
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._order = self._make_order()
