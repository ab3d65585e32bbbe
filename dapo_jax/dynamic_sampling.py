"""Dynamic sampling: keep only prompt groups whose answers disagree, and sample until the batch is full.

The filter looks at correctness (`acc`), not the shaped reward: an all-wrong group whose overlong penalties
differ is still dropped, as in the reference. Groups are kept whole and in order.

Where the reference is weak we give choices: when `max_num_gen_batches` generation batches have not filled
the batch, `on_exhausted="raise"` stops (the reference) or `"train_on_kept"` trains on what was kept, with a
warning, padded to the update's shapes (`pad_rows`), and stops too when nothing was kept: no group had an
advantage to learn from; `carry_over=True` keeps surplus groups for the next step instead of discarding them,
with the behaviour log-probs of the weights that sampled them (`GroupAccumulator.compute_carried_logprobs`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, NamedTuple

import numpy as np

from dapo_jax.rollout import ScoredBatch

ON_EXHAUSTED = ("raise", "train_on_kept")
METRICS = ("acc", "score", "seq_reward")


class DynamicSamplingExhausted(RuntimeError):
  pass


def keep_groups(metric_B, group_size: int) -> np.ndarray:
  """keep_G: groups whose metric is not all equal, and every group of one. (The reference tests std > 0,
  which rounding makes true for some groups of equal fractional values, e.g. three times 0.1: such a group
  has no advantage to learn from, and is dropped here.)"""
  m_GxN = np.asarray(metric_B, np.float64).reshape(-1, group_size)
  if group_size == 1:
    return np.ones(m_GxN.shape[0], bool)
  return (m_GxN != m_GxN[:, :1]).any(axis=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicSampling:
  """train_batch_size and gen_batch_size count prompt groups (gen_batch_size 0: the training batch's).
  enable=False keeps every group, and a generation batch is then the training batch."""
  train_batch_size: int
  gen_batch_size: int = 0
  enable: bool = True
  metric: str = "acc"
  max_num_gen_batches: int = 10  # 0: no limit
  on_exhausted: str = "raise"
  carry_over: bool = False

  def __post_init__(self):
    if not isinstance(self.train_batch_size, int) or self.train_batch_size <= 0:
      raise ValueError(f"rollout.train_batch_size: must be a positive integer, got {self.train_batch_size!r}")
    if not isinstance(self.gen_batch_size, int) or self.gen_batch_size < 0:
      raise ValueError(f"rollout.gen_batch_size: must be a positive integer, got {self.gen_batch_size!r}")
    if self.metric not in METRICS:
      raise ValueError(f"dynamic_sampling.metric: must be one of {METRICS}, got {self.metric!r}")
    if self.on_exhausted not in ON_EXHAUSTED:
      raise ValueError(f"dynamic_sampling.on_exhausted: must be one of {ON_EXHAUSTED}, got {self.on_exhausted!r}")
    if not isinstance(self.max_num_gen_batches, int) or self.max_num_gen_batches < 0:
      raise ValueError(f"dynamic_sampling.max_num_gen_batches: must be an integer >= 0 (0: no limit), got "
                       f"{self.max_num_gen_batches!r}")

  @property
  def gen_batch_prompts(self) -> int:
    """Prompts per generation batch. With the filter off every group is kept, so a generation batch is the
    training batch (as the reference): sampling gen_batch_size prompts would throw the rest away."""
    return (self.gen_batch_size or self.train_batch_size) if self.enable else self.train_batch_size

  def metric_B(self, batch: ScoredBatch) -> np.ndarray:
    """The per-row value whose agreement within a group drops it: acc, score, or score + overlong penalty."""
    return {"acc": batch.acc_B, "score": batch.score_B, "seq_reward": batch.reward_B}[self.metric]


class GroupAccumulator:
  """Collects kept groups across generation batches for one training step.

      acc = GroupAccumulator(strategy, group_size)
      while not acc.ready:
        acc.add(scored_batch)       # raises DynamicSamplingExhausted per the strategy
      batch, metrics = acc.take()   # a ScoredBatch of at most train_batch_size groups
  """

  def __init__(self, strategy: DynamicSampling, group_size: int):
    if group_size <= 0:
      raise ValueError(f"rollout.group_size must be positive, got {group_size}")
    self.s, self.g = strategy, group_size
    self.carry: ScoredBatch | None = None
    self._reset()

  def _reset(self):
    self.parts: list[ScoredBatch] = [self.carry] if self.s.carry_over and self.carry is not None else []
    self.carried_in = self.parts[0].num_rows // self.g if self.parts else 0
    self.carry = None
    self.num_gen_batches = 0
    self.sampled_groups = 0
    self.kept_groups = self.carried_in
    self.exhausted = False

  @property
  def ready(self) -> bool:
    return self.kept_groups >= self.s.train_batch_size or self.exhausted

  def add(self, batch: ScoredBatch, *, streaming: bool = False) -> int:
    """Adds one generation batch (rows prompt-major, G per group); returns how many groups it kept.
    `streaming`: the batch is the groups one engine chunk finished; the limit on generation batches is then
    applied by `end_of_stream`, on the prompt batches the stream pulled."""
    n_rows = batch.num_rows
    if n_rows % self.g:
      raise ValueError(f"dynamic sampling: {n_rows} rows are not whole groups of {self.g}")
    self.num_gen_batches += 1
    self.sampled_groups += n_rows // self.g
    keep_G = keep_groups(self.s.metric_B(batch), self.g) if self.s.enable else np.ones(n_rows // self.g, bool)
    rows = np.flatnonzero(np.repeat(keep_G, self.g))
    if rows.size:
      self.parts.append(batch.rows(rows))
    self.kept_groups += int(keep_G.sum())
    if not streaming:
      self._check_limit()
    return int(keep_G.sum())

  def end_of_stream(self, prompt_batches: int):
    """A stream ended after `prompt_batches` generation batches of prompts (its limit) without filling the
    batch: raises or trains on the kept groups, per the strategy."""
    self.num_gen_batches = prompt_batches
    if not self.ready:
      self._check_limit(force=True)

  def _check_limit(self, force: bool = False):
    limit = self.s.max_num_gen_batches
    if not self.ready and (force or (limit and self.num_gen_batches >= limit)):
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

  def take(self) -> tuple[ScoredBatch, dict[str, float]]:
    if not self.ready:
      raise RuntimeError("GroupAccumulator.take() before the batch is full")
    batch = ScoredBatch.concat(self.parts)
    n_train = min(self.kept_groups, self.s.train_batch_size) * self.g
    surplus_groups = self.kept_groups - n_train // self.g
    if self.s.carry_over and surplus_groups:
      self.carry = batch.rows(slice(n_train, None))
    batch = batch.rows(slice(0, n_train))
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
  def carried(self) -> ScoredBatch | None:
    """The rows carried into the step being collected (set by `take`), or None."""
    return self.parts[0] if self.carried_in else None

  def compute_carried_logprobs(self, logprobs_fn: Callable[[ScoredBatch], np.ndarray], rows: int):
    """Gives the groups carried into the next step their behaviour log-probs, `logprobs_fn(batch)` [b, N] for
    at most `rows` rows at a time, called between `take` and the next `add` with the weights that sampled
    them: the next step's update has newer weights, and recomputing there would centre the clip on them
    (ratio 1 at the start) instead of on the policy the samples came from. Rows carried before (a surplus of
    more than a batch is carried again) keep the log-probs they have."""
    part = self.carried
    if part is None or part.old_logp_known_B.all():
      return
    if self.num_gen_batches:
      raise RuntimeError("compute_carried_logprobs: only between take() and add()")
    todo = np.flatnonzero(~part.old_logp_known_B)
    old_BxN = np.array(part.old_logp_BxN, np.float32)
    for start in range(0, len(todo), rows):
      idx = todo[start:start + rows]
      old_BxN[idx] = np.asarray(logprobs_fn(part.rows(idx)))[:len(idx)] * part.mask_BxN[idx]
    self.parts[0] = part.replace(old_logp_BxN=old_BxN, old_logp_known_B=np.ones(part.num_rows, bool))

  def state(self) -> dict[str, Any]:
    """What a checkpoint taken between steps needs to continue: the groups carried into the next step."""
    return {"carry": [p.to_record() for p in self.parts]}

  def restore(self, state: dict[str, Any]):
    """From `state()`; a record written before some fields existed reads too (`ScoredBatch.from_record`)."""
    parts = [ScoredBatch.from_record(p) for p in state.get("carry", [])]
    self.carry = ScoredBatch.concat(parts) if parts else None
    self._reset()


def pad_rows(batch: NamedTuple, rows: int, zero: tuple[str, ...] = ("mask_BxN", "adv_B")) -> NamedTuple:
  """`batch` (a NamedTuple of row arrays, None fields allowed) grown to `rows` rows by repeating its rows,
  with the fields in `zero` (the loss mask and advantages) zeroed in the repeats.

  A short batch (`on_exhausted="train_on_kept"`) keeps the update's shapes this way, so it needs no new
  compilation and its micro-batches keep their size: the padding adds to no loss, gradient or sequence count,
  and a mini-batch of padding alone is no update (see `train_step.Trainer.update`). So K kept rows train as
  ceil(K / mini-batch rows) mini-batches, the last one short."""
  have = next(np.asarray(x).shape[0] for x in batch if x is not None)
  if have == rows:
    return batch
  if not 0 < have < rows:
    raise ValueError(f"pad_rows: cannot pad a batch of {have} rows to {rows}")
  take = np.arange(rows - have) % have

  def grow(name, x):
    if x is None:
      return None
    x = np.asarray(x)
    extra = np.zeros_like(x[take]) if name in zero else x[take]
    return np.concatenate([x, extra])

  return type(batch)(*(grow(name, x) for name, x in zip(batch._fields, batch)))
