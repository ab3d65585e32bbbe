"""Dynamic sampling: keep only prompt groups whose answers disagree, and sample until the batch is full.

The filter looks at correctness (`acc`), not the shaped reward: an all-wrong group whose overlong penalties
differ is still dropped, as in the reference. Groups are kept whole and in order.

Where the reference is weak we give choices: when `max_num_gen_batches` generation batches have not filled
the batch, `on_exhausted="raise"` stops (the reference) or `"train_on_kept"` trains on what was kept, with a
warning (and stops too when nothing was kept: no group had an advantage to learn from); `carry_over=True`
keeps surplus groups for the next step instead of discarding them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

ON_EXHAUSTED = ("raise", "train_on_kept")
METRICS = ("acc", "score", "seq_reward")


class DynamicSamplingExhausted(RuntimeError):
  pass


def keep_groups(metric_B, group_size: int) -> np.ndarray:
  """keep_G: groups whose metric is not all equal (population std > 0), and every group of one."""
  m_GxN = np.asarray(metric_B, np.float64).reshape(-1, group_size)
  if group_size == 1:
    return np.ones(m_GxN.shape[0], bool)
  return m_GxN.std(axis=1) > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicSampling:
  """train_batch_size counts prompt groups. enable=False keeps every group (and one generation batch)."""
  train_batch_size: int
  enable: bool = True
  metric: str = "acc"
  max_num_gen_batches: int = 10  # 0: no limit
  on_exhausted: str = "raise"
  carry_over: bool = False

  def __post_init__(self):
    if self.train_batch_size <= 0:
      raise ValueError(f"dynamic_sampling.train_batch_size must be positive, got {self.train_batch_size}")
    if self.metric not in METRICS:
      raise ValueError(f"dynamic_sampling.metric must be one of {METRICS}, got {self.metric!r}")
    if self.on_exhausted not in ON_EXHAUSTED:
      raise ValueError(f"dynamic_sampling.on_exhausted must be one of {ON_EXHAUSTED}, got {self.on_exhausted!r}")
    if self.max_num_gen_batches < 0:
      raise ValueError(f"dynamic_sampling.max_num_gen_batches must be >= 0, got {self.max_num_gen_batches}")


def _slice_rows(batch: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
  return {k: np.asarray(v)[rows] for k, v in batch.items()}


def concat_rows(batches: list[dict[str, Any]], left_padded: tuple[str, ...] = ()) -> dict[str, Any]:
  """Concatenates row batches whose 2-D arrays may differ in width: keys in `left_padded` are padded on the
  left (prompts), others on the right (responses), with zeros."""
  out = {}
  for key in batches[0]:
    arrays = [np.asarray(b[key]) for b in batches]
    if arrays[0].ndim >= 2:
      width = max(a.shape[1] for a in arrays)
      pad = [(0, 0)] * arrays[0].ndim
      padded = []
      for a in arrays:
        p = list(pad)
        p[1] = (width - a.shape[1], 0) if key in left_padded else (0, width - a.shape[1])
        padded.append(np.pad(a, p))
      arrays = padded
    out[key] = np.concatenate(arrays, axis=0)
  return out


class GroupAccumulator:
  """Collects kept groups across generation batches for one training step.

      acc = GroupAccumulator(strategy, group_size)
      while not acc.ready:
        acc.add(rollout_batch, metric_B)   # raises DynamicSamplingExhausted per the strategy
      batch, metrics = acc.take()
  """

  def __init__(self, strategy: DynamicSampling, group_size: int, left_padded: tuple[str, ...] = ()):
    self.s, self.g, self.left_padded = strategy, group_size, left_padded
    self.carry: list[dict[str, Any]] = []
    self._reset()

  def _reset(self):
    self.parts = list(self.carry) if self.s.carry_over else []
    self.carried_in = sum(len(next(iter(p.values()))) for p in self.parts) // self.g
    self.carry = []
    self.num_gen_batches = 0
    self.sampled_groups = 0
    self.kept_groups = self.carried_in
    self.exhausted = False

  @property
  def ready(self) -> bool:
    return self.kept_groups >= self.s.train_batch_size or self.exhausted

  def add(self, batch: dict[str, Any], metric_B) -> int:
    """Adds one generation batch (rows prompt-major, G per group); returns how many groups it kept."""
    n_rows = len(np.asarray(metric_B))
    if n_rows % self.g:
      raise ValueError(f"dynamic sampling: {n_rows} rows are not whole groups of {self.g}")
    self.num_gen_batches += 1
    self.sampled_groups += n_rows // self.g
    keep_G = keep_groups(metric_B, self.g) if self.s.enable else np.ones(n_rows // self.g, bool)
    rows = np.flatnonzero(np.repeat(keep_G, self.g))
    if rows.size:
      self.parts.append(_slice_rows(batch, rows))
    self.kept_groups += int(keep_G.sum())
    limit = self.s.max_num_gen_batches
    if not self.ready and limit and self.num_gen_batches >= limit:
      msg = (f"dynamic sampling kept {self.kept_groups} of {self.s.train_batch_size} groups after "
             f"{self.num_gen_batches} generation batches (max_num_gen_batches={limit})")
      advice = ": the data may be too easy or too hard for this policy; raise max_num_gen_batches (0 = no limit)"
      if self.s.on_exhausted == "raise":
        raise DynamicSamplingExhausted(msg + advice + " or set on_exhausted='train_on_kept'")
      if self.kept_groups == 0:
        # Every answer in every group right, or every one wrong: no group has an advantage to train on.
        raise DynamicSamplingExhausted(msg + ", so even on_exhausted='train_on_kept' has nothing to train on" + advice)
      logging.warning("%s; training on the kept groups", msg)
      self.exhausted = True
    return int(keep_G.sum())

  def take(self) -> tuple[dict[str, Any], dict[str, float]]:
    if not self.ready:
      raise RuntimeError("GroupAccumulator.take() before the batch is full")
    batch = concat_rows(self.parts, self.left_padded)
    n_train = min(self.kept_groups, self.s.train_batch_size) * self.g
    surplus = {k: v[n_train:] for k, v in batch.items()}
    batch = {k: v[:n_train] for k, v in batch.items()}
    surplus_groups = self.kept_groups - n_train // self.g
    if self.s.carry_over and surplus_groups:
      self.carry = [surplus]
    metrics = {
        "train/num_gen_batches": float(self.num_gen_batches),
        # nan for a step that sampled nothing (all its groups carried in): no fraction was observed.
        "train/kept_group_fraction": ((self.kept_groups - self.carried_in) / self.sampled_groups
                                      if self.sampled_groups else float("nan")),
        "train/rollouts_per_trained_sample": self.sampled_groups * self.g / max(n_train, 1),
        "train/num_trained_groups": float(n_train // self.g),
        "train/carried_in_groups": float(self.carried_in),
        "train/surplus_groups": float(surplus_groups),
        "train/surplus_discarded_groups": float(0 if self.s.carry_over else surplus_groups),
    }
    self._reset()
    return batch, metrics

  @property
  def carried(self) -> dict[str, Any] | None:
    """The rows carried into the step being collected (set by `take`), or None."""
    return self.parts[0] if self.carried_in else None

  def set_carry_fields(self, fields: dict[str, np.ndarray]):
    """Replaces per-row fields of the carried rows, between `take` and the next `add`: for one, their
    log-probs under the weights that sampled them, which the next step's update no longer has."""
    if not self.carried_in or self.num_gen_batches:
      raise RuntimeError("set_carry_fields: only between take() and add(), with groups carried over")
    part = self.parts[0]
    n = len(next(iter(part.values())))
    for key, value in fields.items():
      if key not in part or len(value) != n:
        raise ValueError(f"set_carry_fields: {key!r} must be an existing field of {n} rows")
    self.parts[0] = dict(part, **fields)

  def state(self) -> dict[str, Any]:
    """What a checkpoint taken between steps needs to continue: the groups carried into the next step."""
    return {"carry": list(self.parts)}

  def restore(self, state: dict[str, Any]):
    self.carry = list(state.get("carry", []))
    self._reset()
