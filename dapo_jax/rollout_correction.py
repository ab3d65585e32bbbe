"""Correction for the gap between the policy that sampled a batch and the policy its clip is centred on.

The sampler's log-probs (`ScoredBatch.sampler_logp_BxN`, pi_rollout) and the trainer's behaviour log-probs
(`old_logp`, pi_old) differ: by the sampler's numerics, and off-policy (`rollout.max_staleness`, carried
groups) by the weights' versions. As the reference framework's rollout correction in its decoupled mode,
with rho = pi_old / pi_rollout per token (its log bounded to [-20, 20]):

  importance weights (`rollout_is`)      "token": rho_t; "sequence": prod_t rho_t, for every token of the row;
                                         truncated at `rollout_is_threshold`; they multiply each token's
                                         policy loss (no gradient flows through them)
  rejection (`rollout_rs`)               "token" / "sequence" / "geometric" (the row's mean log rho): a token or
                                         row whose ratio leaves [lower, upper] leaves the loss mask (and so its
                                         totals); upper defaults to `rollout_is_threshold`, lower to 1 / upper
  veto (`rollout_token_veto_threshold`)  a row with any token rho below it leaves the loss mask

Metrics (`rollout_corr/...`, the reference's names) are logged whenever the correction is configured, over
the tokens of the loss mask before rejection.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IS_LEVELS = ("", "token", "sequence")
RS_LEVELS = ("", "token", "sequence", "geometric")
_LOG_BOUND = 20.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutCorrection:
  rollout_is: str = ""  # "" off, "token", "sequence"
  rollout_is_threshold: float = 2.0
  rollout_rs: str = ""  # "" off, "token", "sequence", "geometric"
  rollout_rs_threshold: float = 0.0  # 0: rollout_is_threshold
  rollout_rs_threshold_lower: float = 0.0  # 0: 1 / the upper threshold
  rollout_token_veto_threshold: float = 0.0  # 0: no veto

  def __post_init__(self):
    if self.rollout_is not in IS_LEVELS:
      raise ValueError(f"rollout_is: {self.rollout_is!r} is not one of {IS_LEVELS} ('' is off)")
    if self.rollout_rs not in RS_LEVELS:
      raise ValueError(f"rollout_rs: {self.rollout_rs!r} is not one of {RS_LEVELS} ('' is off)")
    if not self.rollout_is_threshold > 0:
      raise ValueError(f"rollout_is_threshold: must be > 0, got {self.rollout_is_threshold}")
    if self.rollout_rs_threshold < 0 or self.rollout_rs_threshold_lower < 0:
      raise ValueError("rollout_rs_threshold, rollout_rs_threshold_lower: must be >= 0 (0: the default)")
    if self.rs_bounds[0] >= self.rs_bounds[1]:
      raise ValueError(f"rollout_rs_threshold_lower: {self.rs_bounds[0]} must be below the upper threshold "
                       f"{self.rs_bounds[1]}")
    if self.rollout_token_veto_threshold < 0:
      raise ValueError(f"rollout_token_veto_threshold: must be >= 0 (0: off), got "
                       f"{self.rollout_token_veto_threshold}")

  @property
  def enabled(self) -> bool:
    """Whether the loss changes (weights, rejection or veto)."""
    return bool(self.rollout_is or self.rollout_rs or self.rollout_token_veto_threshold)

  @property
  def rs_bounds(self) -> tuple[float, float]:
    upper = self.rollout_rs_threshold or self.rollout_is_threshold
    return (self.rollout_rs_threshold_lower or 1.0 / upper), upper

  def apply(self, old_logp_BxN, rollout_logp_BxN, mask_BxN):
    """(importance weights [B, N] or None, the loss mask after rejection and veto [B, N], metrics)."""
    mask = np.asarray(mask_BxN, np.float32)
    valid = mask > 0
    log_rho = np.clip(np.asarray(old_logp_BxN, np.float64) - np.asarray(rollout_logp_BxN, np.float64),
                      -_LOG_BOUND, _LOG_BOUND) * valid
    tokens_B = valid.sum(axis=1)
    rows = tokens_B > 0
    seq_log_rho_B = np.clip(log_rho.sum(axis=1), -_LOG_BOUND, _LOG_BOUND)

    weights = None
    if self.rollout_is == "token":
      weights = np.exp(log_rho)
    elif self.rollout_is == "sequence":
      weights = np.broadcast_to(np.exp(seq_log_rho_B)[:, None], mask.shape)
    metrics = {}
    if weights is not None:
      truncated = (weights > self.rollout_is_threshold) & valid
      weights = np.minimum(weights, self.rollout_is_threshold) * valid
      w = weights[valid]
      metrics.update({"rollout_corr/rollout_is_mean": float(w.mean()) if w.size else 1.0,
                      "rollout_corr/rollout_is_std": float(w.std()) if w.size else 0.0,
                      "rollout_corr/rollout_is_min": float(w.min()) if w.size else 1.0,
                      "rollout_corr/rollout_is_max": float(w.max()) if w.size else 1.0,
                      "rollout_corr/rollout_is_ratio_fraction_high": float(truncated.sum() / max(valid.sum(), 1)),
                      "rollout_corr/rollout_is_eff_sample_size": (
                          float(w.sum() ** 2 / (w.size * np.sum(w * w))) if w.size and np.any(w) else 1.0)})
      weights = weights.astype(np.float32)

    keep = valid.copy()
    if self.rollout_rs:
      lower, upper = np.log(self.rs_bounds[0]), np.log(self.rs_bounds[1])
      if self.rollout_rs == "token":
        ratio = log_rho
      elif self.rollout_rs == "sequence":
        ratio = np.broadcast_to(seq_log_rho_B[:, None], mask.shape)
      else:
        ratio = np.broadcast_to((log_rho.sum(axis=1) / np.maximum(tokens_B, 1))[:, None], mask.shape)
      keep &= (ratio >= lower) & (ratio <= upper)
      metrics["rollout_corr/rollout_rs_masked_fraction"] = float(1.0 - keep.sum() / max(valid.sum(), 1))
    if self.rollout_token_veto_threshold:
      raw = np.asarray(old_logp_BxN, np.float64) - np.asarray(rollout_logp_BxN, np.float64)
      vetoed_B = np.any(valid & (raw < np.log(self.rollout_token_veto_threshold)), axis=1)
      keep &= ~vetoed_B[:, None]
      metrics["rollout_corr/rollout_is_veto_fraction"] = float(vetoed_B[rows].mean()) if rows.any() else 0.0

    # The gap itself: KL(pi_rollout || pi_old) per token (k1 and the low-variance k3) and the difference of
    # the rows' log perplexities.
    n = max(valid.sum(), 1)
    k3 = np.exp(log_rho) - log_rho - 1.0
    mean_logp = lambda x: (np.asarray(x, np.float64) * valid).sum(axis=1)[rows] / tokens_B[rows]  # noqa: E731
    metrics.update({"rollout_corr/kl": float(-log_rho.sum() / n), "rollout_corr/k3_kl": float((k3 * valid).sum() / n),
                    "rollout_corr/log_ppl_diff": float(np.mean(mean_logp(rollout_logp_BxN) - mean_logp(old_logp_BxN)))
                    if rows.any() else 0.0})
    return weights, (mask * keep).astype(np.float32), metrics
