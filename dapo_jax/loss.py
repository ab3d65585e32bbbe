"""The DAPO policy loss: decoupled clip (clip-higher), dual clip, and its aggregation over tokens.

Per token, with r = exp(logp - old_logp) and advantage A:
    L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high));  for A < 0 also  L = min(L, -A clip_c)

Aggregation (`agg`):
  token-mean               sum of L over every response token / number of those tokens (the paper)
  seq-mean-token-mean      mean over sequences of each sequence's token mean (GRPO)
  seq-mean-token-sum       mean over sequences of each sequence's token sum
  seq-mean-token-sum-norm  sum of L / (sequences x norm_len), norm_len a constant such as the maximum
                           response length (Dr. GRPO)

Sequences are the rows with at least one loss token: rows whose loss is masked whole (overlong filtering,
padding) count in no mode. Exact across micro-batches and devices: pass the mini-batch totals (`num_tokens`,
`num_seqs`) and each
micro-batch's loss is its share of the mini-batch loss, so the sum of micro-batch gradients is the
mini-batch gradient however the batch is split. (The reference takes a token mean per micro-batch and
weights it by sequence count, which is not the paper's token mean when token counts differ.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_LOG_RATIO_BOUND = 20.0  # keeps exp() finite; every token this bounds is clipped anyway


def per_token_loss(logp_BxT, old_logp_BxT, adv_BxT, *, clip_low: float, clip_high: float, clip_c: float):
  """(loss_BxT, clipped_high_BxT, clipped_low_BxT, dual_clipped_BxT, ratio_BxT)."""
  log_ratio = jnp.clip(logp_BxT - old_logp_BxT, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
  ratio = jnp.exp(log_ratio)
  unclipped = -adv_BxT * ratio
  clipped = -adv_BxT * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  loss = jnp.maximum(unclipped, clipped)
  dual = -adv_BxT * clip_c
  negative = adv_BxT < 0
  dual_clipped = negative & (loss > dual)
  loss = jnp.where(dual_clipped, dual, loss)
  binding = clipped > unclipped
  return loss, binding & (adv_BxT > 0), binding & negative, dual_clipped, ratio


def aggregate(loss_BxT, mask_BxT, agg: str, *, num_tokens=None, num_seqs=None, norm_len=None, seq_tokens=None):
  """Aggregates a per-token loss; totals default to this batch's own (see the module docstring). Rows packed
  several to a row (`packing.py`) give `seq_tokens`, each token's sequence's loss-token count, for the
  per-sequence mean."""
  mask_BxT = mask_BxT.astype(loss_BxT.dtype)
  masked = loss_BxT * mask_BxT
  if num_seqs is None:
    num_seqs = count_sequences(mask_BxT)
  # A sequence with no loss token (overlong-filtered, or padding) is not a sequence of the mean.
  num_seqs = jnp.maximum(num_seqs, 1.0)
  if agg == "token-mean":
    if num_tokens is None:
      num_tokens = jnp.sum(mask_BxT)
    return jnp.sum(masked) / jnp.maximum(num_tokens, 1.0)
  if agg == "seq-mean-token-mean":
    if seq_tokens is not None:
      return jnp.sum(masked / jnp.maximum(seq_tokens, 1.0)) / num_seqs
    per_seq = jnp.sum(masked, axis=1) / jnp.maximum(jnp.sum(mask_BxT, axis=1), 1.0)
    return jnp.sum(per_seq) / num_seqs
  if agg == "seq-mean-token-sum":
    return jnp.sum(masked) / num_seqs
  if agg == "seq-mean-token-sum-norm":
    if norm_len is None:
      norm_len = loss_BxT.shape[1]
    return jnp.sum(masked) / (num_seqs * norm_len)
  raise ValueError(f"loss aggregation {agg!r} is not one of {AGG_MODES}")


def count_sequences(mask_BxT):
  """How many rows hold at least one loss token: the sequence count of the seq-mean modes."""
  return jnp.sum(jnp.any(mask_BxT > 0, axis=-1).astype(jnp.float32))


def low_var_kl(logp_BxT, ref_logp_BxT):
  """The reference's "low_var_kl" (k3) estimate of KL(pi || ref) per token: r - log r - 1 with
  r = pi_ref / pi, the log-ratio clamped to [-20, 20] and the result to [-10, 10], as verl's kl_penalty."""
  d = jnp.clip(ref_logp_BxT - logp_BxT, -20.0, 20.0)
  return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


def entropy_from_logits(logits_BxTxV):
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.28,
                clip_c: float = 10.0, agg: str = "token-mean", logits=None, num_tokens=None, num_seqs=None,
                norm_len=None, entropy_coef: float = 0.0, seq_tokens=None, is_weight=None):
  """(loss, metrics). `advantages` is [B] (broadcast to tokens) or [B, T]; `mask` [B, T] marks response tokens.

  `is_weight` ([B, T], `rollout_correction.py`) multiplies each token's policy loss.

  With `entropy_coef` (needs `logits`) the loss is `pg_loss - entropy_coef * entropy_loss`, the per-token
  entropy aggregated by the same `agg` as the policy loss (the reference's `agg_loss(entropy, mask, mode)`),
  and `entropy_loss` is a metric.

  Metrics are token means over the same token total as the loss (so they too add up across micro-batches):
  `pg_clipfrac_high` / `pg_clipfrac_low` (the clip binds above 1 + clip_high for A > 0, below 1 - clip_low
  for A < 0), `pg_clipfrac` (their sum, the reference's), `pg_clipfrac_lower` (the reference's name for the
  fraction where the dual clip binds), `ppo_kl` (mean of old_logp - logp) and `entropy` when logits are
  given.
  """
  if agg not in AGG_MODES:
    raise ValueError(f"loss aggregation {agg!r} is not one of {AGG_MODES}")
  if not 0.0 <= clip_low < 1.0 or clip_high < 0.0 or clip_c <= 1.0:
    raise ValueError(f"clip bounds out of range: clip_low={clip_low} (need [0, 1)), clip_high={clip_high} "
                     f"(need >= 0), clip_c={clip_c} (need > 1)")
  adv_BxT = advantages[:, None] * jnp.ones_like(logp) if advantages.ndim == 1 else advantages
  loss_BxT, high, low, dual, _ = per_token_loss(logp, old_logp, adv_BxT, clip_low=clip_low,
                                                clip_high=clip_high, clip_c=clip_c)
  if is_weight is not None:  # the rollout correction's truncated importance weights, constants of the loss
    loss_BxT = loss_BxT * jax.lax.stop_gradient(is_weight)
  loss = aggregate(loss_BxT, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len,
                   seq_tokens=seq_tokens)
  m = mask.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(m) if num_tokens is None else num_tokens, 1.0)

  def token_mean(x):
    return jnp.sum(x.astype(jnp.float32) * m) / denom

  metrics = {"pg_loss": loss, "pg_clipfrac_high": token_mean(high), "pg_clipfrac_low": token_mean(low),
             "pg_clipfrac": token_mean(high | low), "pg_clipfrac_lower": token_mean(dual),
             "ppo_kl": token_mean(old_logp - logp)}
  if logits is not None:
    entropy_BxT = entropy_from_logits(logits)
    metrics["entropy"] = token_mean(entropy_BxT)
    if entropy_coef:
      entropy_loss = aggregate(entropy_BxT, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                               norm_len=norm_len, seq_tokens=seq_tokens)
      metrics["entropy_loss"] = entropy_loss
      loss = loss - entropy_coef * entropy_loss
  elif entropy_coef:
    raise ValueError("policy_loss: entropy_coef needs the logits")
  return loss, metrics
