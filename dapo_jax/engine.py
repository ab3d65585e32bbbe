"""The rollout engine: continuous batching over a paged KV cache.

A fixed number of decode slots (`EngineConfig.slots`, the memory budget) decode one response each. Keys and
values live in per-layer pools of fixed-size pages; each slot has a page table. A prompt is prefilled once
into its own pages, which its G rows all read (one copy per prompt); each row writes its generated tokens to
pages of its own, reserved for its token budget when it is admitted and freed when it stops. Decoding runs in
jitted chunks of up to `steps_per_chunk` steps (one `lax.while_loop`, no Python per token); between chunks
the host frees the slots whose rows stopped and admits waiting rows into them, prefilling new prompts in
batches of `prefill_batch` (long prompts in pieces of `prefill_chunk` tokens).

    engine = Engine(params, EngineConfig(slots=64))
    out = engine.generate(model, prompts, rng, num_samples=8)      # a sampling.Rollout, prompt-major
    for done in engine.stream(model, requests, rng):               # GroupResults as their last row stops
      ...

Randomness belongs to the request: token t of sample j of the request with key id k is drawn with
`uniform(fold_in(fold_in(fold_in(rng, k), j), t))`, so what a request samples does not depend on its slot,
the step it was admitted in, or the slot count. Log-probabilities are as `sampling.sample_token` defines them.

Attention reads a slot's pages in blocks of `pages_per_block` pages with an online softmax, up to the longest
live row's last block; a slot's table entries past its own pages point at page 0, which holds zeros and is
never written, so reading them costs little and (masked) changes nothing, bit for bit.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Iterable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from dapo_jax import distributed
from dapo_jax.model.transformer import KVCache, Transformer
from dapo_jax.sampling import (BUDGET_BUCKETS, PROMPT_BUCKETS, Rollout, SamplingParams, bucket, pad_prompts,
                               sample_token)
from dapo_jax.sharding import constrain, row_local_axes


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
  """slots: rows decoding at once (over all devices). page_size: tokens per KV page. steps_per_chunk: decode
  steps per jitted call; a chunk also ends early once `refill_fraction` of the slots are free and rows wait.
  prefill_batch: prompts prefilled per call (0: enough to fill every slot's group). prefill_chunk: a prompt
  longer than this is prefilled in pieces of this many tokens (0: whole). pages_per_block, attention_rows:
  attention reads this many pages for this many rows (of similar length) per step of its loop."""
  slots: int = 64
  page_size: int = 16
  steps_per_chunk: int = 16
  refill_fraction: float = 0.125
  prefill_batch: int = 0
  prefill_chunk: int = 512
  pages_per_block: int = 4
  attention_rows: int = 16

  def __post_init__(self):
    for name in ("slots", "page_size", "steps_per_chunk", "pages_per_block", "attention_rows"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"rollout.engine.{name}: must be a positive integer, got {value!r}")
    for name in ("prefill_batch", "prefill_chunk"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ValueError(f"rollout.engine.{name}: must be an integer >= 0, got {value!r}")
    if self.page_size % 8 and 16 % self.page_size:
      raise ValueError(f"rollout.engine.page_size: must divide 16 or be a multiple of 8, got {self.page_size}")
    if not 0.0 < self.refill_fraction <= 1.0:
      raise ValueError(f"rollout.engine.refill_fraction: must be in (0, 1], got {self.refill_fraction}")
    if self.prefill_chunk and self.prefill_chunk % 16:
      raise ValueError(f"rollout.engine.prefill_chunk: must be a multiple of 16, got {self.prefill_chunk}")


class Request(NamedTuple):
  """A prompt group: `num_samples` responses to `prompt_ids`, each of at most `max_new_tokens` tokens (None:
  the engine's budget). `key_id` picks the group's randomness (fold_in(rng, key_id)); `tag` comes back in
  its result."""
  prompt_ids: Sequence[int]
  num_samples: int
  key_id: int
  max_new_tokens: int | None = None
  tag: object = None


class GroupResult(NamedTuple):
  """A finished group: per row, the response tokens (the stop token included), their log-probs and whether
  it hit its budget without a stop token."""
  request: Request
  tokens: list[np.ndarray]
  logprobs: list[np.ndarray]
  truncated: np.ndarray


class EngineStats(NamedTuple):
  decode_steps: int  # slot-steps run (steps x slots)
  useful_steps: int  # of those, steps that produced a response token
  chunks: int
  prefill_calls: int
  dropped_groups: int  # admitted or prefilled groups given up when the consumer stopped the stream
  decoded_tokens: int  # tokens sampled, including those of dropped groups
  queued_decode_steps: int = 0  # slot-steps of the chunks that began with rows waiting for a slot
  queued_useful_steps: int = 0

  @property
  def occupancy(self) -> float:
    """Share of slot-steps that produced a token, over the whole run (the last rows' drain included)."""
    return self.useful_steps / max(self.decode_steps, 1)

  @property
  def queued_occupancy(self) -> float:
    """The same while rows were waiting for slots: what refilling achieves, without the drain at the end."""
    return self.queued_useful_steps / max(self.queued_decode_steps, 1)


# ---------------------------------------------------------------------------------------------------- device


def _pool_shapes(cfg, pages: int, page: int):
  return (pages, cfg.num_kv_heads, cfg.head_dim, page), (pages, cfg.num_kv_heads, page, cfg.head_dim)


def paged_attend(table_SxM, valid_fn, write_page_S, write_off_S, blocks_S, order_S, page: int, per_block: int,
                 rows: int):
  """The engine's `attend` (see `Transformer.decode_step`) over per-layer page pools (kt, v).

  The new key and value go to page `write_page_S` (out of range: dropped) at offset `write_off_S`. A slot
  reads its table's pages `per_block` at a time, `blocks_S` blocks, with an online softmax. Work goes in
  (block, row group) pairs: the slots in `order_S` (longest first) form groups of `rows`, and a group reads
  block j only if one of its slots has it, so a step's work follows the live rows' lengths, not S times the
  longest. Each slot's blocks are read in order and its arithmetic does not depend on the other slots of its
  group: a row gives the same numbers whatever its slot."""
  def attend(cfg, q_SxKxRxH, k_SxKxH, v_SxKxH, pools):
    kt_pool, v_pool = pools
    dt = jnp.dtype(cfg.dtype)
    kt_pool = kt_pool.at[write_page_S, :, :, write_off_S].set(k_SxKxH.astype(kt_pool.dtype), mode="drop")
    v_pool = v_pool.at[write_page_S, :, write_off_S, :].set(v_SxKxH.astype(v_pool.dtype), mode="drop")
    s, kvh, r, hd = q_SxKxRxH.shape
    neg = jnp.finfo(jnp.float32).min
    scale = 1.0 / math.sqrt(hd)
    q = q_SxKxRxH.astype(dt)
    groups = s // rows
    group_blocks_G = jnp.max(blocks_S[order_S].reshape(groups, rows), axis=1)
    num_blocks = table_SxM.shape[1] // per_block
    # (block, group) pairs in block-major order, the needed ones first.
    needed = (jnp.arange(num_blocks)[:, None] < group_blocks_G[None, :]).reshape(-1)
    pairs = jnp.argsort(~needed, stable=True).astype(jnp.int32)

    def block(i, c):
      m_SxKxR, l_SxKxR, o_SxKxRxH = c
      j, g = pairs[i] // groups, pairs[i] % groups
      rows_R = jax.lax.dynamic_slice_in_dim(order_S, g * rows, rows)
      pages_RxB = jax.lax.dynamic_slice_in_dim(table_SxM[rows_R], j * per_block, per_block, axis=1)
      kt_RxBxKxHxP = kt_pool[pages_RxB].astype(dt)
      v_RxBxKxPxH = v_pool[pages_RxB].astype(dt)
      scores = jnp.einsum("skrh,sbkhp->skrbp", q[rows_R], kt_RxBxKxHxP, preferred_element_type=jnp.float32) * scale
      valid_RxBxP = valid_fn(rows_R, j * per_block + jnp.arange(per_block))
      scores = jnp.where(valid_RxBxP[:, None, None], scores, neg)
      m_old = m_SxKxR[rows_R]
      m_new = jnp.maximum(m_old, jnp.max(scores, axis=(-2, -1)))
      alpha = jnp.exp(m_old - m_new)
      p = jnp.exp(scores - m_new[..., None, None])
      l_new = l_SxKxR[rows_R] * alpha + jnp.sum(p, axis=(-2, -1))
      pv = jnp.einsum("skrbp,sbkph->skrh", p.astype(dt), v_RxBxKxPxH, preferred_element_type=jnp.float32)
      o_new = o_SxKxRxH[rows_R] * alpha[..., None] + pv
      return m_SxKxR.at[rows_R].set(m_new), l_SxKxR.at[rows_R].set(l_new), o_SxKxRxH.at[rows_R].set(o_new)

    init = (jnp.full((s, kvh, r), neg, jnp.float32), jnp.ones((s, kvh, r), jnp.float32),
            jnp.zeros((s, kvh, r, hd), jnp.float32))
    _, l_SxKxR, o_SxKxRxH = jax.lax.fori_loop(0, jnp.sum(needed), block, init)
    return (o_SxKxRxH / l_SxKxR[..., None]).astype(dt), (kt_pool, v_pool)
  return attend


class _Slots(NamedTuple):
  """Per-slot state the host sets between chunks ([S] unless noted)."""
  table_SxM: jax.Array  # int32 page ids: prompt pages, then the row's own
  prompt_len_S: jax.Array  # int32
  prompt_pages_S: jax.Array  # int32
  generated_S: jax.Array  # int32 tokens generated so far
  budget_S: jax.Array  # int32
  key_Sx2: jax.Array  # uint32 key data of the row
  live_S: jax.Array  # bool: decoding
  fresh_S: jax.Array  # bool: admitted since the last chunk (its logits come from the prompt's)
  prompt_index_S: jax.Array  # int32 row of the prompt logits
  order_S: jax.Array  # int32 slots, longest row first (groups of attention work)


def _decode_chunk(graphdef, state, pools, logits_SxV, prompt_logits_RxV, slots: _Slots, tokens_SxN, logps_SxN,
                  steps, free_target, *, params: SamplingParams, page: int, per_block: int, rows_per_group: int):
  model: Transformer = nnx.merge(graphdef, state)
  cfg = model.cfg
  s_count, width = slots.table_SxM.shape
  logits_SxV = jnp.where(slots.fresh_S[:, None], prompt_logits_RxV[jnp.clip(slots.prompt_index_S, 0,
                                                                            prompt_logits_RxV.shape[0] - 1)],
                         logits_SxV)
  stop_T = jnp.asarray(params.stop_ids or (-1,), jnp.int32)
  keys_S = jax.random.wrap_key_data(slots.key_Sx2)
  rope_table = model.rope_table(cfg.max_position_embeddings)
  rows_S = jnp.arange(s_count)
  n_pages = pools[0][0].shape[0]
  budget_N = tokens_SxN.shape[1]

  def cond(c):
    i, _, _, live_S, *_ = c
    free = jnp.sum(~live_S)
    return (i < steps) & jnp.any(live_S) & (free < free_target)

  def body(c):
    i, logits_SxV, gen_S, live_S, tokens_SxN, logps_SxN, pools = c
    if params.greedy:
      uniform_S = jnp.zeros((s_count,), jnp.float32)
    else:
      uniform_S = jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t), ()))(keys_S, gen_S)
    token_S, logp_S = sample_token(logits_SxV, uniform_S, params)
    token_S = jnp.where(live_S, token_S, params.pad_id)
    column_S = jnp.where(live_S, gen_S, budget_N)  # out of range: dropped
    tokens_SxN = tokens_SxN.at[rows_S, column_S].set(token_S, mode="drop")
    logps_SxN = logps_SxN.at[rows_S, column_S].set(logp_S, mode="drop")
    # Every slot runs the step; a slot that is not live writes nowhere and its output is ignored.
    own_S = slots.prompt_pages_S + gen_S // page
    write_page_S = jnp.where(live_S, jnp.take_along_axis(slots.table_SxM, jnp.minimum(own_S, width - 1)[:, None],
                                                         axis=1)[:, 0], n_pages)

    def valid_fn(rows_R, cols_B):  # [R, B, P]: which positions of table columns cols_B hold row R's tokens
      offset_P = jnp.arange(page)
      prompt_pages_R, col_RxB = slots.prompt_pages_S[rows_R][:, None], cols_B[None, :]
      prompt_pos = col_RxB[..., None] * page + offset_P
      gen_pos = (col_RxB - prompt_pages_R)[..., None] * page + offset_P
      return jnp.where((col_RxB < prompt_pages_R)[..., None], prompt_pos < slots.prompt_len_S[rows_R][:, None, None],
                       (gen_pos >= 0) & (gen_pos <= gen_S[rows_R][:, None, None]))

    blocks_S = jnp.where(live_S, (own_S + per_block) // per_block, 0)
    attend = paged_attend(slots.table_SxM, valid_fn, write_page_S, gen_S % page, blocks_S, slots.order_S, page,
                          per_block, math.gcd(rows_per_group, s_count))
    logits_SxV, pools = model.decode_step(token_S, slots.prompt_len_S + gen_S, pools, attend, rope_table)
    stopped_S = jnp.any(token_S[:, None] == stop_T[None, :], axis=-1) | (gen_S + 1 >= slots.budget_S)
    gen_S = jnp.where(live_S, gen_S + 1, gen_S)
    live_S = live_S & ~stopped_S
    return i + 1, logits_SxV, gen_S, live_S, tokens_SxN, logps_SxN, pools

  init = (jnp.zeros((), jnp.int32), logits_SxV, slots.generated_S, slots.live_S, tokens_SxN, logps_SxN,
          list(pools))
  steps_run, logits_SxV, gen_S, live_S, tokens_SxN, logps_SxN, pools = jax.lax.while_loop(cond, body, init)
  return pools, logits_SxV, gen_S, live_S, tokens_SxN, logps_SxN, steps_run


def _prefill(graphdef, state, pools, prompt_logits_RxV, prompt_AxP, prompt_len_A, pages_AxQ, index_A, *,
             page: int, chunk: int):
  """Prefills right-aligned prompts into their pages (`pages_AxQ`, out of range: not written) and stores each
  prompt's last logits at row `index_A` (out of range: dropped)."""
  model: Transformer = nnx.merge(graphdef, state)
  cfg = model.cfg
  a, p = prompt_AxP.shape
  mask_AxP = jnp.arange(p)[None] < prompt_len_A[:, None]
  positions_AxP = jnp.broadcast_to(jnp.arange(p)[None], (a, p))
  cache = KVCache.zeros(cfg, a, p)
  step = chunk if chunk and p > chunk and p % chunk == 0 else p
  last_AxV = jnp.zeros((a, cfg.vocab_size), jnp.float32)
  for start in range(0, p, step):  # pieces attend to the earlier ones through the cache
    logits_AxTxV, cache = model.forward_with_cache(prompt_AxP[:, start:start + step],
                                                   positions_AxP[:, start:start + step], cache,
                                                   attn_mask_BxT=mask_AxP[:, start:start + step])
    at_A = prompt_len_A - 1 - start
    here = (at_A >= 0) & (at_A < step)
    picked = jnp.take_along_axis(logits_AxTxV, jnp.clip(at_A, 0, step - 1)[:, None, None], axis=1)[:, 0]
    last_AxV = jnp.where(here[:, None], picked, last_AxV)
  q = p // page
  new_pools = []
  for (kt_pool, v_pool), kt, v in zip(pools, cache.k, cache.v):
    kt_pages = kt.reshape(a, cfg.num_kv_heads, cfg.head_dim, q, page).transpose(0, 3, 1, 2, 4)
    v_pages = v.reshape(a, cfg.num_kv_heads, q, page, cfg.head_dim).transpose(0, 2, 1, 3, 4)
    new_pools.append((kt_pool.at[pages_AxQ].set(kt_pages.astype(kt_pool.dtype), mode="drop"),
                      v_pool.at[pages_AxQ].set(v_pages.astype(v_pool.dtype), mode="drop")))
  return new_pools, prompt_logits_RxV.at[index_A].set(last_AxV, mode="drop")


def _row_sharded(fn, row_axes, n_in, n_out):
  """`fn` under shard_map over `row_axes` (each shard its own slots, pages and prompts), parameters whole."""
  if not row_axes:
    return fn
  rows = P(row_axes)
  return jax.shard_map(fn, in_specs=(P(),) + (rows,) * (n_in - 1), out_specs=(rows,) * n_out,
                       axis_names=set(row_axes), check_vma=False)


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "page", "per_block", "rows_per_group", "row_axes"),
                   donate_argnums=(2, 3, 7, 8))
def _decode_jit(graphdef, state, pools, logits_SxV, prompt_logits_RxV, slots, steps, tokens_SxN, logps_SxN,
                free_target, *, params, page, per_block, rows_per_group, row_axes):
  def run(state, pools, logits_SxV, prompt_logits_RxV, slots, tokens_SxN, logps_SxN, steps, free_target):
    *out, steps_run = _decode_chunk(graphdef, state, pools, logits_SxV, prompt_logits_RxV, slots, tokens_SxN,
                                    logps_SxN, steps[0], free_target[0], params=params, page=page,
                                    per_block=per_block, rows_per_group=rows_per_group)
    return (*out, steps_run[None])  # one count per shard
  shard = jnp.ones((max(1, _shards(row_axes)),), jnp.int32)
  out = _row_sharded(run, row_axes, 9, 7)(state, pools, logits_SxV, prompt_logits_RxV, slots, tokens_SxN,
                                          logps_SxN, shard * steps, shard * free_target)
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "page", "chunk", "row_axes"), donate_argnums=(2, 3))
def _prefill_jit(graphdef, state, pools, prompt_logits_RxV, prompt_AxP, prompt_len_A, pages_AxQ, index_A, *,
                 page, chunk, row_axes):
  def run(state, pools, prompt_logits_RxV, prompt_AxP, prompt_len_A, pages_AxQ, index_A):
    return _prefill(graphdef, state, pools, prompt_logits_RxV, prompt_AxP, prompt_len_A, pages_AxQ, index_A,
                    page=page, chunk=chunk)
  return _row_sharded(run, row_axes, 7, 2)(state, pools, prompt_logits_RxV, prompt_AxP, prompt_len_A, pages_AxQ,
                                           index_A)


def _shards(row_axes) -> int:
  if not row_axes:
    return 1
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in row_axes)


def compiled_programs() -> int:
  """Engine programs compiled in this process (decode chunks and prefills)."""
  return _decode_jit._cache_size() + _prefill_jit._cache_size()


def _zeros(make, sharding):
  """`make()`'s arrays created on their shards (every leaf with `sharding`; None: default placement)."""
  return jax.jit(make)() if sharding is None else jax.jit(make, out_shardings=sharding)()


# ------------------------------------------------------------------------------------------------------ host


class _Prompt:
  """A prefilled prompt: its shard, pages, logits row, and rows still to admit / still decoding."""

  def __init__(self, request: Request, index: int, shard: int, pages: list[int], logits_row: int, budget: int):
    self.request, self.index, self.shard, self.pages, self.logits_row = request, index, shard, pages, logits_row
    self.budget = budget
    g = request.num_samples
    self.to_admit = collections.deque(range(g))
    self.running = 0
    self.tokens: list = [None] * g
    self.logprobs: list = [None] * g
    self.truncated = np.zeros(g, bool)
    self.finished = 0


class Engine:
  """Continuous batching for one `SamplingParams` (see the module docstring). `max_new_tokens` of the params
  is the default budget of a request; `max_prompt_len` bounds the prompts (bucketed). Call inside
  `jax.set_mesh(mesh)` to run sharded: slots and pages split over the mesh's row axes when it only splits
  rows, else one SPMD program."""

  def __init__(self, params: SamplingParams, config: EngineConfig = EngineConfig()):
    self.params, self.config = params, config
    self.budget = bucket(params.max_new_tokens, BUDGET_BUCKETS)
    self.stats = EngineStats(0, 0, 0, 0, 0, 0)

  # The public calls -------------------------------------------------------------------------------------

  def generate(self, model, prompts, rng, *, num_samples: int = 1, max_new_tokens: Sequence[int] | None = None
               ) -> Rollout:
    """Every prompt's `num_samples` responses, as `sampling.generate` returns them (rows prompt-major,
    responses right-padded to the bucketed budget). Prompt i's randomness is fold_in(rng, i)."""
    prompts = [list(map(int, p)) for p in prompts]
    requests = [Request(p, num_samples, i, None if max_new_tokens is None else int(max_new_tokens[i]))
                for i, p in enumerate(prompts)]
    results = {r.request.key_id: r for r in self.stream(model, requests, rng)}
    return self.to_rollout([results[i] for i in range(len(prompts))])

  def to_rollout(self, results: Sequence[GroupResult]) -> Rollout:
    """Finished groups as a `Rollout` (prompts left-padded to a bucket, responses to the engine's budget)."""
    prompt_BxP, prompt_mask_BxP = pad_prompts([r.request.prompt_ids for r in results], self.params.pad_id)
    rows = [(i, j) for i, r in enumerate(results) for j in range(r.request.num_samples)]
    n = self.budget
    tokens = np.full((len(rows), n), self.params.pad_id, np.int32)
    logps = np.zeros((len(rows), n), np.float32)
    lengths = np.zeros(len(rows), np.int32)
    truncated = np.zeros(len(rows), bool)
    for b, (i, j) in enumerate(rows):
      t, lp = results[i].tokens[j], results[i].logprobs[j]
      tokens[b, :len(t)], logps[b, :len(t)], lengths[b] = t, lp, len(t)
      truncated[b] = results[i].truncated[j]
    index = np.asarray([i for i, _ in rows], np.int64)
    mask = np.arange(n)[None] < lengths[:, None]
    return Rollout(prompt_BxP[index], prompt_mask_BxP[index], tokens, logps, mask, lengths, truncated)

  def stream(self, model, requests: Iterable[Request], rng) -> Iterator[GroupResult]:
    """Decodes `requests` (pulled as slots free up) and yields each group once its last row stops, in the
    order they finish. Closing the generator early drops the groups in flight (`stats.dropped_groups`)."""
    for chunk in self.stream_chunks(model, requests, rng):
      yield from chunk

  def stream_chunks(self, model, requests: Iterable[Request], rng) -> Iterator[list[GroupResult]]:
    """As `stream`, a list per decode chunk: the groups whose last row stopped in it. A chunk's list is
    yielded once the next chunk has been dispatched, so what the caller does with it (scoring) overlaps the
    decoding."""
    graphdef, state = nnx.split(model) if isinstance(model, Transformer) else model
    cfg = nnx.merge(graphdef, state).cfg if isinstance(model, tuple) else model.cfg
    run = _Run(self, graphdef, state, cfg, iter(requests), rng)
    try:
      yield from run.loop()
    finally:
      self.stats = run.stats()


class _Run:
  """One `Engine.stream` call: the host's scheduler and the device state it drives."""

  def __init__(self, engine: Engine, graphdef, state, cfg, requests: Iterator[Request], rng):
    self.e, self.graphdef, self.state, self.cfg, self.requests, self.rng = engine, graphdef, state, cfg, requests, rng
    c, params = engine.config, engine.params
    mesh = jax.sharding.get_abstract_mesh()
    self.row_axes = () if mesh.empty else row_local_axes(mesh, c.slots, state)
    self.shards = _shards(self.row_axes)
    if c.slots % self.shards:
      raise ValueError(f"rollout.engine.slots={c.slots} does not divide over the {self.shards} devices that split "
                       f"rows")
    self.page = c.page_size
    self.slots_per_shard = c.slots // self.shards
    self.budget = engine.budget
    self.max_budget_pages = -(-self.budget // self.page)
    self.prefill_batch = c.prefill_batch or max(1, -(-self.slots_per_shard // 1))
    self.logit_rows = self.slots_per_shard + self.prefill_batch  # resident prompts per shard, at most
    self.prompt_cap = 0  # the widest prompt bucket seen (page table width grows with it: a new program)
    # Pages per shard: page 0 (zeros), every slot's whole budget, and the resident prompts' pages (grown on
    # demand with the prompt bucket).
    self.pages_per_shard = 0
    self.free_pages: list[list[int]] = []
    self.pools = None
    self.prompt_logits = None
    self.logits = None
    self.waiting: list[collections.deque] = [collections.deque() for _ in range(self.shards)]  # _Prompt per shard
    self.slot_prompt: list[list[_Prompt | None]] = [[None] * self.slots_per_shard for _ in range(self.shards)]
    self.slot_row = np.zeros(c.slots, np.int32)
    self.slot_pages: list[list[int]] = [[] for _ in range(c.slots)]
    self.free_logit_rows = [list(range(self.logit_rows)) for _ in range(self.shards)]
    self.host = dict(table=np.zeros((c.slots, 1), np.int32), prompt_len=np.zeros(c.slots, np.int32),
                     prompt_pages=np.zeros(c.slots, np.int32), generated=np.zeros(c.slots, np.int32),
                     budget=np.ones(c.slots, np.int32), key=np.zeros((c.slots, 2), np.uint32),
                     live=np.zeros(c.slots, bool), fresh=np.zeros(c.slots, bool),
                     prompt_index=np.zeros(c.slots, np.int32))
    self.exhausted = False
    self.next_index = 0
    self.counts = dict(decode_steps=0, useful_steps=0, chunks=0, prefill_calls=0, decoded_tokens=0,
                       queued_decode_steps=0, queued_useful_steps=0)
    self.in_flight: dict[int, _Prompt] = {}
    del params

  def stats(self) -> EngineStats:
    return EngineStats(dropped_groups=len(self.in_flight), **self.counts)

  # ---- sharding helpers

  def _mesh(self):
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else jax.sharding.get_mesh()

  def _put(self, x):
    """A host array, the same on every process, as a global array split by rows (each shard its slots)."""
    sharding = self._row_sharding()
    return jnp.asarray(x) if sharding is None else distributed.to_global(np.asarray(x), sharding)

  # ---- memory

  def _ensure_pools(self, prompt_bucket: int):
    """(Re)allocates the page pools for prompts up to `prompt_bucket` tokens (a wider prompt than any so far
    grows them; pages in use are kept)."""
    if prompt_bucket <= self.prompt_cap:
      return
    cfg = self.cfg
    prompt_pages = prompt_bucket // self.page
    pages = 1 + self.slots_per_shard * self.max_budget_pages + self.logit_rows * prompt_pages
    old_pages, old_pools = self.pages_per_shard, self.pools
    self.prompt_cap, self.pages_per_shard = prompt_bucket, pages
    self.table_width = -(-(prompt_pages + self.max_budget_pages) // self.e.config.pages_per_block) * \
        self.e.config.pages_per_block
    kshape, vshape = _pool_shapes(cfg, pages * self.shards, self.page)
    dt = jnp.dtype(cfg.dtype)
    sharding = self._pool_sharding()
    new = _zeros(lambda: [(jnp.zeros(kshape, dt), jnp.zeros(vshape, dt)) for _ in range(cfg.num_layers)], sharding)
    if old_pools is not None:
      # Each shard's old pages keep their ids: copy them into the front of its new range.
      idx = np.concatenate([np.arange(old_pages) + s * pages for s in range(self.shards)])
      src = np.concatenate([np.arange(old_pages) + s * old_pages for s in range(self.shards)])
      new = [(nk.at[idx].set(ok[src]), nv.at[idx].set(ov[src])) for (nk, nv), (ok, ov) in zip(new, old_pools)]
      for s in range(self.shards):
        self.free_pages[s].extend(range(old_pages, pages))
    else:
      self.free_pages = [list(range(1, pages)) for _ in range(self.shards)]
      v = cfg.vocab_size
      n, rows = self.e.config.slots, self._row_sharding()
      self.logits, self.prompt_logits = _zeros(lambda: (jnp.zeros((n, v), jnp.float32), jnp.zeros(
          (self.logit_rows * self.shards, v), jnp.float32)), rows)
      self.tokens = list(_zeros(lambda: (jnp.zeros((n, self.budget), jnp.int32),
                                         jnp.zeros((n, self.budget), jnp.float32)), rows))
    self.pools = new
    table = np.zeros((self.e.config.slots, self.table_width), np.int32)
    table[:, :self.host["table"].shape[1]] = self.host["table"][:, :self.table_width]
    self.host["table"] = table

  def _row_sharding(self):
    mesh = self._mesh()
    return None if mesh is None else jax.sharding.NamedSharding(mesh, P(self.row_axes) if self.row_axes else P())

  def _pool_sharding(self):
    mesh = self._mesh()
    if mesh is None:
      return None
    if self.row_axes:
      return jax.sharding.NamedSharding(mesh, P(self.row_axes))
    tensor = mesh.shape.get("tensor", 1)
    kv = "tensor" if tensor > 1 and self.cfg.num_kv_heads % tensor == 0 else None
    return jax.sharding.NamedSharding(mesh, P(None, kv))

  def _alloc(self, shard: int, n: int) -> list[int]:
    free = self.free_pages[shard]
    if len(free) < n:
      raise RuntimeError(f"engine: page pool of shard {shard} exhausted ({n} pages asked, {len(free)} free)")
    out, self.free_pages[shard] = free[:n], free[n:]
    return out

  # ---- scheduling

  def _pull(self) -> Request | None:
    if self.exhausted:
      return None
    try:
      r = next(self.requests)
    except StopIteration:
      self.exhausted = True
      return None
    if not r.prompt_ids:
      raise ValueError(f"engine: request {r.key_id} has an empty prompt (a prompt needs at least one token)")
    budget = self.e.params.max_new_tokens if r.max_new_tokens is None else int(r.max_new_tokens)
    if not 0 < budget <= self.e.params.max_new_tokens:
      raise ValueError(f"engine: request {r.key_id} asks for {budget} new tokens; the engine allows 1 to "
                       f"SamplingParams.max_new_tokens={self.e.params.max_new_tokens}")
    if len(r.prompt_ids) + budget > self.cfg.max_position_embeddings:
      raise ValueError(f"engine: request {r.key_id}: prompt of {len(r.prompt_ids)} tokens + {budget} new tokens "
                       f"exceeds the model's max_position_embeddings {self.cfg.max_position_embeddings}")
    return r

  def _waiting_rows(self, shard: int) -> int:
    return sum(len(p.to_admit) for p in self.waiting[shard])

  def _free_slots(self, shard: int) -> int:
    return sum(p is None for p in self.slot_prompt[shard])

  def _prefill_more(self):
    """Prefills pulled requests while some shard has more free slots than waiting rows."""
    c = self.e.config
    batch: list[list[_Prompt]] = [[] for _ in range(self.shards)]
    pulled = []
    while True:
      need = [self._free_slots(s) - self._waiting_rows(s) - sum(r.num_samples for r in batch[s])
              for s in range(self.shards)]
      shard = int(np.argmax(need))
      if need[shard] <= 0 or len(batch[shard]) >= self.prefill_batch or not self.free_logit_rows[shard]:
        break
      r = self._pull()
      if r is None:
        break
      pulled.append((shard, r))
      batch[shard].append(r)
    if not pulled:
      return
    longest = max(len(r.prompt_ids) for _, r in pulled)
    p_len = bucket(longest, PROMPT_BUCKETS)
    p_len = -(-p_len // self.page) * self.page
    if c.prefill_chunk and p_len > c.prefill_chunk:
      p_len = -(-p_len // c.prefill_chunk) * c.prefill_chunk
    self._ensure_pools(p_len)
    a = self.prefill_batch
    q = p_len // self.page
    prompt = np.full((self.shards * a, p_len), self.e.params.pad_id, np.int32)
    lens = np.ones(self.shards * a, np.int32)
    pages = np.full((self.shards * a, q), self.pages_per_shard, np.int32)  # out of range: not written
    index = np.full(self.shards * a, self.logit_rows, np.int32)
    counts = [0] * self.shards
    for shard, r in pulled:
      i = shard * a + counts[shard]
      counts[shard] += 1
      n = len(r.prompt_ids)
      prompt[i, :n], lens[i] = r.prompt_ids, n
      own = self._alloc(shard, -(-n // self.page))
      pages[i, :len(own)] = own
      row = self.free_logit_rows[shard].pop(0)
      index[i] = row
      budget = self.e.params.max_new_tokens if r.max_new_tokens is None else int(r.max_new_tokens)
      prompt_state = _Prompt(r, self.next_index, shard, own, row, budget)
      self.next_index += 1
      self.in_flight[prompt_state.index] = prompt_state
      self.waiting[shard].append(prompt_state)
    self.pools, self.prompt_logits = _prefill_jit(
        self.graphdef, self.state, self.pools, self.prompt_logits, self._put(prompt), self._put(lens),
        self._put(pages), self._put(index), page=self.page, chunk=c.prefill_chunk, row_axes=self.row_axes)
    self.counts["prefill_calls"] += 1

  def _admit(self):
    h = self.host
    for shard in range(self.shards):
      for local in range(self.slots_per_shard):
        if self.slot_prompt[shard][local] is not None:
          continue
        while self.waiting[shard] and not self.waiting[shard][0].to_admit:
          self.waiting[shard].popleft()
        if not self.waiting[shard]:
          break
        p = self.waiting[shard][0]
        j = p.to_admit.popleft()
        slot = shard * self.slots_per_shard + local
        own = self._alloc(shard, -(-p.budget // self.page))
        self.slot_prompt[shard][local] = p
        self.slot_row[slot] = j
        self.slot_pages[slot] = own
        row = np.zeros(self.table_width, np.int32)
        row[:len(p.pages)] = p.pages
        row[len(p.pages):len(p.pages) + len(own)] = own
        h["table"][slot] = row
        h["prompt_len"][slot] = len(p.request.prompt_ids)
        h["prompt_pages"][slot] = len(p.pages)
        h["generated"][slot] = 0
        h["budget"][slot] = p.budget
        key = jax.random.fold_in(jax.random.fold_in(self.rng, p.request.key_id), j)
        h["key"][slot] = np.asarray(jax.random.key_data(key))
        h["live"][slot] = True
        h["fresh"][slot] = True
        h["prompt_index"][slot] = p.logits_row
        p.running += 1
      while self.waiting[shard] and not self.waiting[shard][0].to_admit:
        self.waiting[shard].popleft()

  def _release_prompt(self, p: _Prompt):
    self.free_pages[p.shard].extend(p.pages)
    self.free_logit_rows[p.shard].append(p.logits_row)

  def loop(self) -> Iterator[list[GroupResult]]:
    c = self.e.config
    h = self.host
    ready: list[GroupResult] = []
    while True:
      self._prefill_more()
      self._admit()
      if not h["live"].any():
        if ready:
          yield ready
        if self.exhausted and not any(self.waiting):
          return
        raise RuntimeError("engine: rows wait but none could be admitted (page pool or prompt rows exhausted)")
      queued = (not self.exhausted) or any(self._waiting_rows(s) for s in range(self.shards))
      free_target = max(1, int(c.refill_fraction * self.slots_per_shard)) if queued else self.slots_per_shard + 1
      # Longest rows first (per shard, local slot ids): attention groups rows of similar length.
      used = np.where(h["live"], h["prompt_pages"] + h["generated"] // self.page, -1)
      h["order"] = np.concatenate([np.argsort(-used[s:s + self.slots_per_shard], kind="stable")
                                   for s in range(0, c.slots, self.slots_per_shard)]).astype(np.int32)
      slots = _Slots(*(self._put(h[k]) for k in ("table", "prompt_len", "prompt_pages", "generated", "budget",
                                                   "key", "live", "fresh", "prompt_index", "order")))
      before_live, before_gen = h["live"].copy(), h["generated"].copy()
      (self.pools, self.logits, gen, live, *self.tokens, steps) = _decode_jit(
          self.graphdef, self.state, self.pools, self.logits, self.prompt_logits, slots,
          jnp.asarray(c.steps_per_chunk, jnp.int32), *self.tokens, jnp.asarray(free_target, jnp.int32),
          params=self.e.params, page=self.page, per_block=c.pages_per_block, rows_per_group=c.attention_rows,
          row_axes=self.row_axes)
      if ready:  # the previous chunk's groups, handled while this chunk decodes
        yield ready
      gen, live, steps = distributed.to_host((gen, live, steps))
      gen, live = np.array(gen, np.int32), np.array(live, bool)
      made, slot_steps = int((gen - before_gen).sum()), int(np.asarray(steps).sum()) * self.slots_per_shard
      self.counts["chunks"] += 1
      self.counts["decode_steps"] += slot_steps
      self.counts["useful_steps"] += made
      self.counts["decoded_tokens"] += made
      if queued:
        self.counts["queued_decode_steps"] += slot_steps
        self.counts["queued_useful_steps"] += made
      h["generated"], h["live"], h["fresh"][:] = gen, live, False
      ready = self._collect(np.flatnonzero(before_live & ~live), gen)

  def _collect(self, finished, gen) -> list[GroupResult]:
    """Frees the slots whose rows stopped; returns the groups that are now complete, in admission order."""
    if not finished.size:
      return []
    tokens, logps = distributed.to_host(tuple(self.tokens))
    tokens, logps = np.asarray(tokens), np.asarray(logps)
    done = []
    for slot in finished:
      shard, local = divmod(int(slot), self.slots_per_shard)
      p = self.slot_prompt[shard][local]
      j, n = int(self.slot_row[slot]), int(gen[slot])
      p.tokens[j], p.logprobs[j] = tokens[slot, :n].copy(), logps[slot, :n].copy()
      p.truncated[j] = int(tokens[slot, n - 1]) not in self.e.params.stop_ids
      p.running -= 1
      p.finished += 1
      self.free_pages[shard].extend(self.slot_pages[slot])
      self.slot_pages[slot] = []
      self.slot_prompt[shard][local] = None
      self.host["table"][slot] = 0
      if p.finished == p.request.num_samples:
        self._release_prompt(p)
        del self.in_flight[p.index]
        done.append(p)
    return [GroupResult(p.request, p.tokens, p.logprobs, p.truncated) for p in sorted(done, key=lambda p: p.index)]
