"""The policy against transformers on the same random weights, and its own invariants."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import model as M
from dapo_jax import sharding
from dapo_jax.testing import hf_logits, save_tiny_hf_model

ONE_DEVICE = sharding.make_mesh(devices=jax.devices()[:1])
ONE = ONE_DEVICE


def _tokens(b, t, vocab=128, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)


@pytest.mark.parametrize("arch,tie,shards", [
    ("qwen2", True, None), ("qwen2", False, None), ("qwen2", False, "40KB"),
    ("llama", False, None), ("qwen3", True, None)])
def test_logits_match_transformers(tmp_path, arch, tie, shards):
  hf = save_tiny_hf_model(tmp_path, arch, tie=tie, max_shard_size=shards)
  if shards:
    # The sharded layout is really exercised: an index naming every tensor, spread over 3+ files.
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files and len(files) > 2
    assert sorted(index["weight_map"]) == sorted(hf.state_dict())
    assert not (tmp_path / "model.safetensors").exists()
  model, cfg = M.load_hf(tmp_path, dtype="float32")
  hc = hf.config
  assert cfg.architecture == arch and cfg.tie_word_embeddings == tie
  assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
          cfg.rms_norm_eps) == (hc.vocab_size, hc.hidden_size, hc.intermediate_size, hc.num_hidden_layers,
                                hc.num_attention_heads, hc.num_key_value_heads, hc.rms_norm_eps)
  if tie:
    assert not hasattr(model, "lm_head")  # the embedding is the head
  else:
    assert model.lm_head.get_value().shape == (cfg.hidden_size, cfg.vocab_size)
  tokens = _tokens(2, 100 if arch == "llama" else 12)  # llama: past the scaling's original context
  ours = np.asarray(model(jnp.asarray(tokens)))
  np.testing.assert_allclose(ours, hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_left_padded_batch_matches_transformers(tmp_path):
  hf = save_tiny_hf_model(tmp_path, "qwen2", tie=False)
  model, _ = M.load_hf(tmp_path, mesh=ONE_DEVICE)
  tokens = _tokens(3, 9, seed=1)
  mask = np.ones((3, 9), np.int32)
  mask[1, :4] = 0
  mask[2, :7] = 0
  positions = np.asarray(M.default_positions(jnp.asarray(mask)))
  ours = np.asarray(model(jnp.asarray(tokens), attn_mask_BxT=jnp.asarray(mask)))
  theirs = hf_logits(hf, tokens, attention_mask=mask, position_ids=positions)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
  # And each padded row equals that prompt alone, unpadded.
  for row in range(3):
    alone = np.asarray(model(jnp.asarray(tokens[row:row + 1, real[row]])))[0]
    np.testing.assert_allclose(ours[row][real[row]], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_cached_decoding_equals_full_forward(arch):
  cfg = M.preset("tiny", architecture=arch)
  model = M.init_sharded(cfg, ONE_DEVICE, seed=3)
  tokens = jnp.asarray(_tokens(2, 10, cfg.vocab_size, seed=2))
  mask = jnp.ones((2, 10), bool).at[0, :3].set(False)  # row 0 left-padded by 3
  full = model(tokens, attn_mask_BxT=mask)
  positions = M.default_positions(mask)
  cache = M.KVCache.zeros(cfg, 2, 16)
  prefill, cache = model.forward_with_cache(tokens[:, :6], positions[:, :6], cache, attn_mask_BxT=mask[:, :6])
  steps = [prefill]
  for t in range(6, 10):
    logits, cache = model.forward_with_cache(tokens[:, t:t + 1], positions[:, t:t + 1], cache)
    steps.append(logits)
  cached = jnp.concatenate(steps, axis=1)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5, rtol=0)
  assert int(cache.index) == 10


@pytest.mark.parametrize("scaling", [None, M.RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                          original_max_position_embeddings=16)])
def test_decode_rope_table_equals_the_forward_rotation(scaling):
  # The sampler gathers cos/sin rows from a table made once; the forward pass computes them per position.
  cfg = M.preset("tiny", architecture="llama", rope_scaling=scaling)
  model = M.init_sharded(cfg, ONE_DEVICE, seed=0)
  positions_1xT = jnp.arange(40)[None]
  _, cos, sin = model._embed(jnp.zeros_like(positions_1xT), positions_1xT)
  cos_table, sin_table = model.rope_table(40)
  np.testing.assert_array_equal(np.asarray(cos_table), np.asarray(cos[0]))
  np.testing.assert_array_equal(np.asarray(sin_table), np.asarray(sin[0]))


def test_parameter_count_and_presets():
  # Published totals of the Qwen2.5 family (embeddings included, tied where the model ties them).
  assert M.preset("qwen2.5-0.5b").num_params() == 494_032_768
  assert M.preset("qwen2.5-1.5b").num_params() == 1_543_714_304
  assert M.preset("qwen2.5-7b").num_params() == 7_615_616_512
  assert M.preset("qwen2.5-32b").num_params() == 32_763_876_352
  assert M.preset("qwen2.5-math-7b").rope_theta == 10000.0
  # tiny by hand: embedding 256 x 64 (tied); per layer q/k/v 64 x 16 x (4 + 2 + 2), their biases 16 x 8,
  # o 4 x 16 x 64, gate/up/down 3 x 64 x 128, two norms of 64; the final norm.
  per_layer = 64 * 16 * 8 + 16 * 8 + 4 * 16 * 64 + 3 * 64 * 128 + 2 * 64
  assert M.preset("tiny").num_params() == 256 * 64 + 2 * per_layer + 64 == 90_688
  assert M.preset("tiny", tie_word_embeddings=False).num_params() == M.preset("tiny").num_params() + 64 * 256
  assert M.preset("tiny", architecture="qwen3").num_params() == M.preset("tiny").num_params() - 2 * 16 * 8 + 2 * 2 * 16
  for name in M.PRESETS:
    cfg = M.preset(name)
    _, abs_state = M.abstract_model(cfg)
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(abs_state)) == cfg.num_params(), name


def test_bfloat16_params_and_compute(tmp_path):
  hf = save_tiny_hf_model(tmp_path, "qwen2", tie=False)
  model, cfg = M.load_hf(tmp_path, dtype="bfloat16", mesh=ONE_DEVICE)
  assert cfg.param_dtype == cfg.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(M.abstract_model(cfg)[1])} == {jnp.dtype(jnp.bfloat16)}
  tokens = _tokens(2, 8)
  logits = model(jnp.asarray(tokens))
  assert logits.dtype == jnp.float32  # logits always come out in float32 for log-probabilities
  ref = hf_logits(hf, tokens)
  err = np.abs(np.asarray(logits) - ref).max()
  assert err < 0.05 * np.abs(ref).max(), err


@pytest.mark.parametrize("field,value,message", [
    ("num_heads", 3, "num_heads=3 is not a multiple of num_kv_heads=2"),
    ("architecture", "gpt2", "architecture='gpt2' is not supported; choose one of ['llama', 'qwen2', 'qwen3']"),
    ("dtype", "int8", "dtype='int8' is not one of ('float32', 'bfloat16', 'float16')"),
    ("param_dtype", "float64", "param_dtype='float64' is not one of ('float32', 'bfloat16', 'float16')"),
    ("head_dim", 7, "head_dim=7 must be even for rotary embeddings"),
    ("vocab_size", 0, "vocab_size must be a positive integer, got 0"),
    ("num_layers", 2.0, "num_layers must be a positive integer, got 2.0"),
    ("attention_chunk", -1, "attention_chunk must be >= 0, got -1"),
    ("rope_scaling", M.RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=16),
     "rope_scaling is only implemented for llama, not qwen2")])
def test_invalid_config_names_the_field(field, value, message):
  with pytest.raises(M.ConfigError, match=re.escape(message)):
    M.preset("tiny", **{field: value})


def test_other_config_errors():
  with pytest.raises(M.ConfigError, match=re.escape("hidden_size=64 is not divisible by num_heads=3; set head_dim")):
    M.ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=1)
  with pytest.raises(M.ConfigError, match=re.escape("rope_scaling: need high_freq_factor > low_freq_factor > 0")):
    M.RopeScaling(factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0, original_max_position_embeddings=16)
  with pytest.raises(M.ConfigError, match="unknown model preset 'qwen9'"):
    M.preset("qwen9")
  # head_dim 0 means hidden_size // num_heads; eos ids given as a list become a tuple (the config is hashable).
  cfg = M.ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=8, num_kv_heads=2,
                      eos_token_id=[1, 2])
  assert cfg.head_dim == 8 and cfg.eos_token_id == (1, 2) and hash(cfg) == hash(cfg.replace())
  assert M.ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("chunk,remat", [(4, False), (8, True), (0, True)])
def test_chunked_attention_and_remat_change_nothing(chunk, remat):
  from flax import nnx
  cfg = M.preset("tiny")
  base = M.init_sharded(cfg, ONE, seed=11)
  other = M.init_sharded(cfg.replace(attention_chunk=chunk, remat=remat), ONE, seed=11)
  tokens = jnp.asarray(_tokens(2, 16, cfg.vocab_size, seed=4))
  mask = jnp.ones((2, 16), bool).at[1, :5].set(False)

  def loss(model):
    return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(model(tokens, attn_mask_BxT=mask)), 0.0) ** 2)

  def value_and_grad(model):
    graphdef, state = nnx.split(model)
    return jax.jit(jax.value_and_grad(lambda s: loss(nnx.merge(graphdef, s))))(state)

  (l0, g0), (l1, g1) = value_and_grad(base), value_and_grad(other)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    a = np.asarray(a)
    np.testing.assert_allclose(np.asarray(b), a, rtol=1e-4, atol=1e-6 * np.abs(a).max())  # float32 sum order
