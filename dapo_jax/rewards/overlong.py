"""Overlong reward shaping (DAPO's soft overlong punishment) and overlong filtering, measured in tokens.

    penalty(L) = min(-(L - (L_max - buffer)) / buffer * factor, 0)

L counts the response's tokens including its EOS token: 0 up to L_max - buffer, falling linearly to
-factor at L_max (the sampler never exceeds L_max). Filtering (masking truncated responses out of the loss
and its token count) lives in the update step's mask; this module only says which rows it applies to.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def overlong_penalty(lengths, max_len: int, buffer: int, factor: float = 1.0) -> np.ndarray:
  lengths = np.asarray(lengths, np.float64)
  expected = max_len - buffer
  return np.minimum(-(lengths - expected) / buffer * factor, 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OverlongShaping:
  """`enable`: add the soft penalty to the reward. `filter`: mask truncated responses out of the loss."""
  max_len: int
  buffer: int = 4096
  factor: float = 1.0
  enable: bool = True
  filter: bool = False

  def __post_init__(self):
    if not isinstance(self.max_len, int) or self.max_len <= 0:
      raise ValueError(f"rollout.max_response_length: must be a positive integer, got {self.max_len!r}")
    if self.enable and not 0 < self.buffer < self.max_len:
      raise ValueError(f"overlong.buffer: {self.buffer} must be positive and smaller than "
                       f"rollout.max_response_length={self.max_len}")
    if not self.factor >= 0:
      raise ValueError(f"overlong.factor: must be >= 0, got {self.factor}")

  def penalty(self, lengths) -> np.ndarray:
    if not self.enable:
      return np.zeros(np.shape(lengths))
    return overlong_penalty(lengths, self.max_len, self.buffer, self.factor)

  @classmethod
  def from_config(cls, config) -> "OverlongShaping":
    o = config.overlong
    return cls(max_len=config.rollout.max_response_length, buffer=o.buffer, factor=o.factor, enable=o.enable,
               filter=o.filter)

  def loss_mask(self, truncated) -> np.ndarray:
    """Per-row 1.0 to train on the response, 0.0 to mask it (truncated, with filtering on)."""
    truncated = np.asarray(truncated, bool)
    return (~truncated if self.filter else np.ones_like(truncated)).astype(np.float32)
