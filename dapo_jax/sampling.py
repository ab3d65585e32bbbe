"""The sampler: one prefill, then decoding inside a single `jax.lax.while_loop` over a preallocated KV cache.

    out = generate(model, prompts, SamplingParams(temperature=1.0, top_p=0.7, max_new_tokens=256,
                                                  stop_ids=tok.stop_ids), rng, num_samples=16)

Grouped rollouts: each prompt is prefilled once and its cache copied to its G rows. Prompt lengths and token
budgets are rounded up to buckets, so an RL run compiles a handful of programs (`compiled_programs()`).

Log-probabilities: `logprobs_BxN` holds each sampled token's log-probability under the policy at the sampling
temperature, `log_softmax(logits / T)`, computed before top-k/top-p truncation: the distribution the policy
defines, which is what the training step recomputes. With greedy decoding (T=0) it is `log_softmax(logits)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dapo_jax.model.transformer import KVCache, KVPart, Transformer, default_positions, parts_attend
from dapo_jax.sharding import constrain, row_local_axes
from jax.sharding import PartitionSpec as P

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


def segment_length(budget: int) -> int:
  """Generated keys and values live in up to 4 segments of this many slots; a step attends to the prompt and
  the segments written so far, not to the whole budget (on average 5/8 of it instead of all)."""
  return budget if budget < 32 else -(-budget // 4)


def _batch_zeros(cfg, shape):
  return constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), ("batch",) + (None,) * (len(shape) - 1))


def _generate_impl(graphdef, state, prompt_BxP, prompt_mask_BxP, rng, max_new_tokens, *,
                   params: SamplingParams, num_samples: int, budget: int, row_axes: tuple[str, ...] = ()
                   ) -> Rollout:
  # Step i's uniforms come from fold_in(rng, i), one row each: the same numbers however the rows are sharded
  # or the budget segmented.
  bg = prompt_BxP.shape[0] * num_samples
  uniform_NxB = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i), (bg,)))(jnp.arange(budget))
  uniform_NxB = constrain(uniform_NxB, (None, "batch"))
  decode = functools.partial(_decode_rows, graphdef, params=params, num_samples=num_samples, budget=budget)
  if not row_axes:
    return decode(state, prompt_BxP, prompt_mask_BxP, uniform_NxB, max_new_tokens)
  # Each shard of rows along `row_axes` (which shard no parameter) decodes in its own loop and stops when its
  # own rows are done: no cross-device step in the loop (checking "all rows done" would be an all-reduce a token).
  rows = P(row_axes)
  return jax.shard_map(decode, in_specs=(P(), rows, rows, P(None, row_axes), P()), out_specs=rows,
                       axis_names=set(row_axes), check_vma=False)(state, prompt_BxP, prompt_mask_BxP, uniform_NxB,
                                                                  max_new_tokens)


def _decode_rows(graphdef, state, prompt_BxP, prompt_mask_BxP, uniform_NxB, max_new_tokens, *,
                 params: SamplingParams, num_samples: int, budget: int) -> Rollout:
  model: Transformer = nnx.merge(graphdef, state)
  cfg = model.cfg
  b, p = prompt_BxP.shape
  g = num_samples
  prompt_mask_BxP = prompt_mask_BxP.astype(bool)
  positions_BxP = default_positions(prompt_mask_BxP)

  # The prompt is prefilled once per prompt, and its keys and values stay one copy per prompt: each decode
  # step reads them once for all G samples (KVPart.group), instead of G copies.
  prefix = KVCache.zeros(cfg, b, p)
  logits_BxPxV, prefix = model.forward_with_cache(prompt_BxP, positions_BxP, prefix, attn_mask_BxT=prompt_mask_BxP)
  prefix_parts = [KVPart(kt, v, prompt_mask_BxP, g) for kt, v in zip(prefix.k, prefix.v)]

  def fan(x):
    return constrain(jnp.repeat(x, g, axis=0), ("batch",) + (None,) * (x.ndim - 1))

  logits_BxV = fan(logits_BxPxV[:, -1])
  next_pos_B = fan(jnp.sum(prompt_mask_BxP, axis=1).astype(jnp.int32))
  bg = b * g
  stop_S = jnp.asarray(params.stop_ids or (-1,), jnp.int32)
  seg = segment_length(budget)

  # Generated tokens' keys and values: one array per layer and segment, each written in place inside its own
  # while_loop while the earlier segments are only read. Decoding stops in any segment once every row is done.
  # (Joining the finished segments into one array between loops, for fewer parts a step, measured no faster
  # and holds up to 1.75x the keys and values while joining.)
  rope_table = model.rope_table(p + budget)
  carry = (jnp.zeros((), jnp.int32), jnp.full((bg, budget), params.pad_id, jnp.int32),
           jnp.zeros((bg, budget), jnp.float32), jnp.zeros((bg,), bool), logits_BxV)
  written = []  # per finished segment: [(kt, v) per layer]
  for start in range(0, budget, seg):
    width = min(seg, budget - start)
    # Drawn before the loop (per-step draws cost two small threefry loops a token).
    uniform_WxB = uniform_NxB[start:start + width]
    current = [(_batch_zeros(cfg, (bg, cfg.num_kv_heads, cfg.head_dim, width)),
                _batch_zeros(cfg, (bg, cfg.num_kv_heads, width, cfg.head_dim))) for _ in range(cfg.num_layers)]
    end = start + width

    def cond(c, end=end):
      step, _, _, done_B, _, _ = c
      return (step < jnp.minimum(max_new_tokens, end)) & ~jnp.all(done_B)

    def body(c, start=start, width=width, done_segments=tuple(written), uniform_WxB=uniform_WxB):
      step, tokens_BxN, logps_BxN, done_B, logits_BxV, current = c
      slot = step - start
      token_B, logp_B = sample_token(logits_BxV, jax.lax.dynamic_index_in_dim(uniform_WxB, slot, keepdims=False),
                                     params)
      token_B = jnp.where(done_B, params.pad_id, token_B)
      logp_B = jnp.where(done_B, 0.0, logp_B)
      tokens_BxN = jax.lax.dynamic_update_slice(tokens_BxN, token_B[:, None], (0, step))
      logps_BxN = jax.lax.dynamic_update_slice(logps_BxN, logp_B[:, None], (0, step))
      done_B = done_B | jnp.any(token_B[:, None] == stop_S[None, :], axis=-1)
      valid_BxW = jnp.broadcast_to(jnp.arange(width)[None] <= slot, (bg, width))
      parts = [[prefix_parts[i], *(KVPart(*d[i], None) for d in done_segments),
                KVPart(*current[i], valid_BxW)] for i in range(cfg.num_layers)]
      logits_BxV, current = model.decode_step(token_B, next_pos_B + step, parts, parts_attend(slot), rope_table)
      return step + 1, tokens_BxN, logps_BxN, done_B, logits_BxV, current

    *carry, current = jax.lax.while_loop(cond, body, (*carry, current))
    written.append(current)
  steps, tokens_BxN, logps_BxN, _, _ = carry

  is_stop_BxN = jnp.any(tokens_BxN[..., None] == stop_S[None, None, :], axis=-1)
  in_range_N = jnp.arange(budget) < steps
  # A row's response ends at its first stop token (included) or at the budget.
  stopped_before_BxN = jnp.cumsum(is_stop_BxN & in_range_N[None], axis=1) - (is_stop_BxN & in_range_N[None])
  mask_BxN = (stopped_before_BxN == 0) & in_range_N[None]
  lengths_B = jnp.sum(mask_BxN, axis=1).astype(jnp.int32)
  truncated_B = ~jnp.any(is_stop_BxN & mask_BxN, axis=1)
  return Rollout(fan(prompt_BxP), fan(prompt_mask_BxP), tokens_BxN, logps_BxN * mask_BxN, mask_BxN, lengths_B,
                 truncated_B)


_generate = jax.jit(_generate_impl, static_argnames=("graphdef", "params", "num_samples", "budget", "row_axes"))


def compiled_programs() -> int:
  """How many sampler programs have been compiled in this process."""
  return _generate._cache_size()


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


def generate(model: Transformer | tuple, prompts, params: SamplingParams, rng: jax.Array, *,
             num_samples: int = 1, prompt_mask=None) -> Rollout:
  """Samples `num_samples` responses for each prompt.

  `prompts` is a list of token lists (left-padded to a bucket here) or an already left-padded int32
  [B, P] array with `prompt_mask`. `model` is a Transformer or its `nnx.split` pair (graphdef, state); call
  inside `jax.set_mesh(mesh)` to run sharded.
  """
  if isinstance(model, Transformer):
    graphdef, state = nnx.split(model)
  else:
    graphdef, state = model
    model = nnx.merge(graphdef, state)
  if prompt_mask is None:
    prompts, prompt_mask = pad_prompts(prompts, params.pad_id)
  budget = bucket(params.max_new_tokens, BUDGET_BUCKETS)
  longest = int(np.max(np.sum(np.asarray(prompt_mask), axis=1)))
  if longest + params.max_new_tokens > model.cfg.max_position_embeddings:
    raise ValueError(f"generate: prompt of {longest} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                     f"model's max_position_embeddings {model.cfg.max_position_embeddings}")
  # The token budget is a traced argument: every max_new_tokens in a bucket shares one program.
  bucketed = dataclasses.replace(params, max_new_tokens=budget)
  prompts = jnp.asarray(prompts, jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  row_axes = () if mesh.empty else row_local_axes(mesh, prompts.shape[0], state)
  return _generate(graphdef, state, prompts, jnp.asarray(prompt_mask, bool), rng,
                   jnp.asarray(params.max_new_tokens, jnp.int32), params=bucketed, num_samples=num_samples,
                   budget=budget, row_axes=row_axes)
