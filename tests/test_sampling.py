"""The sampler (the rollout engine's one-call form, `engine.generate`) is exact: greedy equals transformers,
sampled frequencies equal the softmax, log-probabilities equal a teacher-forced forward pass, and batching,
grouping and sharding change nothing. The engine's own properties (slots, refills, streaming) are in
test_engine.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dapo_jax import model as M
from dapo_jax import engine, sampling, sharding
from dapo_jax.engine import generate
from dapo_jax.sampling import SamplingParams, pad_prompts
from dapo_jax.testing import save_tiny_hf_model

ONE = sharding.make_mesh(devices=jax.devices()[:1])
PROMPTS = [[5, 17, 99, 3], [42, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  hf = save_tiny_hf_model(path, "qwen2", tie=False)
  ours, _ = M.load_hf(path, mesh=ONE)
  return hf, ours


def test_greedy_equals_transformers_generate(hf_and_ours):
  import torch
  hf, ours = hf_and_ours
  params = SamplingParams(max_new_tokens=24, temperature=0.0)
  out = generate(ours, PROMPTS, params, jax.random.key(0))
  for i, prompt in enumerate(PROMPTS):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(prompt):].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN[i, :24]), ref)
  assert np.all(np.asarray(out.lengths_B) == 24) and np.all(np.asarray(out.truncated_B))


def test_mixed_length_batch_equals_each_prompt_alone(hf_and_ours):
  _, ours = hf_and_ours
  params = SamplingParams(max_new_tokens=16, temperature=0.0)
  batch = generate(ours, PROMPTS, params, jax.random.key(0))
  for i, prompt in enumerate(PROMPTS):
    alone = generate(ours, [prompt], params, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(batch.tokens_BxN[i]), np.asarray(alone.tokens_BxN[0]))
    np.testing.assert_allclose(np.asarray(batch.logprobs_BxN[i]), np.asarray(alone.logprobs_BxN[0]), atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_logprobs_equal_teacher_forced_forward(hf_and_ours, temperature, top_k, top_p):
  _, ours = hf_and_ours
  # 20 tokens: a budget of 32, kept in 4 segments of 8 (engine.segment_length).
  params = SamplingParams(max_new_tokens=20, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=(3,))
  out = generate(ours, PROMPTS, params, jax.random.key(1), num_samples=3)
  full = jnp.concatenate([out.prompt_BxP, out.tokens_BxN], axis=1)
  mask = jnp.concatenate([out.prompt_mask_BxP, out.mask_BxN], axis=1)
  logits = ours(full, attn_mask_BxT=mask)[:, out.prompt_BxP.shape[1] - 1:-1] / temperature
  ref = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), out.tokens_BxN[..., None], -1)[..., 0]
  ref = np.where(np.asarray(out.mask_BxN), np.asarray(ref), 0.0)
  np.testing.assert_allclose(np.asarray(out.logprobs_BxN), ref, atol=2e-5)


def test_stop_tokens_lengths_and_truncation():
  cfg = M.preset("tiny")
  model = M.init_sharded(cfg, ONE, seed=4)
  free = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0), jax.random.key(2),
                  num_samples=4)
  tokens = np.asarray(free.tokens_BxN)
  # Declare the 3rd sampled token of row 0 a stop id and sample again with the same randomness.
  stop = int(tokens[0, 2])
  out = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, stop_ids=(stop,), pad_id=0),
                 jax.random.key(2), num_samples=4)
  got = np.asarray(out.tokens_BxN)
  lengths, truncated, mask = np.asarray(out.lengths_B), np.asarray(out.truncated_B), np.asarray(out.mask_BxN)
  for row in range(tokens.shape[0]):
    hits = np.flatnonzero(tokens[row, :10] == stop)
    want = hits[0] + 1 if hits.size else 10  # the stop token is counted, as the reference does
    assert lengths[row] == want and truncated[row] == (hits.size == 0)
    np.testing.assert_array_equal(got[row, :want], tokens[row, :want])
    assert np.all(got[row, want:] == 0) and mask[row].sum() == want and np.all(mask[row, :want])
  assert lengths[0] == 3 and not truncated[0]


def test_sampled_frequencies_match_softmax():
  cfg = M.preset("tiny", vocab_size=16)
  model = M.init_sharded(cfg, ONE, seed=5)
  prompt = [1, 2, 3]
  n = 4000
  out = generate(model, [prompt], SamplingParams(max_new_tokens=1, temperature=1.0), jax.random.key(3),
                 num_samples=n)
  probs = np.asarray(jax.nn.softmax(model(jnp.asarray([prompt]))[0, -1]))
  counts = np.bincount(np.asarray(out.tokens_BxN[:, 0]), minlength=16)
  # Pearson chi-square with 15 degrees of freedom: 37.7 is the 0.999 quantile.
  chi2 = np.sum((counts - n * probs) ** 2 / (n * probs))
  assert chi2 < 37.7, (chi2, counts, n * probs)


def test_top_p_never_leaves_the_nucleus_and_top_k_the_top():
  cfg = M.preset("tiny", vocab_size=16)
  model = M.init_sharded(cfg, ONE, seed=6)
  prompt = [4, 5]
  logits = np.asarray(model(jnp.asarray([prompt]))[0, -1], np.float64)
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  cum = np.cumsum(probs[order])
  nucleus = set(order[: int(np.sum(cum - probs[order] < 0.6))].tolist())
  out = generate(model, [prompt], SamplingParams(max_new_tokens=1, top_p=0.6), jax.random.key(4), num_samples=2000)
  seen = set(np.asarray(out.tokens_BxN[:, 0]).tolist())
  assert seen == nucleus  # every nucleus token appears, nothing else does
  out = generate(model, [prompt], SamplingParams(max_new_tokens=1, top_k=3), jax.random.key(5), num_samples=2000)
  assert set(np.asarray(out.tokens_BxN[:, 0]).tolist()) == set(order[:3].tolist())


def test_grouped_rows_are_independent_and_share_the_prefill():
  cfg = M.preset("tiny")
  model = M.init_sharded(cfg, ONE, seed=7)
  out = generate(model, PROMPTS, SamplingParams(max_new_tokens=8), jax.random.key(6), num_samples=4)
  tokens = np.asarray(out.tokens_BxN).reshape(3, 4, -1)
  assert all(len({tuple(r) for r in group}) == 4 for group in tokens)  # independent samples per group
  np.testing.assert_array_equal(np.asarray(out.prompt_BxP).reshape(3, 4, -1)[:, 0],
                                pad_prompts(PROMPTS, 0)[0])
  greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0), jax.random.key(6),
                    num_samples=4)
  g = np.asarray(greedy.tokens_BxN).reshape(3, 4, -1)
  assert np.all(g == g[:, :1])  # greedy: the G copies of a prefilled prompt agree


def test_few_compilations_across_calls():
  cfg = M.preset("tiny")
  model = M.init_sharded(cfg, ONE, seed=8)
  before = engine.compiled_programs()
  rng = np.random.default_rng(0)
  for i in range(6):
    prompts = [rng.integers(0, 256, rng.integers(17, 33)).tolist() for _ in range(4)]
    generate(model, prompts, SamplingParams(max_new_tokens=int(rng.integers(9, 16))), jax.random.key(i),
             num_samples=2)
  # Prompt lengths 17..32 share the 32 bucket and budgets 9..15 the 16 bucket: one decode program and one
  # prefill program.
  assert engine.compiled_programs() - before == 2


def test_sharded_greedy_equals_one_device():
  cfg = M.preset("tiny", num_heads=8, num_kv_heads=4)
  one = M.init_sharded(cfg, ONE, seed=9)
  params = SamplingParams(max_new_tokens=16, temperature=0.0)
  ref = generate(one, PROMPTS + [[9, 9, 9]], params, jax.random.key(0), num_samples=2)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  many = M.init_sharded(cfg, mesh, seed=9)
  with jax.set_mesh(mesh):
    out = generate(many, PROMPTS + [[9, 9, 9]], params, jax.random.key(0), num_samples=2)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN), np.asarray(ref.tokens_BxN))
  np.testing.assert_allclose(np.asarray(out.logprobs_BxN), np.asarray(ref.logprobs_BxN), atol=1e-5)


def test_row_sharded_sampling_equals_one_device():
  # A mesh that only splits rows decodes each shard's slots in its own loop (shard_map), each stopping when
  # its own rows are done; sampled tokens, log-probabilities and lengths must not change.
  cfg = M.preset("tiny", num_heads=8, num_kv_heads=4)
  one = M.init_sharded(cfg, ONE, seed=10)
  params = SamplingParams(max_new_tokens=16, temperature=1.0, stop_ids=tuple(range(3, 40)))
  prompts = [[i + 1, 2 * i + 3, 7] for i in range(8)]
  ref = generate(one, prompts, params, jax.random.key(1), num_samples=2)
  mesh = sharding.make_mesh({"data": -1})
  many = M.init_sharded(cfg, mesh, seed=10)
  assert sharding.row_local_axes(mesh, len(prompts), nnx.state(many)) == ("data",)
  with jax.set_mesh(mesh):
    out = generate(many, prompts, params, jax.random.key(1), num_samples=2)
  for name in ("tokens_BxN", "mask_BxN", "lengths_B", "truncated_B"):
    np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)), err_msg=name)
  np.testing.assert_allclose(np.asarray(out.logprobs_BxN), np.asarray(ref.logprobs_BxN), atol=1e-5)
  lengths = np.asarray(ref.lengths_B)
  assert lengths.min() < lengths.max() == 16  # shards stop at different steps: the per-shard loop is exercised
  assert len(set(lengths.reshape(8, 2).max(axis=1))) > 1


def test_row_local_axes_only_for_meshes_that_split_rows_alone():
  cfg = M.preset("tiny", num_heads=8, num_kv_heads=4)
  mixed = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.row_local_axes(mixed, 8, nnx.state(M.init_sharded(cfg, mixed, seed=0))) == ()
  rows = sharding.make_mesh({"data": -1})
  state = nnx.state(M.init_sharded(cfg, rows, seed=0))
  assert sharding.row_local_axes(rows, 8, state) == ("data",)
  assert sharding.row_local_axes(rows, 6, state) == ()  # 8 shards do not divide 6 prompts
  fsdp = sharding.make_mesh({"fsdp": -1})  # the parameters are split along fsdp
  assert sharding.row_local_axes(fsdp, 8, nnx.state(M.init_sharded(cfg, fsdp, seed=0))) == ()


def test_pad_prompts_left_pads_to_a_bucket():
  prompt, mask = pad_prompts([[1, 2, 3], [4]], 9)
  assert prompt.dtype == np.int32 and mask.dtype == bool and prompt.shape == mask.shape == (2, 16)
  assert prompt.tolist() == [[9] * 13 + [1, 2, 3], [9] * 15 + [4]]
  assert mask.tolist() == [[False] * 13 + [True] * 3, [False] * 15 + [True]]
  assert pad_prompts([[1] * 17], 0)[0].shape == (1, 32)  # the next bucket up
  assert pad_prompts([[1] * 16], 0)[0].shape == (1, 16)
  assert pad_prompts([[1, 2]], 0, length=5)[0].tolist() == [[0, 0, 0, 1, 2]]
  assert sampling.bucket(40_000, sampling.PROMPT_BUCKETS) == 40_000  # past the last bucket: itself
  with pytest.raises(ValueError, match="pad_prompts: a prompt has 3 tokens, more than the length 2"):
    pad_prompts([[1, 2, 3]], 0, length=2)


def test_invalid_params_are_named():
  with pytest.raises(ValueError, match=r"SamplingParams\.top_p must be in \(0, 1\], got 0\.0"):
    SamplingParams(max_new_tokens=4, top_p=0.0)
  with pytest.raises(ValueError, match=r"SamplingParams\.top_p must be in \(0, 1\], got 1\.5"):
    SamplingParams(max_new_tokens=4, top_p=1.5)
  with pytest.raises(ValueError, match=r"SamplingParams\.max_new_tokens must be positive, got 0"):
    SamplingParams(max_new_tokens=0)
  with pytest.raises(ValueError, match=r"SamplingParams\.temperature must be >= 0, got -0\.5"):
    SamplingParams(max_new_tokens=4, temperature=-0.5)
  with pytest.raises(ValueError, match=r"SamplingParams\.top_k must be >= 0, got -1"):
    SamplingParams(max_new_tokens=4, top_k=-1)
  with pytest.raises(ValueError, match=r"pad_prompts: empty prompt \(a prompt needs at least one token\)"):
    pad_prompts([[1], []], 0)
  model = M.init_sharded(M.preset("tiny", max_position_embeddings=40), ONE)
  with pytest.raises(ValueError, match="generate: prompt of 25 tokens \\+ max_new_tokens 16 exceeds the model's "
                                       "max_position_embeddings 40"):
    generate(model, [[1] * 25, [2] * 3], SamplingParams(max_new_tokens=16), jax.random.key(0))
  # Exactly at the limit is allowed: the last token sampled sits at position 39.
  out = generate(model, [[1] * 24], SamplingParams(max_new_tokens=16, temperature=0.0), jax.random.key(0))
  assert np.asarray(out.lengths_B).tolist() == [16]
