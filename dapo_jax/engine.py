"""The rollout engine: continuous batching over a paged KV cache.

A fixed number of decode slots (`EngineConfig.slots`, the memory budget) decode one response each. A prompt
is prefilled once (in batches of `prefill_batch`, long prompts in pieces of `prefill_chunk` tokens) into
fixed-size pages with a page table per prompt; its G rows all read those pages (one copy per prompt). Each
slot's generated keys and values live in its row of a ring of segments (see `engine_attend`). Decoding runs
in jitted chunks of up to `steps_per_chunk` steps (one `lax.while_loop`, no Python per token); between chunks
the host frees the slots whose rows stopped and admits waiting rows into them.

    engine = Engine(params, EngineConfig(slots=64))
    out = engine.generate(model, prompts, rng, num_samples=8)      # a sampling.Rollout, prompt-major
    for done in engine.stream(model, requests, rng):               # GroupResults as their last row stops
      ...

Randomness belongs to the request: token t of sample j of the request with key id k is drawn with
`uniform(fold_in(fold_in(fold_in(rng, k), j), t))`, so what a request samples does not depend on its slot,
the step it was admitted in, or the slot count. Log-probabilities are as `sampling.sample_token` defines them.
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
from dapo_jax.sharding import logical_to_spec, row_local_axes


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
  """slots: rows decoding at once (over all devices). page_size: tokens per KV page. steps_per_chunk: decode
  steps per jitted call; a chunk also ends early once `refill_fraction` of the slots are free and rows wait.
  prefill_batch: prompts prefilled per call (0: enough to fill every slot's group). prefill_chunk: a prompt
  longer than this is prefilled in pieces of this many tokens (0: whole). attention_rows: prompts whose pages
  attention reads at a time. prompt_tokens: the prompt pages' size in tokens, per device group that decodes
  its own slots (0: room for 2 x slots / G prompts and a prefill batch at the widest prompt's bucket); a
  prompt waits for pages when they are all in use."""
  slots: int = 64
  page_size: int = 16
  steps_per_chunk: int = 64
  refill_fraction: float = 0.125
  prefill_batch: int = 0
  prefill_chunk: int = 512
  prompt_tokens: int = 0
  attention_rows: int = 8

  def __post_init__(self):
    for name in ("slots", "page_size", "steps_per_chunk", "attention_rows"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"rollout.engine.{name}: must be a positive integer, got {value!r}")
    for name in ("prefill_batch", "prefill_chunk", "prompt_tokens"):
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
  its result.

  A response continued from tokens sampled earlier (a partial rollout, `Engine.unfinished`) is a request whose
  prompt ends with them: `first_sample` is its row's sample index and `first_token` how many tokens it had,
  so its next token is drawn as token `first_token` of sample `first_sample` would have been."""
  prompt_ids: Sequence[int]
  num_samples: int
  key_id: int
  max_new_tokens: int | None = None
  tag: object = None
  first_sample: int = 0
  first_token: int = 0


class Unfinished(NamedTuple):
  """A group still decoding when its stream was closed: per row, the tokens sampled so far and their
  log-probs, and whether the row had finished (then `truncated` says how)."""
  request: Request
  tokens: list[np.ndarray]
  logprobs: list[np.ndarray]
  done: np.ndarray
  truncated: np.ndarray


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
  finished_groups: int = 0  # groups whose last row stopped
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


def segment_length(budget: int) -> int:
  """Generated keys and values live in up to 4 segments of this many tokens per slot; a step attends to the
  segments some live row has reached (as the static sampler does)."""
  return budget if budget < 32 else -(-budget // 4)


class _Slots(NamedTuple):
  """Per-slot state the host sets between chunks ([S]), sent as one int32 matrix (`pack` / `unpack`: one
  transfer a chunk)."""
  prompt_row_S: jax.Array  # int32: the row of its prompt (prompt logits, page table, members)
  generated_S: jax.Array  # int32 tokens generated so far
  budget_S: jax.Array  # int32
  key_id_S: jax.Array  # uint32: its request's key id (mod 2**32)
  sample_S: jax.Array  # int32: which of its request's samples it is
  token0_S: jax.Array  # int32: the index its request's first new token has in its sample (a continued response)
  live_S: jax.Array  # bool: decoding
  fresh_S: jax.Array  # bool: admitted since the last chunk (its logits are its prompt's)
  start_S: jax.Array  # int32: the ring column of its first generated token
  clock_S: jax.Array  # int32: its shard's ring column at the chunk's first step
  free_target_S: jax.Array  # int32: the chunk ends once this many of its shard's slots are free

  @staticmethod
  def pack(columns: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(columns[f[:-2]]).astype(np.int64).astype(np.uint32).view(np.int32)
                     for f in _Slots._fields], axis=1)

  @classmethod
  def unpack(cls, packed_SxF) -> "_Slots":
    cols = [packed_SxF[:, i] for i in range(len(cls._fields))]
    as_type = {"key_id_S": lambda x: jax.lax.bitcast_convert_type(x, jnp.uint32), "live_S": lambda x: x != 0,
               "fresh_S": lambda x: x != 0}
    return cls(*(as_type.get(f, lambda x: x)(c) for f, c in zip(cls._fields, cols)))


class _Prompts(NamedTuple):
  """Per resident prompt ([R, ...]): its pages, length and the slots of its rows; sent as two int32 matrices
  (`unpack`)."""
  table_RxQ: jax.Array  # int32 page ids (page 0: zeros)
  length_R: jax.Array  # int32
  members_RxG: jax.Array  # int32 slots of its rows (S: none)
  order_R: jax.Array  # int32: the rows with members first (attention reads those)
  active: jax.Array  # int32 [1]: how many rows have members

  @classmethod
  def unpack(cls, table_RxQ, info_RxC, slots: int) -> "_Prompts":
    """info: [length, order, members...]."""
    members_RxG = info_RxC[:, 2:]
    return cls(table_RxQ, info_RxC[:, 0], members_RxG, info_RxC[:, 1],
               jnp.sum(jnp.any(members_RxG < slots, axis=1))[None])


def engine_attend(slots: _Slots, prompts: _Prompts, gen_S, live_S, column, *, page: int, seg: int, rows: int):
  """The engine's `attend` (see `Transformer.decode_step`). A layer's cache is (prompt pages (kt, v), [gen
  segment (kt, v)]): each prompt's keys and values once, in pages, read once per step for all its rows (their
  queries gathered into one matrix), `rows` prompts at a time; each slot's generated keys and values in its
  own row of a ring of 4 segments, where every live row writes at the same `column` (a row that started at
  ring column c has its token t at c + t), so a step writes one column in place and reads only the segments
  the oldest live row spans. An online softmax joins the parts; parts a row does not have (fully masked)
  change nothing of its result, bit for bit, so a row's numbers do not depend on the other rows."""
  def attend(cfg, q_SxKxRxH, k_SxKxH, v_SxKxH, cache):
    (pkt_pool, pv_pool), segments = cache
    dt = jnp.dtype(cfg.dtype)
    s_count, kvh, r, hd = q_SxKxRxH.shape
    neg = jnp.finfo(jnp.float32).min
    scale = 1.0 / math.sqrt(hd)
    q = q_SxKxRxH.astype(dt)
    ring = seg * len(segments)
    new_segments = []
    for i, kv in enumerate(segments):
      def write(kv):
        kt, vv = kv
        off = column - i * seg
        return (jax.lax.dynamic_update_slice(kt, k_SxKxH[..., None].astype(kt.dtype), (0, 0, 0, off)),
                jax.lax.dynamic_update_slice(vv, v_SxKxH[:, :, None].astype(vv.dtype), (0, 0, off, 0)))
      new_segments.append(jax.lax.cond(column // seg == i, write, lambda kv: kv, kv))

    # The prompt part: per resident prompt, its rows' queries against its pages.
    g = prompts.members_RxG.shape[1]
    q_pages = prompts.table_RxQ.shape[1]

    def prompt_block(i, c):
      m_SxKxR, l_SxKxR, o_SxKxRxH = c
      rows_B = jax.lax.dynamic_slice_in_dim(prompts.order_R, i * rows, rows)
      members_BxG = prompts.members_RxG[rows_B]
      q_BxGxKxRxH = q[jnp.minimum(members_BxG, s_count - 1)]
      q_BxKxQxH = q_BxGxKxRxH.transpose(0, 2, 1, 3, 4).reshape(rows, kvh, g * r, hd)
      pages_BxQ = prompts.table_RxQ[rows_B]
      kt_BxQxKxHxP = pkt_pool[pages_BxQ].astype(dt)
      v_BxQxKxPxH = pv_pool[pages_BxQ].astype(dt)
      scores = jnp.einsum("bkqh,bnkhp->bkqnp", q_BxKxQxH, kt_BxQxKxHxP, preferred_element_type=jnp.float32) * scale
      pos_QxP = jnp.arange(q_pages)[:, None] * page + jnp.arange(page)[None]
      valid_BxQxP = pos_QxP[None] < prompts.length_R[rows_B][:, None, None]
      scores = jnp.where(valid_BxQxP[:, None, None], scores, neg)
      m = jnp.max(scores, axis=(-2, -1))
      p = jnp.exp(scores - m[..., None, None])
      l = jnp.sum(p, axis=(-2, -1))
      o = jnp.einsum("bkqnp,bnkph->bkqh", p.astype(dt), v_BxQxKxPxH, preferred_element_type=jnp.float32)
      to_slots = lambda x: x.reshape(rows, kvh, g, r, *x.shape[3:]).swapaxes(1, 2).reshape(
          rows * g, kvh, r, *x.shape[3:])
      dest = members_BxG.reshape(-1)  # S: none, dropped
      return (m_SxKxR.at[dest].set(to_slots(m), mode="drop"), l_SxKxR.at[dest].set(to_slots(l), mode="drop"),
              o_SxKxRxH.at[dest].set(to_slots(o), mode="drop"))

    init = (jnp.full((s_count, kvh, r), neg, jnp.float32), jnp.ones((s_count, kvh, r), jnp.float32),
            jnp.zeros((s_count, kvh, r, hd), jnp.float32))
    carry = jax.lax.fori_loop(0, (prompts.active[0] + rows - 1) // rows, prompt_block, init)

    # The generated part: the segments holding a token of some live row (the oldest live row's tokens span
    # the ring columns column - oldest .. column).
    oldest = jnp.max(jnp.where(live_S, gen_S, -1))
    for i, (kt, vv) in enumerate(new_segments):
      back = jnp.where(column // seg == i, 0, (column - (i * seg + seg - 1)) % ring)

      def segment(c, kt=kt, vv=vv, i=i):
        m_SxKxR, l_SxKxR, o_SxKxRxH = c
        scores = jnp.einsum("skrh,skhp->skrp", q, kt.astype(dt), preferred_element_type=jnp.float32) * scale
        age_SxP = (i * seg + jnp.arange(seg)[None] - slots.start_S[:, None]) % ring  # the token index there
        valid_SxP = live_S[:, None] & (age_SxP <= gen_S[:, None])
        scores = jnp.where(valid_SxP[:, None, None], scores, neg)
        m_new = jnp.maximum(m_SxKxR, jnp.max(scores, axis=-1))
        alpha = jnp.exp(m_SxKxR - m_new)
        p = jnp.exp(scores - m_new[..., None])
        pv = jnp.einsum("skrp,skph->skrh", p.astype(dt), vv.astype(dt), preferred_element_type=jnp.float32)
        return m_new, l_SxKxR * alpha + jnp.sum(p, axis=-1), o_SxKxRxH * alpha[..., None] + pv
      carry = jax.lax.cond(back <= oldest, segment, lambda c: c, carry)
    _, l_SxKxR, o_SxKxRxH = carry
    return (o_SxKxRxH / l_SxKxR[..., None]).astype(dt), ((pkt_pool, pv_pool), new_segments)
  return attend


def _decode_chunk(graphdef, state, rng, cache, logits_SxV, prompt_logits_RxV, slots_SxF, table_RxQ, info_RxC,
                  tokens_SxN, logps_SxN, *, params: SamplingParams, page: int, rows: int, steps: int):
  model: Transformer = nnx.merge(graphdef, state)
  slots = _Slots.unpack(slots_SxF)
  prompts = _Prompts.unpack(table_RxQ, info_RxC, slots_SxF.shape[0])
  clock, free_target = slots.clock_S[0], slots.free_target_S[0]
  cfg = model.cfg
  s_count, budget_n = tokens_SxN.shape
  seg = segment_length(budget_n)
  logits_SxV = jnp.where(slots.fresh_S[:, None], prompt_logits_RxV[slots.prompt_row_S], logits_SxV)
  stop_T = jnp.asarray(params.stop_ids or (-1,), jnp.int32)
  keys_S = jax.vmap(lambda k, j: jax.random.fold_in(jax.random.fold_in(rng, k), j))(slots.key_id_S, slots.sample_S)
  rope_table = model.rope_table(cfg.max_position_embeddings)
  rows_S = jnp.arange(s_count)
  prompt_len_S = prompts.length_R[slots.prompt_row_S]

  def cond(c):
    i, _, _, live_S, *_ = c
    return (i < steps) & jnp.any(live_S) & (jnp.sum(~live_S) < free_target)

  # Drawn before the loop: a live row's step i samples its token generated_S + i.
  if params.greedy:
    uniform_CxS = jnp.zeros((1, s_count), jnp.float32)
  else:
    draw = jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t), ()))
    uniform_CxS = jax.vmap(lambda i: draw(keys_S, slots.token0_S + slots.generated_S + i))(jnp.arange(steps))

  def body(c):
    i, logits_SxV, gen_S, live_S, tokens_SxN, logps_SxN, cache = c
    uniform_S = jax.lax.dynamic_index_in_dim(uniform_CxS, jnp.minimum(i, uniform_CxS.shape[0] - 1), keepdims=False)
    token_S, logp_S = sample_token(logits_SxV, uniform_S, params)
    token_S = jnp.where(live_S, token_S, params.pad_id)
    column_S = jnp.where(live_S, gen_S, budget_n)  # out of range: not written
    tokens_SxN = tokens_SxN.at[rows_S, column_S].set(token_S, mode="drop")
    logps_SxN = logps_SxN.at[rows_S, column_S].set(logp_S, mode="drop")
    # Every slot runs the step; one that is not live writes nowhere and its output is not read.
    column = (clock + i) % (seg * -(-budget_n // seg))
    attend = engine_attend(slots, prompts, gen_S, live_S, column, page=page, seg=seg, rows=rows)
    logits_SxV, cache = model.decode_step(token_S, prompt_len_S + gen_S, cache, attend, rope_table)
    stopped_S = jnp.any(token_S[:, None] == stop_T[None, :], axis=-1) | (gen_S + 1 >= slots.budget_S)
    gen_S = jnp.where(live_S, gen_S + 1, gen_S)
    return i + 1, logits_SxV, gen_S, live_S & ~stopped_S, tokens_SxN, logps_SxN, cache

  init = (jnp.zeros((), jnp.int32), logits_SxV, slots.generated_S, slots.live_S, tokens_SxN, logps_SxN, cache)
  steps_run, logits_SxV, gen_S, live_S, tokens_SxN, logps_SxN, cache = jax.lax.while_loop(cond, body, init)
  return cache, logits_SxV, gen_S, live_S, tokens_SxN, logps_SxN, steps_run


def _prefill(graphdef, state, cache, prompt_logits_RxV, prompt_AxP, prompt_len_A, pages_AxQ, index_A, *,
             page: int, chunk: int):
  """Prefills right-aligned prompts into their pages (`pages_AxQ`, out of range: not written) and stores each
  prompt's last logits at row `index_A` (out of range: dropped)."""
  model: Transformer = nnx.merge(graphdef, state)
  cfg = model.cfg
  a, p = prompt_AxP.shape
  mask_AxP = jnp.arange(p)[None] < prompt_len_A[:, None]
  positions_AxP = jnp.broadcast_to(jnp.arange(p)[None], (a, p))
  kv = KVCache.zeros(cfg, a, p)
  step = chunk if chunk and p > chunk and p % chunk == 0 else p
  last_AxD = jnp.zeros((a, cfg.hidden_size), jnp.dtype(cfg.dtype))
  for start in range(0, p, step):  # pieces attend to the earlier ones through the cache
    x_AxTxD, kv = model.hidden_with_cache(prompt_AxP[:, start:start + step], positions_AxP[:, start:start + step],
                                          kv, attn_mask_BxT=mask_AxP[:, start:start + step])
    at_A = prompt_len_A - 1 - start
    here = (at_A >= 0) & (at_A < step)
    picked = jnp.take_along_axis(x_AxTxD, jnp.clip(at_A, 0, step - 1)[:, None, None], axis=1)[:, 0]
    last_AxD = jnp.where(here[:, None], picked.astype(last_AxD.dtype), last_AxD)
  last_AxV = model.logits(last_AxD[:, None])[:, 0]  # the last position's logits only
  q = p // page
  new_cache = []
  for ((kt_pool, v_pool), segments), kt, v in zip(cache, kv.k, kv.v):
    kt_pages = kt.reshape(a, cfg.num_kv_heads, cfg.head_dim, q, page).transpose(0, 3, 1, 2, 4)
    v_pages = v.reshape(a, cfg.num_kv_heads, q, page, cfg.head_dim).transpose(0, 2, 1, 3, 4)
    new_cache.append(((kt_pool.at[pages_AxQ].set(kt_pages.astype(kt_pool.dtype), mode="drop"),
                       v_pool.at[pages_AxQ].set(v_pages.astype(v_pool.dtype), mode="drop")), segments))
  return new_cache, prompt_logits_RxV.at[index_A].set(last_AxV, mode="drop")


def _row_sharded(fn, row_axes, n_in, n_out, whole: int = 1):
  """`fn` under shard_map over `row_axes` (each shard its own slots, pages and prompts); its first `whole`
  arguments (parameters, the key) whole on every shard."""
  if not row_axes:
    return fn
  rows = P(row_axes)
  return jax.shard_map(fn, in_specs=(P(),) * whole + (rows,) * (n_in - whole), out_specs=(rows,) * n_out,
                       axis_names=set(row_axes), check_vma=False)


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "page", "rows", "steps", "row_axes"),
                   donate_argnums=(3, 4, 9, 10))
def _decode_jit(graphdef, state, rng, cache, logits_SxV, prompt_logits_RxV, slots_SxF, table_RxQ, info_RxC,
                tokens_SxN, logps_SxN, *, params, page, rows, steps, row_axes):
  def run(state, rng, cache, logits_SxV, prompt_logits_RxV, slots_SxF, table_RxQ, info_RxC, tokens_SxN, logps_SxN):
    *out, steps_run = _decode_chunk(graphdef, state, rng, cache, logits_SxV, prompt_logits_RxV, slots_SxF,
                                    table_RxQ, info_RxC, tokens_SxN, logps_SxN, params=params, page=page, rows=rows,
                                    steps=steps)
    return (*out, steps_run[None])  # one count per shard
  return _row_sharded(run, row_axes, 10, 7, whole=2)(state, rng, cache, logits_SxV, prompt_logits_RxV, slots_SxF,
                                                     table_RxQ, info_RxC, tokens_SxN, logps_SxN)


@functools.partial(jax.jit, static_argnames=("graphdef", "page", "chunk", "row_axes"), donate_argnums=(2, 3))
def _prefill_jit(graphdef, state, cache, prompt_logits_RxV, prompt_AxP, prompt_len_A, pages_AxQ, index_A, *,
                 page, chunk, row_axes):
  def run(state, cache, prompt_logits_RxV, prompt_AxP, prompt_len_A, pages_AxQ, index_A):
    return _prefill(graphdef, state, cache, prompt_logits_RxV, prompt_AxP, prompt_len_A, pages_AxQ, index_A,
                    page=page, chunk=chunk)
  return _row_sharded(run, row_axes, 7, 2)(state, cache, prompt_logits_RxV, prompt_AxP, prompt_len_A, pages_AxQ,
                                           index_A)


def _shards(row_axes) -> int:
  if not row_axes:
    return 1
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in row_axes)


def compiled_programs() -> int:
  """Engine programs compiled in this process (decode chunks and prefills)."""
  return _decode_jit._cache_size() + _prefill_jit._cache_size()


def lower_decode(model, requests: Sequence[Request], params: SamplingParams, config: EngineConfig):
  """The decode chunk program the engine runs first for `requests` (admitted and prefilled as a run would),
  lowered (`.compile().as_text()` is its optimized HLO): for reading what a decode step computes."""
  graphdef, state = nnx.split(model)
  run = _Run(Engine(params, config), graphdef, state, model.cfg, iter(requests), jax.random.key(0))
  run._prefill_more()
  run._admit()
  run.host["free_target"] = np.full(config.slots, run.slots + 1)
  run.host["clock"] = np.zeros(config.slots, np.int64)
  args, kwargs = run._decode_args()
  return _decode_jit.lower(*args, **kwargs)


def generate(model, prompts, params: SamplingParams, rng, *, num_samples: int = 1, prompt_mask=None,
             config: EngineConfig | None = None) -> Rollout:
  """`num_samples` responses to each prompt, as one call: the engine with a slot for every row (slots
  rounded up to a power of two, so that calls of similar size share programs) unless `config` is given.

  `prompts` is a list of token lists, or a left-padded int32 [B, P] array with `prompt_mask`. `model` is a
  Transformer or its `nnx.split` pair; call inside `jax.set_mesh(mesh)` to run sharded. Prompt i samples
  with fold_in(rng, i) (see `Engine`)."""
  if prompt_mask is not None:
    prompts = [np.asarray(p)[np.asarray(m, bool)].tolist() for p, m in zip(prompts, prompt_mask)]
  prompts = [list(map(int, p)) for p in prompts]
  if any(not p for p in prompts):
    raise ValueError("generate: empty prompt (a prompt needs at least one token)")
  cfg = model.cfg if isinstance(model, Transformer) else nnx.merge(*model).cfg
  longest = max(len(p) for p in prompts)
  if longest + params.max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"generate: prompt of {longest} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                     f"model's max_position_embeddings {cfg.max_position_embeddings}")
  if config is None:
    config = EngineConfig(slots=max(8, 1 << (len(prompts) * num_samples - 1).bit_length()))
  return Engine(params, config).generate(model, prompts, rng, num_samples=num_samples)


def _zeros(make, sharding):
  """`make()`'s zero arrays created on their shards (every leaf with `sharding`; None: default placement),
  by one compiled program per structure: `make` is only traced for its shapes."""
  shapes = jax.eval_shape(make)
  leaves, tree = jax.tree.flatten(shapes)
  return jax.tree.unflatten(tree, _zeros_program(tuple((x.shape, x.dtype) for x in leaves), sharding)())


@functools.lru_cache(maxsize=None)
def _zeros_program(specs, sharding):
  make = lambda: [jnp.zeros(shape, dtype) for shape, dtype in specs]
  return jax.jit(make) if sharding is None else jax.jit(make, out_shardings=sharding)


# ------------------------------------------------------------------------------------------------------ host


class _Prompt:
  """A prefilled prompt: its shard, row, pages, and its rows still to admit / finished."""

  def __init__(self, request: Request, index: int, shard: int, row: int, pages: list[int], budget: int):
    self.request, self.index, self.shard, self.row, self.pages, self.budget = request, index, shard, row, pages, budget
    g = request.num_samples
    self.to_admit = collections.deque(range(g))
    self.slots: list[int] = []  # local slots of its rows decoding now
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
    # Budgets are per row, traced: every max_new_tokens in a bucket shares one program.
    self.program_params = dataclasses.replace(params, max_new_tokens=self.budget)
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
    order they finish. Closing the generator early drops the groups in flight (`stats.dropped_groups`). A
    source may yield None for "nothing yet": it is asked again after the next decode chunk."""
    delivered = 0
    chunks = self.stream_chunks(model, requests, rng)
    try:
      for chunk in chunks:
        for result in chunk:
          delivered += 1
          yield result
    finally:
      chunks.close()
      # Groups that finished but were not read are dropped too.
      self.stats = self.stats._replace(dropped_groups=self.stats.dropped_groups + self.stats.finished_groups
                                       - delivered)

  def stream_chunks(self, model, requests: Iterable[Request], rng) -> Iterator[list[GroupResult]]:
    """As `stream`, a list per decode chunk: the groups whose last row stopped in it. A chunk's list is
    yielded once the next chunk has been dispatched, so what the caller does with it (scoring) overlaps the
    decoding."""
    graphdef, state = nnx.split(model) if isinstance(model, Transformer) else model
    cfg = nnx.merge(graphdef, state).cfg if isinstance(model, tuple) else model.cfg
    run = _Run(self, graphdef, state, cfg, iter(requests), rng)
    self._last_run = run
    try:
      yield from run.loop()
    finally:
      self.stats = run.stats()

  def unfinished(self) -> list[Unfinished]:
    """The groups the last stream left unfinished when it was closed, in the order they were taken from the
    source: those decoding (each row as far as the host had read it: a chunk still running when the stream
    closed counts for nothing), prefilled or pulled and waiting. Read after the stream's generator is closed."""
    run = getattr(self, "_last_run", None)
    return [] if run is None else run.unfinished()


class _Run:
  """One `Engine.stream` call: the host's scheduler and the device state it drives. Slots, prompt rows and
  pages are per shard (the devices that split rows each decode their own); ids below are local to a shard."""

  def __init__(self, engine: Engine, graphdef, state, cfg, requests: Iterator[Request], rng):
    self.e, self.graphdef, self.state, self.cfg, self.requests, self.rng = engine, graphdef, state, cfg, requests, rng
    c = engine.config
    mesh = jax.sharding.get_abstract_mesh()
    self.row_axes = () if mesh.empty else row_local_axes(mesh, c.slots, state)
    self.shards = _shards(self.row_axes)
    if c.slots % self.shards:
      raise ValueError(f"rollout.engine.slots={c.slots} does not divide over the {self.shards} devices that split "
                       f"rows")
    self.page, self.budget = c.page_size, engine.budget
    self.slots = c.slots // self.shards  # per shard
    self.exhausted = False
    self.peeked: Request | None = None
    self.next_index = 0
    self.counts = dict(decode_steps=0, useful_steps=0, chunks=0, prefill_calls=0, decoded_tokens=0,
                       finished_groups=0, queued_decode_steps=0, queued_useful_steps=0)
    self.in_flight: dict[int, _Prompt] = {}
    self.waiting: list[collections.deque] = [collections.deque() for _ in range(self.shards)]
    self.slot_prompt: list[list[_Prompt | None]] = [[None] * self.slots for _ in range(self.shards)]
    self.slot_row = np.zeros(c.slots, np.int32)
    s = c.slots
    self.host = dict(prompt_row=np.zeros(s, np.int32), generated=np.zeros(s, np.int32),
                     budget=np.ones(s, np.int32), key_id=np.zeros(s, np.uint32), sample=np.zeros(s, np.int32),
                     token0=np.zeros(s, np.int32), live=np.zeros(s, bool),
                     fresh=np.zeros(s, bool), start=np.zeros(s, np.int32))
    self.clock = np.zeros(self.shards, np.int64)  # decode steps run, per shard: the ring column is clock % ring
    self.started = False  # device state is made with the first prefill (its group size and prompt width)

  def stats(self) -> EngineStats:
    return EngineStats(dropped_groups=len(self.in_flight), **self.counts)

  # ---- placement

  def _mesh(self):
    return None if jax.sharding.get_abstract_mesh().empty else jax.sharding.get_mesh()

  def _row_sharding(self):
    mesh = self._mesh()
    return None if mesh is None else jax.sharding.NamedSharding(mesh, P(self.row_axes) if self.row_axes else P())

  def _slot_sharding(self, shape):
    """Per-slot device state (generated keys and values, logits, outputs): each shard's slots with it; on a
    mesh that also splits parameters (one SPMD program), slots over the batch axes and heads over `tensor`,
    so that no device holds every slot's keys and values."""
    mesh = self._mesh()
    if mesh is None or self.row_axes:
      return self._row_sharding()
    names = ("batch", "kv_heads", None, None)[:len(shape)] if len(shape) == 4 else ("batch",) + (None,) * (
        len(shape) - 1)
    return jax.sharding.NamedSharding(mesh, logical_to_spec(names, shape, mesh))

  def _put(self, x):
    """A host array, the same on every process, as a global array split by rows (each shard its own)."""
    sharding = self._row_sharding()
    return jnp.asarray(x) if sharding is None else distributed.to_global(np.asarray(x), sharding)

  def _pages_sharding(self):
    mesh = self._mesh()
    if mesh is None or self.row_axes:
      return self._row_sharding()
    tensor = mesh.shape.get("tensor", 1)
    return jax.sharding.NamedSharding(mesh, P(None, "tensor" if tensor > 1 and self.cfg.num_kv_heads % tensor == 0
                                              else None))

  # ---- device state

  def _start(self, group: int, prompt_width: int):
    """Allocates the device state: generated keys and values per slot (4 segments of the budget), prompt
    pages for `prompt_width` tokens per prompt row, logits and output rows."""
    c, cfg = self.e.config, self.cfg
    self.group = group
    self.prefill_batch = c.prefill_batch or max(1, -(-self.slots // group))
    rows = c.attention_rows
    self.prompt_rows = -(-(self.slots + self.prefill_batch) // rows) * rows  # per shard
    seg = segment_length(self.budget)
    dt = jnp.dtype(cfg.dtype)
    s, kvh, hd, v = c.slots, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    n_seg = -(-self.budget // seg)
    self.ring = n_seg * seg
    self.segments = _zeros(lambda: [[(jnp.zeros((s, kvh, hd, seg), dt), jnp.zeros((s, kvh, seg, hd), dt))
                                     for _ in range(n_seg)] for _ in range(cfg.num_layers)],
                           self._slot_sharding((s, kvh, hd, seg)))
    r_all = self.prompt_rows * self.shards
    self.logits, tokens, logps = _zeros(
        lambda: (jnp.zeros((s, v), jnp.float32), jnp.zeros((s, self.budget), jnp.int32),
                 jnp.zeros((s, self.budget), jnp.float32)), self._slot_sharding((s, v)))
    self.prompt_logits = _zeros(lambda: jnp.zeros((r_all, v), jnp.float32), self._row_sharding())
    self.tokens = [tokens, logps]
    self.free_rows = [list(range(self.prompt_rows)) for _ in range(self.shards)]
    self.prompt_host = dict(table=np.zeros((r_all, 0), np.int32), length=np.zeros(r_all, np.int32),
                            members=np.full((r_all, group), self.slots, np.int32))
    self.pages = None
    self.prompt_cap = 0
    self._grow_pages(prompt_width)
    self.started = True

  def _pool_pages(self, prompt_width: int) -> int:
    """Pages per shard (page 0, zeros, the tables' filler, included) for prompts up to `prompt_width` tokens."""
    tokens = self.e.config.prompt_tokens
    if not tokens:
      tokens = (2 * -(-self.slots // self.group) + self.prefill_batch) * prompt_width
    return 1 + -(-tokens // self.page)

  def _grow_pages(self, prompt_width: int):
    """Prompt pages and tables for prompts of up to `prompt_width` tokens; a wider prompt than any so far
    regrows them (a new program), pages in use keeping their ids."""
    if prompt_width <= self.prompt_cap:
      return
    cfg = self.cfg
    q = prompt_width // self.page
    pages = max(self._pool_pages(prompt_width), 0 if self.pages is None else self.pages_per_shard)
    old_pages = 0 if self.pages is None else self.pages_per_shard
    kshape = (pages * self.shards, cfg.num_kv_heads, cfg.head_dim, self.page)
    vshape = (pages * self.shards, cfg.num_kv_heads, self.page, cfg.head_dim)
    dt = jnp.dtype(cfg.dtype)
    new = _zeros(lambda: [(jnp.zeros(kshape, dt), jnp.zeros(vshape, dt)) for _ in range(cfg.num_layers)],
                 self._pages_sharding())
    if self.pages is None:
      self.free_pages = [list(range(1, pages)) for _ in range(self.shards)]
    else:
      dst = np.concatenate([np.arange(old_pages) + sh * pages for sh in range(self.shards)])
      src = np.concatenate([np.arange(old_pages) + sh * old_pages for sh in range(self.shards)])
      new = [(nk.at[dst].set(ok[src]), nv.at[dst].set(ov[src])) for (nk, nv), (ok, ov) in zip(new, self.pages)]
      for sh in range(self.shards):
        self.free_pages[sh].extend(range(old_pages, pages))
    self.pages, self.pages_per_shard, self.prompt_cap = new, pages, prompt_width
    table = np.zeros((self.prompt_rows * self.shards, q), np.int32)
    old = self.prompt_host["table"]
    table[:, :old.shape[1]] = old
    self.prompt_host["table"] = table

  def _grow_group(self, group: int):
    if group > self.group:
      members = np.full((self.prompt_rows * self.shards, group), self.slots, np.int32)
      members[:, :self.group] = self.prompt_host["members"]
      self.prompt_host["members"], self.group = members, group

  # ---- scheduling

  def _peek(self) -> Request | None:
    """The next request, not yet taken (`_take`)."""
    if self.peeked is None and not self.exhausted:
      self.peeked = self._pull()
    return self.peeked

  def _take(self) -> Request:
    r, self.peeked = self.peeked, None
    return r

  def _fits(self, shard: int, r: Request, batch: list[Request]) -> bool:
    """Whether `r`'s prompt pages are free on `shard` beside those `batch` takes (the pool as it would grow
    for its width)."""
    width = max([self._width(len(x.prompt_ids)) for x in batch + [r]] + [self.prompt_cap])
    grow = max(self._pool_pages(width) - self.pages_per_shard, 0) if self.e.config.prompt_tokens == 0 else 0
    need = sum(-(-len(x.prompt_ids) // self.page) for x in batch + [r])
    if need <= len(self.free_pages[shard]) + grow:
      return True
    if not batch and not any(p.to_admit or p.slots for p in self.in_flight.values() if p.shard == shard):
      raise ValueError(f"engine: request {r.key_id}'s prompt of {len(r.prompt_ids)} tokens does not fit the prompt "
                       f"pages (rollout.engine.prompt_tokens={self.e.config.prompt_tokens})")
    return False

  def _pull(self) -> Request | None:
    """The source's next request; None when it has ended, or has none yet (it yielded None: asked again
    after the next chunk)."""
    if self.exhausted:
      return None
    try:
      r = next(self.requests)
    except StopIteration:
      self.exhausted = True
      return None
    if r is None:
      return None
    if not len(r.prompt_ids):
      raise ValueError(f"engine: request {r.key_id} has an empty prompt (a prompt needs at least one token)")
    if r.num_samples <= 0:
      raise ValueError(f"engine: request {r.key_id} asks for {r.num_samples} samples")
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
    """Prefills pulled requests while some shard has more free slots than rows waiting for one."""
    c = self.e.config
    batch: list[list[Request]] = [[] for _ in range(self.shards)]
    while True:
      need = [self._free_slots(sh) - self._waiting_rows(sh) - sum(r.num_samples for r in batch[sh])
              for sh in range(self.shards)]
      shard = int(np.argmax(need))
      if need[shard] <= 0:
        break
      if self.started and (len(batch[shard]) >= self.prefill_batch
                           or len(batch[shard]) >= len(self.free_rows[shard])):
        break
      r = self._peek()
      if r is None:
        break
      if not self.started:
        self._start(r.num_samples, self._width(len(r.prompt_ids)))
      if not self._fits(shard, r, batch[shard]):
        break
      batch[shard].append(self._take())
    pulled = [(sh, r) for sh in range(self.shards) for r in batch[sh]]
    if not pulled:
      return
    self._grow_group(max(r.num_samples for _, r in pulled))
    width = self._width(max(len(r.prompt_ids) for _, r in pulled))
    self._grow_pages(width)
    a = self.prefill_batch
    prompt = np.full((self.shards * a, width), self.e.params.pad_id, np.int32)
    lens = np.ones(self.shards * a, np.int32)
    pages = np.full((self.shards * a, width // self.page), self.pages_per_shard, np.int32)  # not written
    index = np.full(self.shards * a, self.prompt_rows, np.int32)  # dropped
    for sh in range(self.shards):
      for k, r in enumerate(batch[sh]):
        i, n = sh * a + k, len(r.prompt_ids)
        prompt[i, :n], lens[i] = r.prompt_ids, n
        own = self.free_pages[sh][:-(-n // self.page)]
        del self.free_pages[sh][:len(own)]
        pages[i, :len(own)] = own
        row = self.free_rows[sh].pop(0)
        index[i] = row
        g = sh * self.prompt_rows + row
        self.prompt_host["table"][g] = 0
        self.prompt_host["table"][g, :len(own)] = own
        self.prompt_host["length"][g] = n
        budget = self.e.params.max_new_tokens if r.max_new_tokens is None else int(r.max_new_tokens)
        prompt_state = _Prompt(r, self.next_index, sh, row, own, budget)
        self.next_index += 1
        self.in_flight[prompt_state.index] = prompt_state
        self.waiting[sh].append(prompt_state)
    self.pages, self.prompt_logits = _prefill_jit(
        self.graphdef, self.state, [(p, None) for p in self.pages], self.prompt_logits, self._put(prompt),
        self._put(lens), self._put(pages), self._put(index), page=self.page, chunk=c.prefill_chunk,
        row_axes=self.row_axes)
    self.pages = [p for p, _ in self.pages]
    self.counts["prefill_calls"] += 1

  def _width(self, longest: int) -> int:
    """The prefill width of a prompt of `longest` tokens: its bucket, in whole pages and prefill pieces."""
    width = -(-bucket(longest, PROMPT_BUCKETS) // self.page) * self.page
    chunk = self.e.config.prefill_chunk
    return -(-width // chunk) * chunk if chunk and width > chunk else width

  def _admit(self):
    h = self.host
    for sh in range(self.shards):
      for local in range(self.slots):
        if self.slot_prompt[sh][local] is not None:
          continue
        while self.waiting[sh] and not self.waiting[sh][0].to_admit:
          self.waiting[sh].popleft()
        if not self.waiting[sh]:
          break
        p = self.waiting[sh][0]
        j = p.to_admit.popleft()
        slot = sh * self.slots + local
        self.slot_prompt[sh][local] = p
        self.slot_row[slot] = j
        p.slots.append(local)
        h["prompt_row"][slot] = p.row
        h["generated"][slot] = 0
        h["budget"][slot] = p.budget
        h["key_id"][slot] = p.request.key_id % 2**32
        h["sample"][slot] = p.request.first_sample + j
        h["token0"][slot] = p.request.first_token
        h["live"][slot] = True
        h["fresh"][slot] = True
        h["start"][slot] = self.clock[sh] % self.ring
        self._set_members(p)
      while self.waiting[sh] and not self.waiting[sh][0].to_admit:
        self.waiting[sh].popleft()

  def _set_members(self, p: _Prompt):
    g = p.shard * self.prompt_rows + p.row
    self.prompt_host["members"][g] = self.slots
    self.prompt_host["members"][g, :len(p.slots)] = p.slots

  def _prompt_info(self) -> np.ndarray:
    """[length, order, members...] per prompt row (see `_Prompts.unpack`); order lists each shard's rows with
    members first."""
    ph = self.prompt_host
    order = []
    for sh in range(self.shards):
      rows = ph["members"][sh * self.prompt_rows:(sh + 1) * self.prompt_rows]
      order.append(np.argsort(~(rows < self.slots).any(axis=1), kind="stable"))
    return np.concatenate([ph["length"][:, None], np.concatenate(order)[:, None], ph["members"]], axis=1
                          ).astype(np.int32)

  def _decode_args(self) -> tuple[tuple, dict]:
    """The next decode chunk's arguments (`_decode_jit`)."""
    c = self.e.config
    cache = [(pages, segs) for pages, segs in zip(self.pages, self.segments)]
    return ((self.graphdef, self.state, self.rng, cache, self.logits, self.prompt_logits,
             self._put(_Slots.pack(self.host)), self._put(self.prompt_host["table"]), self._put(self._prompt_info()),
             *self.tokens),
            dict(params=self.e.program_params, page=self.page, rows=c.attention_rows, steps=c.steps_per_chunk,
                 row_axes=self.row_axes))

  def loop(self) -> Iterator[list[GroupResult]]:
    c = self.e.config
    h = self.host
    ready: list[GroupResult] = []
    while True:
      self._prefill_more()
      self._admit()
      if not h["live"].any():
        if ready:  # what the consumer does with them may let the source give more: ask again
          yield ready
          ready = []
          continue
        if self.exhausted and self.peeked is None and not any(self.waiting):
          return
        raise RuntimeError("engine: nothing is decoding and the request source has nothing yet (it yields None "
                           "only while rows decode) or rows wait but none could be admitted")
      queued = (not self.exhausted or self.peeked is not None
                or any(self._waiting_rows(sh) for sh in range(self.shards)))
      # While requests may come, a chunk ends once refill_fraction of a shard's slots more have freed up.
      free_S = np.repeat((~h["live"]).reshape(self.shards, self.slots).sum(axis=1), self.slots)
      target = max(1, int(c.refill_fraction * self.slots))
      h["free_target"] = free_S + target if queued else np.full(c.slots, self.slots + 1)
      h["clock"] = np.repeat(self.clock % self.ring, self.slots)
      before_live, before_gen = h["live"].copy(), h["generated"].copy()
      args, kwargs = self._decode_args()
      (cache, self.logits, gen, live, *self.tokens, steps) = _decode_jit(*args, **kwargs)
      self.pages, self.segments = [p for p, _ in cache], [s for _, s in cache]
      if ready:  # the previous chunk's groups, handled while this chunk decodes
        yield ready
      gen, live, steps = distributed.to_host((gen, live, steps))
      gen, live = np.array(gen, np.int32), np.array(live, bool)
      self.clock += np.asarray(steps).reshape(-1)
      made, slot_steps = int((gen - before_gen).sum()), int(np.asarray(steps).sum()) * self.slots
      self.counts["chunks"] += 1
      self.counts["decode_steps"] += slot_steps
      self.counts["useful_steps"] += made
      self.counts["decoded_tokens"] += made
      if queued:
        self.counts["queued_decode_steps"] += slot_steps
        self.counts["queued_useful_steps"] += made
      h["generated"], h["live"], h["fresh"][:] = gen, live, False
      ready = self._collect(np.flatnonzero(before_live & ~live), gen)

  def unfinished(self) -> list[Unfinished]:
    out = []
    tokens = logps = None
    if any(p.slots for p in self.in_flight.values()):
      tokens, logps = (np.asarray(x) for x in distributed.to_host(tuple(self.tokens)))
    for p in sorted(self.in_flight.values(), key=lambda p: p.index):
      g = p.request.num_samples
      rows_t, rows_l = [], []
      for j in range(g):
        if p.tokens[j] is not None:
          rows_t.append(p.tokens[j])
          rows_l.append(p.logprobs[j])
          continue
        slot = next((p.shard * self.slots + local for local in p.slots
                     if self.slot_row[p.shard * self.slots + local] == j), None)
        n = 0 if slot is None else int(self.host["generated"][slot])
        rows_t.append(np.zeros(0, np.int32) if slot is None else tokens[slot, :n].copy())
        rows_l.append(np.zeros(0, np.float32) if slot is None else logps[slot, :n].copy())
      done = np.asarray([t is not None for t in p.tokens], bool)
      out.append(Unfinished(p.request, rows_t, rows_l, done, p.truncated.copy()))
    if self.peeked is not None:
      r = self.peeked
      out.append(Unfinished(r, [np.zeros(0, np.int32)] * r.num_samples, [np.zeros(0, np.float32)] * r.num_samples,
                            np.zeros(r.num_samples, bool), np.zeros(r.num_samples, bool)))
    return out

  def _collect(self, finished, gen) -> list[GroupResult]:
    """Frees the slots whose rows stopped; returns the groups that are now complete, in admission order."""
    if not finished.size:
      return []
    tokens, logps = distributed.to_host(tuple(self.tokens))
    tokens, logps = np.asarray(tokens), np.asarray(logps)
    done = []
    for slot in finished:
      sh, local = divmod(int(slot), self.slots)
      p = self.slot_prompt[sh][local]
      j, n = int(self.slot_row[slot]), int(gen[slot])
      p.tokens[j], p.logprobs[j] = tokens[slot, :n].copy(), logps[slot, :n].copy()
      p.truncated[j] = int(tokens[slot, n - 1]) not in self.e.params.stop_ids
      p.finished += 1
      p.slots.remove(local)
      self._set_members(p)
      self.slot_prompt[sh][local] = None
      if p.finished == p.request.num_samples:
        self.free_pages[sh].extend(p.pages)
        self.free_rows[sh].append(p.row)
        del self.in_flight[p.index]
        self.counts["finished_groups"] += 1
        done.append(p)
    return [GroupResult(p.request, p.tokens, p.logprobs, p.truncated) for p in sorted(done, key=lambda p: p.index)]
