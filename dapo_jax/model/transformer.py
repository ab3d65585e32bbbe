"""A decoder-only transformer in Flax NNX covering Qwen2 / Qwen2.5, Llama 3 and Qwen3.

Every parameter is created with logical axis names (`nnx.with_partitioning`); `dapo_jax.sharding.RULES`
maps them to the mesh. Kernels are stored as [in, ..., out] so the forward pass is plain einsums; the
Hugging Face layout ([out, in]) is translated on load and save (`hf_io.py`).

The KV cache holds one array per layer (keys [B, KV, hd, S], values [B, KV, S, hd]) updated in place with
dynamic_update_slice: both choices were measured to decide decode speed on CPU (benchmarks/sampler_bench.py).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dapo_jax.model.config import ModelConfig
from dapo_jax.sharding import constrain

_INIT = nnx.initializers.normal(stddev=0.02)


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
  # Eager sharding is off: models are created inside jax.jit with out_shardings (see model.init_sharded),
  # which never builds an unsharded copy, and logical names are not mesh axes.
  return nnx.Param(nnx.with_partitioning(init, names, eager_sharding=False)(rngs.params(), shape, dtype))


class KVCache(NamedTuple):
  """Per-layer keys [B, KV, hd, S] (transposed) and values [B, KV, S, hd], and which of the S slots hold
  real tokens.

  `index` is the next slot to write. Rows share it: prompts are left-padded so that every row's
  sequence ends at the same slot.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid_BxS: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    dtype = jnp.dtype(dtype or cfg.dtype)
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers))
    v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers))
    return cls(k, v, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
    self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
    self.eps = eps

  def __call__(self, x):
    # As Hugging Face: normalise in float32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(x.dtype)
    return y.astype(x.dtype) * scale.reshape((1,) * (x.ndim - 1) + scale.shape)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  hd = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  s = cfg.rope_scaling
  if s is None:
    return inv_freq
  # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
  old = s.original_max_position_embeddings
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old / s.low_freq_factor, inv_freq / s.factor, inv_freq)
  smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= old / s.high_freq_factor) & (wavelen <= old / s.low_freq_factor)
  return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: ModelConfig, positions):
  """cos and sin of the rotation angles at integer `positions` (any shape), each [..., head_dim / 2]."""
  inv_freq = rope_inv_freq(cfg)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq.reshape((1,) * positions.ndim + inv_freq.shape)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxTxNxH, cos_BxTxH2, sin_BxTxH2):
  # Rotate-half convention (first half / second half), as the Hugging Face Qwen and Llama code.
  h2 = x_BxTxNxH.shape[-1] // 2
  x1, x2 = x_BxTxNxH[..., :h2], x_BxTxNxH[..., h2:]
  cos = cos_BxTxH2[:, :, None, :].astype(x_BxTxNxH.dtype)
  sin = sin_BxTxH2[:, :, None, :].astype(x_BxTxNxH.dtype)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def split(x, sizes: tuple[int, ...], axis: int):
  """`x` cut into pieces of `sizes` along `axis`, whose gradient is the pieces' gradients concatenated: JAX's
  own (each piece's gradient padded to the whole, then summed) cost the update step ~8% on CPU."""
  return tuple(jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=axis))


def _split_fwd(x, sizes, axis):
  return split(x, sizes, axis), None


def _split_bwd(sizes, axis, _, grads):
  return (jnp.concatenate(grads, axis=axis),)


split.defvjp(_split_fwd, _split_bwd)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, k, hd, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.q_kernel = _param(rngs, _INIT, (d, h, hd), ("embed", "q_heads", "head_dim"), pd)
    self.k_kernel = _param(rngs, _INIT, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd)
    self.v_kernel = _param(rngs, _INIT, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd)
    self.o_kernel = _param(rngs, _INIT, (h, hd, d), ("q_heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      zeros = nnx.initializers.zeros
      self.q_bias = _param(rngs, zeros, (h, hd), ("q_heads", "head_dim"), pd)
      self.k_bias = _param(rngs, zeros, (k, hd), ("kv_heads", "head_dim"), pd)
      self.v_bias = _param(rngs, zeros, (k, hd), ("kv_heads", "head_dim"), pd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, pd, rngs=rngs)
      self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, pd, rngs=rngs)

  def _qkv(self, x_BxTxD, cos, sin, decode: bool = False):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    x = x_BxTxD.astype(dt)
    d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    b, t = x.shape[:2]
    # One matmul instead of three. The kernel depends only on the weights: XLA hoists it out of a decode loop.
    if decode:
      # q | k | v side by side, each piece contiguous: a decode step is many small ops, and cutting pieces
      # out of the grouped layout below cost it ~14% at model S on CPU.
      w = jnp.concatenate([self.q_kernel[...].reshape(d, h * hd), self.k_kernel[...].reshape(d, kvh * hd),
                           self.v_kernel[...].reshape(d, kvh * hd)], axis=1).astype(dt)
      q, k, v = jnp.split(jnp.einsum("btd,de->bte", x, w), [h * hd, (h + kvh) * hd], axis=-1)
      q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kvh, hd), v.reshape(b, t, kvh, hd)
    else:
      # Each KV head's G query heads, its key and its value side by side ([D, KV, G + 2, hd]), so that a mesh
      # splitting heads splits the three kernels alike; the update step ran ~5% faster on CPU than with three.
      g = h // kvh
      w = jnp.concatenate([self.q_kernel[...].reshape(d, kvh, g, hd), self.k_kernel[...][:, :, None],
                           self.v_kernel[...][:, :, None]], axis=2).astype(dt)
      q, k, v = split(jnp.einsum("btd,dkgh->btkgh", x, w), (g, 1, 1), axis=3)
      q, k, v = q.reshape(b, t, h, hd), k[:, :, :, 0], v[:, :, :, 0]
    if cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dt)[None, None]
      k = k + self.k_bias[...].astype(dt)[None, None]
      v = v + self.v_bias[...].astype(dt)[None, None]
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def __call__(self, x_BxTxD, cos, sin, mask_BxTxS, kv=None, index=None, segment_BxT=None):
    """Without a cache: attention within each row's segments (`segment_BxT`, see `Transformer.__call__`),
    causal. With `kv` = (k_BxKxHxS, v_BxKxSxH), the new keys/values are written at slot `index` and the
    queries attend over the whole cache under `mask_BxTxS`; returns (out_BxTxD, (k, v))."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    x = x_BxTxD.astype(dt)
    q, k, v = self._qkv(x, cos, sin)
    if kv is None:
      out = attend_segments(cfg, q, k, v, segment_BxT)
    else:
      # Keys are kept transposed, [B, KV, hd, S]: q @ k then needs no transpose of the whole cache per step,
      # which on CPU made decode attention ~4x slower. Values stay [B, KV, S, hd].
      kt_cache, v_cache = kv
      kt_BxKxHxT = jax.lax.dynamic_update_slice(kt_cache, k.transpose(0, 2, 3, 1).astype(kt_cache.dtype),
                                                (0, 0, 0, index))
      v_BxKxTxH = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype),
                                               (0, 0, index, 0))
      out = _attend(cfg, q, kt_BxKxHxT, v_BxKxTxH, mask_BxTxS, dt)
    out_BxTxD = jnp.einsum("btnh,nhd->btd", out, self.o_kernel[...].astype(dt))
    return out_BxTxD, (None if kv is None else (kt_BxKxHxT, v_BxKxTxH))

  def decode(self, x_Bx1xD, cos, sin, cache, attend):
    """One new token per row. `attend(cfg, q_BxKxRxH, k_BxKxH, v_BxKxH, cache)` stores the new key and value
    in `cache` and attends over it, returning (out_BxKxRxH, new cache): the sampler's cache layout lives in
    `engine.engine_attend`, the rest of a step here."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    q, k, v = self._qkv(x_Bx1xD.astype(dt), cos, sin, decode=True)
    b, kvh, hd = q.shape[0], cfg.num_kv_heads, cfg.head_dim
    out, cache = attend(cfg, q.reshape(b, kvh, cfg.num_heads // kvh, hd), k[:, 0], v[:, 0], cache)
    # As one [B, N*hd] x [N*hd, D] matmul: the einsum over (heads, head_dim) made XLA transpose the whole
    # output kernel inside the decode loop, every step.
    nh = cfg.num_heads * hd
    out_BxD = jnp.dot(out.reshape(b, nh).astype(dt), self.o_kernel[...].astype(dt).reshape(nh, cfg.hidden_size))
    return out_BxD[:, None], cache


def attention_impl(cfg: ModelConfig) -> str:
  """The kernel `attend_segments` runs: `cfg.attention_impl`, where "auto" is cuDNN's fused attention on
  GPUs in 16-bit compute, the Pallas flash kernel (with segment ids) on TPUs, and XLA's einsums elsewhere."""
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  backend = jax.default_backend()
  if backend == "gpu" and jnp.dtype(cfg.dtype).itemsize == 2:
    return "cudnn"
  if backend == "tpu":
    return "pallas_tpu"
  return "xla"


def attend_segments(cfg: ModelConfig, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT):
  """Causal attention in which a query sees only the keys of its own segment: packed rows never see each
  other, and padding (segment 0) sees only padding. With `cfg.attention_chunk` the queries go in blocks, each
  recomputed in the backward pass, so scores never exist for the whole sequence."""
  b, t = q_BxTxNxH.shape[:2]
  impl = attention_impl(cfg)
  if impl == "pallas_tpu":
    return _flash_tpu(cfg, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT)
  kernel = None if impl == "xla" else impl
  chunk = cfg.attention_chunk
  if not (chunk and t > chunk and t % chunk == 0):
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=_segment_mask(segment_BxT, 0, t),
                                        implementation=kernel)
  n = t // chunk

  def block(args):
    q_blk, start = args
    mask = _segment_mask(segment_BxT, start, chunk)
    return jax.nn.dot_product_attention(q_blk, k_BxTxKxH, v_BxTxKxH, mask=mask, implementation=kernel)

  q_blocks = q_BxTxNxH.reshape(b, n, chunk, *q_BxTxNxH.shape[2:]).swapaxes(0, 1)
  out = jax.lax.map(jax.checkpoint(block), (q_blocks, jnp.arange(n) * chunk))
  return out.swapaxes(0, 1).reshape(q_BxTxNxH.shape)


def _segment_mask(segment_BxT, start, length: int):
  """[B, 1, length, T]: queries start .. start+length-1 against every key, same segment and not later."""
  t = segment_BxT.shape[1]
  seg_q = jax.lax.dynamic_slice_in_dim(segment_BxT, start, length, axis=1)
  causal = (start + jnp.arange(length))[:, None] >= jnp.arange(t)[None, :]
  return ((seg_q[:, :, None] == segment_BxT[:, None, :]) & causal[None])[:, None]


def _flash_tpu(cfg: ModelConfig, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT):
  # The Pallas TPU flash kernel takes segment ids directly and skips the blocks they mask; it wants as many
  # key heads as query heads.
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  g = cfg.num_heads // cfg.num_kv_heads
  q = q_BxTxNxH.transpose(0, 2, 1, 3)
  k = jnp.repeat(k_BxTxKxH, g, axis=2).transpose(0, 2, 1, 3)
  v = jnp.repeat(v_BxTxKxH, g, axis=2).transpose(0, 2, 1, 3)
  seg = segment_BxT.astype(jnp.int32)
  out = fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(seg, seg), causal=True,
                           sm_scale=1.0 / math.sqrt(cfg.head_dim))
  return out.transpose(0, 2, 1, 3)


def _attend(cfg: ModelConfig, q_BxTxNxH, kt_BxKxHxS, v_BxKxSxH, mask_BxTxS, dt):
  b, t = q_BxTxNxH.shape[:2]
  kvh, g, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
  s = v_BxKxSxH.shape[2]
  # The G query heads sharing a KV head and the T positions form one matrix per (row, KV head).
  q_BxKxQxH = q_BxTxNxH.reshape(b, t, kvh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, hd)
  scores = jnp.einsum("bkqh,bkhs->bkqs", q_BxKxQxH, kt_BxKxHxS.astype(dt),
                      preferred_element_type=jnp.float32) * (1.0 / math.sqrt(hd))
  scores = scores.reshape(b, kvh, g, t, s)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(b, kvh, g * t, s)
  out = jnp.einsum("bkqs,bksh->bkqh", probs, v_BxKxSxH.astype(dt))
  return out.reshape(b, kvh, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads, hd)


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f, pd = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.param_dtype)
    self.dtype = jnp.dtype(cfg.dtype)
    self.gate_kernel = _param(rngs, _INIT, (d, f), ("embed", "mlp"), pd)
    self.up_kernel = _param(rngs, _INIT, (d, f), ("embed", "mlp"), pd)
    self.down_kernel = _param(rngs, _INIT, (f, d), ("mlp", "embed"), pd)

  def __call__(self, x_BxTxD):
    dt = self.dtype
    x = x_BxTxD.astype(dt)
    # Gate and up in one matmul, stacked ([D, 2, F]) so that a mesh splitting F splits both alike.
    w = jnp.stack([self.gate_kernel[...], self.up_kernel[...]], axis=1).astype(dt)
    gate, up = split(jnp.einsum("btd,dcf->btcf", x, w), (1, 1), axis=2)
    hidden = jax.nn.silu(gate[:, :, 0]) * up[:, :, 0]
    return jnp.einsum("btf,fd->btd", hidden, self.down_kernel[...].astype(dt))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxTxD, cos, sin, mask_BxTxS=None, kv=None, index=None, segment_BxT=None):
    h, kv = self.attn(self.attn_norm(x_BxTxD), cos, sin, mask_BxTxS, kv, index, segment_BxT)
    x_BxTxD = x_BxTxD + h.astype(x_BxTxD.dtype)
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)).astype(x_BxTxD.dtype)
    return constrain(x_BxTxD, ("batch", "length", "act_embed")), kv

  def decode(self, x_Bx1xD, cos, sin, cache, attend):
    h, kv = self.attn.decode(self.attn_norm(x_Bx1xD), cos, sin, cache, attend)
    x_Bx1xD = x_Bx1xD + h.astype(x_Bx1xD.dtype)
    x_Bx1xD = x_Bx1xD + self.mlp(self.mlp_norm(x_Bx1xD)).astype(x_Bx1xD.dtype)
    return constrain(x_Bx1xD, ("batch", "length", "act_embed")), kv


class Transformer(nnx.Module):
  """`model(tokens_BxT)` -> float32 logits_BxTxV.

  `positions_BxT` default to 0..T-1, or to the running count of real tokens when `attn_mask_BxT` marks
  left padding. `forward_with_cache` is the incremental form used by the sampler.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embedding = _param(rngs, _INIT, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, _INIT, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

  def __call__(self, tokens_BxT, positions_BxT=None, attn_mask_BxT=None, segment_BxT=None):
    """Padded rows (`attn_mask_BxT` marks the real tokens) or packed ones: `segment_BxT` numbers the rows
    packed into each buffer row (1, 2, ...; 0 is padding), tokens attend within their own segment only, and
    `positions_BxT` (required then) restart at 0 with each segment."""
    b, t = tokens_BxT.shape
    if segment_BxT is None:
      attn_mask_BxT = jnp.ones((b, t), bool) if attn_mask_BxT is None else attn_mask_BxT.astype(bool)
      if positions_BxT is None:
        positions_BxT = default_positions(attn_mask_BxT)
      segment_BxT = attn_mask_BxT.astype(jnp.int32)  # padding is segment 0: no real token sees it
    elif positions_BxT is None:
      raise ValueError("Transformer: packed rows (segment_BxT) need their positions_BxT")
    x, _ = self._body(tokens_BxT, positions_BxT, None, None, segment_BxT)
    return self.logits(x)

  def forward_with_cache(self, tokens_BxT, positions_BxT, cache: KVCache, attn_mask_BxT=None):
    """Writes T new tokens at slot `cache.index`; they attend to every valid earlier slot and causally
    among themselves. Returns (logits_BxTxV, updated cache)."""
    x, cache = self.hidden_with_cache(tokens_BxT, positions_BxT, cache, attn_mask_BxT)
    return self.logits(x), cache

  def hidden_with_cache(self, tokens_BxT, positions_BxT, cache: KVCache, attn_mask_BxT=None):
    """`forward_with_cache` up to the final norm: (hidden_BxTxD, updated cache), for callers that need the
    logits of a few positions only (a prefill needs the last)."""
    b, t = tokens_BxT.shape
    s = cache.valid_BxS.shape[1]
    if attn_mask_BxT is None:
      attn_mask_BxT = jnp.ones((b, t), bool)
    valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, attn_mask_BxT.astype(bool), (0, cache.index))
    q_slot_T = cache.index + jnp.arange(t)
    causal_TxS = jnp.arange(s)[None, :] <= q_slot_T[:, None]
    mask_BxTxS = causal_TxS[None] & valid_BxS[:, None, :]
    x, kvs = self._body(tokens_BxT, positions_BxT, mask_BxTxS, (cache.k, cache.v, cache.index), None)
    k, v = zip(*kvs)
    return x, KVCache(tuple(k), tuple(v), valid_BxS, cache.index + t)

  def decode_step(self, token_B, position_B, cache_per_layer, attend, rope_table):
    """A sampler's step: one token per row, whose key and value `attend` stores in each layer's cache and
    attends over (see `Attention.decode`); `rope_table` is `self.rope_table(n)` for every position below n.
    Returns (logits_BxV, [each layer's new cache])."""
    x = self._embed_tokens(token_B[:, None])
    # Rows of a table made once before the decode loop: computed here, cos and sin were fused into (and
    # recomputed by) every layer's rotation, ~10% of a step on CPU.
    cos_table, sin_table = rope_table
    cos = jnp.take(cos_table, position_B, axis=0)[:, None]
    sin = jnp.take(sin_table, position_B, axis=0)[:, None]
    new_kv = []
    for layer, cache in zip(self.layers, cache_per_layer):
      x, kv = layer.decode(x, cos, sin, cache, attend)
      new_kv.append(kv)
    return self.logits(self.final_norm(x))[:, 0], new_kv

  def rope_table(self, length: int):
    """(cos, sin) of every position below `length`, each [length, head_dim / 2] float32."""
    return rope_cos_sin(self.cfg, jnp.arange(length))

  def _embed_tokens(self, tokens_BxT):
    x = jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(jnp.dtype(self.cfg.dtype))
    return constrain(x, ("batch", "length", "act_embed"))

  def _embed(self, tokens_BxT, positions_BxT):
    return (self._embed_tokens(tokens_BxT), *rope_cos_sin(self.cfg, positions_BxT))

  def _body(self, tokens_BxT, positions_BxT, mask_BxTxS, kv, segment_BxT):
    cfg = self.cfg
    x, cos, sin = self._embed(tokens_BxT, positions_BxT)
    new_kv = []
    for i, layer in enumerate(self.layers):
      if kv is None and cfg.remat:
        # Keep only each layer's input for the backward pass; recompute the rest. A pure jax.checkpoint over
        # the layer's state (merged inside): nnx.remat on the module itself fails when the model was merged
        # outside an enclosing lax.map / scan, as the trainer's micro-batch loops do.
        layer_def, layer_state = nnx.split(layer)
        x, out_kv = jax.checkpoint(
            lambda st, h, layer_def=layer_def: nnx.merge(layer_def, st)(h, cos, sin, segment_BxT=segment_BxT)
        )(layer_state, x)
      else:
        layer_kv = None if kv is None else (kv[0][i], kv[1][i])
        x, out_kv = layer(x, cos, sin, mask_BxTxS, layer_kv, None if kv is None else kv[2], segment_BxT)
      new_kv.append(out_kv)
    return self.final_norm(x), new_kv

  def logits(self, x_BxTxD):
    dt = jnp.dtype(self.cfg.dtype)
    if self.cfg.tie_word_embeddings:
      logits = jnp.einsum("btd,vd->btv", x_BxTxD.astype(dt), self.embedding[...].astype(dt),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("btd,dv->btv", x_BxTxD.astype(dt), self.lm_head[...].astype(dt),
                          preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab"))


def default_positions(attn_mask_BxT):
  """Position of each token among the real (unmasked) tokens of its row; left padding gets 0."""
  return jnp.maximum(jnp.cumsum(attn_mask_BxT.astype(jnp.int32), axis=1) - 1, 0)
