"""How tokens are picked, and the sampler's shapes: `SamplingParams`, `sample_token`, the `Rollout` a sampler
returns, prompt padding and the length buckets. The sampler itself is the rollout engine (`engine.py`:
`engine.generate` for one call, `engine.Engine` to stream).

Prompt lengths and token budgets are rounded up to buckets, so an RL run compiles a handful of programs.

Log-probabilities: `logprobs_BxN` holds each sampled token's log-probability under the policy at the sampling
temperature, `log_softmax(logits / T)`, computed before top-k/top-p truncation: the distribution the policy
defines, which is what the training step recomputes. With greedy decoding (T=0) it is `log_softmax(logits)`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


PROMPT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192, 16384, 32768)
BUDGET_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 20480, 32768)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
  """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 are off."""
  max_new_tokens: int
  stop_ids: tuple[int, ...] = ()
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  pad_id: int = 0

  def __post_init__(self):
    object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))
    if self.max_new_tokens <= 0:
      raise ValueError(f"SamplingParams.max_new_tokens must be positive, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


class Rollout(NamedTuple):
  """G rows per prompt, prompt-major (rows i*G .. i*G+G-1 answer prompt i). Response positions after the
  stop token hold pad_id, logprob 0 and mask False; `lengths_B` counts the stop token."""
  prompt_BxP: jax.Array
  prompt_mask_BxP: jax.Array
  tokens_BxN: jax.Array
  logprobs_BxN: jax.Array
  mask_BxN: jax.Array
  lengths_B: jax.Array
  truncated_B: jax.Array


def bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  return n


def _filter_logits(logits_BxV, params: SamplingParams):
  neg = jnp.finfo(logits_BxV.dtype).min
  if params.top_k:
    kth_B = jax.lax.top_k(logits_BxV, params.top_k)[0][:, -1]
    logits_BxV = jnp.where(logits_BxV < kth_B[:, None], neg, logits_BxV)
  if params.top_p < 1.0:
    sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (at least one token).
    keep_B = jnp.sum((jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < params.top_p, axis=-1)
    threshold_B = jnp.take_along_axis(sorted_BxV, (keep_B - 1)[:, None], axis=-1)[:, 0]
    logits_BxV = jnp.where(logits_BxV < threshold_B[:, None], neg, logits_BxV)
  return logits_BxV


def sample_token(logits_BxV, uniform_B, params: SamplingParams):
  """(token_B, logprob_B): the pick (by inverse CDF from `uniform_B` in [0, 1)) and its log-probability
  under log_softmax(logits / T)."""
  if params.greedy:
    token_B = jnp.argmax(logits_BxV, axis=-1)
    logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  else:
    scaled_BxV = logits_BxV / params.temperature
    logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
    # Inverse-CDF sampling: one uniform per row instead of a Gumbel draw per vocabulary entry (the RNG was
    # ~10% of a decode step on CPU). u lies in (0, total], so zero-probability entries are never picked.
    truncated = params.top_k or params.top_p < 1.0
    probs_BxV = jax.nn.softmax(_filter_logits(scaled_BxV, params), axis=-1) if truncated else jnp.exp(logp_BxV)
    cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
    u_B = (1.0 - uniform_B) * cdf_BxV[:, -1]
    token_B = jnp.minimum(jnp.sum(cdf_BxV < u_B[:, None], axis=-1), cdf_BxV.shape[-1] - 1)
  token_B = token_B.astype(jnp.int32)
  return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to a common bucketed length: (prompt_BxP int32, mask_BxP bool)."""
  longest = max(len(p) for p in prompts)
  if any(len(p) == 0 for p in prompts):
    raise ValueError("pad_prompts: empty prompt (a prompt needs at least one token)")
  length = length or bucket(longest, PROMPT_BUCKETS)
  if longest > length:
    raise ValueError(f"pad_prompts: a prompt has {longest} tokens, more than the length {length}")
  out = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    out[i, length - len(p):] = p
    mask[i, length - len(p):] = True
  return out, mask
