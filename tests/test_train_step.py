"""The update step: micro-batched == whole, sharded == one device, AdamW/clipping/warmup/skip as the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import model as M
from dapo_jax import sharding
from dapo_jax.engine import generate
from dapo_jax.sampling import SamplingParams
from dapo_jax.dynamic_sampling import pad_rows
from dapo_jax.train_step import Batch, Trainer, UpdateConfig

ONE = sharding.make_mesh(devices=jax.devices()[:1])
CFG = M.preset("tiny", num_heads=8, num_kv_heads=4)


def rollout_batch(model, seed=0, prompts=4, group=4):
  rng = np.random.default_rng(seed)
  prompt_ids = [rng.integers(0, CFG.vocab_size, int(rng.integers(3, 9))).tolist() for _ in range(prompts)]
  out = generate(model, prompt_ids, SamplingParams(max_new_tokens=12, stop_ids=(7, 11, 13)),
                 jax.random.key(seed), num_samples=group)
  adv = rng.normal(size=prompts * group).astype(np.float32)
  return out, Batch(np.asarray(out.prompt_BxP), np.asarray(out.prompt_mask_BxP), np.asarray(out.tokens_BxN),
                    np.asarray(out.mask_BxN, np.float32), np.asarray(out.logprobs_BxN), adv)


def flat_grads(trainer, state, batch):
  mini = jax.tree.map(lambda x: x[0], trainer.shard_batch(batch))
  loss, grads, metrics = jax.jit(trainer.minibatch_grads)(state.params, mini)
  return float(loss), np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(grads)]), metrics


def test_micro_batched_equals_whole_and_sharded_equals_one_device():
  model = M.init_sharded(CFG, ONE, seed=1)
  _, batch = rollout_batch(model)
  # Perturb the old log-probs so ratios differ from 1 and clipping is exercised.
  batch = batch._replace(old_logp_BxN=batch.old_logp_BxN + np.random.default_rng(5).normal(
      0, 0.3, batch.old_logp_BxN.shape).astype(np.float32))
  whole = Trainer(model, UpdateConfig(num_micro_batches=1), ONE)
  ref_loss, ref, ref_m = flat_grads(whole, whole.init_state(model), batch)
  assert np.abs(ref).max() > 0 and float(ref_m["pg_clipfrac"]) > 0
  for micro in (2, 4, 8):
    t = Trainer(model, UpdateConfig(num_micro_batches=micro), ONE)
    loss, g, m = flat_grads(t, t.init_state(model), batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)
    for k in ref_m:
      np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-4, atol=1e-6, err_msg=k)
  for shape, micro in (({"fsdp": 8}, 1), ({"data": 2, "fsdp": 2, "tensor": 2}, 2), ({"data": 4, "tensor": 2}, 4)):
    mesh = sharding.make_mesh(shape)
    sharded_model = M.init_sharded(CFG, mesh, seed=1)
    t = Trainer(sharded_model, UpdateConfig(num_micro_batches=micro), mesh)
    with jax.set_mesh(mesh):
      loss, g, _ = flat_grads(t, t.init_state(sharded_model), batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6, err_msg=str(shape))


def test_one_update_is_adamw_with_clipping_and_warmup():
  model = M.init_sharded(CFG, ONE, seed=2)
  _, batch = rollout_batch(model, seed=1)
  cfg = UpdateConfig(lr=1e-3, warmup_steps=2, weight_decay=0.1, grad_clip=0.5, num_mini_batches=2)
  t = Trainer(model, cfg, ONE)
  state = t.init_state(model)
  p0 = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  sharded = t.shard_batch(batch)
  state, m0 = t.update(state, sharded)
  # Rollout step 0 trains with lr 0 (constant-with-warmup, as the reference): nothing moves.
  assert float(m0["actor/lr"]) == 0.0 and int(state.updates) == 2
  for a, b in zip(p0, jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  # Rollout step 1: lr = 1e-3 * 1/2. Reproduce its first mini-batch update by hand.
  mini0 = jax.tree.map(lambda x: x[0], sharded)
  params_before = state.params
  _, grads, _ = jax.jit(t.minibatch_grads)(params_before, mini0)
  g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  norm = np.sqrt(sum((x ** 2).sum() for x in g))
  scale = min(1.0, 0.5 / (norm + 1e-6))
  # Adam state after step 0's two updates: replay them to get mu and nu exactly.
  opt = jax.tree.map(np.asarray, state.opt)
  mu = [np.asarray(x, np.float64) for x in jax.tree.leaves(opt[0].mu)]
  nu = [np.asarray(x, np.float64) for x in jax.tree.leaves(opt[0].nu)]
  count = int(opt[0].count) + 1
  want = []
  for p, gi, m, v in zip(jax.tree.leaves(params_before), g, mu, nu):
    p = np.asarray(p, np.float64)
    gi = gi * scale
    m = 0.9 * m + 0.1 * gi
    v = 0.999 * v + 0.001 * gi * gi
    upd = (m / (1 - 0.9 ** count)) / (np.sqrt(v / (1 - 0.999 ** count)) + 1e-8) + 0.1 * p
    want.append(p - 0.5e-3 * upd)
  one_mini = UpdateConfig(lr=1e-3, warmup_steps=2, weight_decay=0.1, grad_clip=0.5, num_mini_batches=1)
  t1 = Trainer(model, one_mini, ONE)
  half = Batch(*(None if x is None else x[: len(x) // 2] for x in batch))
  state1, m1 = t1.update(state._replace(), t1.shard_batch(half))
  assert float(m1["actor/lr"]) == pytest.approx(0.5e-3)
  np.testing.assert_allclose(float(m1["actor/grad_norm"]), norm, rtol=1e-5)
  for w, got in zip(want, jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(np.asarray(got), w, rtol=1e-5, atol=1e-7)


def test_non_finite_update_is_skipped_and_no_recompilation():
  model = M.init_sharded(CFG, ONE, seed=3)
  _, batch = rollout_batch(model, seed=2)
  t = Trainer(model, UpdateConfig(lr=1e-3, warmup_steps=0, num_mini_batches=2), ONE)
  state = t.init_state(model)
  bad = batch._replace(adv_B=np.where(np.arange(16) < 8, np.nan, batch.adv_B).astype(np.float32))
  before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  state, m = t.update(state, t.shard_batch(bad))
  assert int(state.skipped) == 1 and int(state.updates) == 1 and float(m["actor/skipped_updates"]) == 1.0
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(state.params)))
  state, m = t.update(state, t.shard_batch(batch))
  assert float(m["actor/applied_updates"]) == 2.0 and float(m["actor/params_finite"]) == 1.0
  # Weights already broken (a bad checkpoint): every update is skipped, and the metric says so.
  leaves, tree = jax.tree.flatten(state.params)
  broken = state._replace(params=jax.tree.unflatten(tree, [leaves[0] * jnp.nan] + leaves[1:]))
  _, m = t.update(broken, t.shard_batch(batch))
  assert float(m["actor/params_finite"]) == 0.0 and float(m["actor/applied_updates"]) == 0.0
  assert float(m["actor/skipped_updates"]) == 2.0
  assert t.update._cache_size() == 1


def test_a_short_batch_padded_trains_as_its_own_mini_batches_without_a_new_program():
  model = M.init_sharded(CFG, ONE, seed=4)
  _, batch = rollout_batch(model, seed=3)  # 16 rows
  batch = batch._replace(old_logp_BxN=batch.old_logp_BxN + np.random.default_rng(6).normal(
      0, 0.3, batch.old_logp_BxN.shape).astype(np.float32))
  cfg = dict(lr=1e-3, warmup_steps=0, weight_decay=0.1)
  full = Trainer(model, UpdateConfig(num_mini_batches=4, **cfg), ONE)  # 4 rows a mini-batch
  state, _ = full.update(full.init_state(model), full.shard_batch(batch))
  # Dynamic sampling kept 6 of the 16 rows: padded, they train as two mini-batches (4 rows, then 2), the
  # same as those rows as a batch of their own; the padding-only mini-batches move nothing.
  short = Batch(*(None if x is None else x[:6] for x in batch))
  padded = pad_rows(short, 16)
  assert np.asarray(padded.mask_BxN)[6:].sum() == 0 and np.all(np.asarray(padded.adv_B)[6:] == 0)
  got, m = full.update(full.init_state(model), full.shard_batch(padded))
  assert full.update._cache_size() == 1 and int(got.updates) == 2
  want = full.init_state(model)
  metrics = []
  for rows in (slice(0, 4), slice(4, 6)):
    t = Trainer(model, UpdateConfig(num_mini_batches=1, **cfg), ONE)
    part = Batch(*(None if x is None else x[rows] for x in short))
    want, mw = t.update(want, t.shard_batch(part))  # lr is constant (no warmup), so the step number is moot
    metrics.append(mw)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    # The two sum the rows' gradients in different orders, and Adam's m / sqrt(v) turns that float32 rounding
    # into up to a part in a thousand of a step where an element's gradient is near zero: 2e-6 of 2 steps x lr.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)
  for k in ("actor/pg_loss", "actor/grad_norm", "actor/pg_clipfrac"):
    np.testing.assert_allclose(float(m[k]), np.mean([float(x[k]) for x in metrics]), rtol=1e-5, err_msg=k)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(state.params)))
  with pytest.raises(ValueError, match="cannot pad a batch of 0 rows"):
    pad_rows(Batch(*(None if x is None else x[:0] for x in batch)), 16)


def test_recomputed_old_logprobs_equal_the_samplers():
  model = M.init_sharded(CFG, ONE, seed=4)
  out, batch = rollout_batch(model, seed=3)
  t = Trainer(model, UpdateConfig(num_micro_batches=2), ONE)
  state = t.init_state(model)
  sharded = t.shard_batch(batch)
  old = np.asarray(t.logprobs(state.params, sharded)).reshape(batch.tokens_BxN.shape)
  np.testing.assert_allclose(old * batch.mask_BxN, batch.old_logp_BxN, atol=2e-5)


def test_remat_and_attention_chunks_train_as_without():
  """The recipes' memory options (layer remat, query blocks) inside the trainer's micro-batch loops (lax.map of
  the old-log-prob pass, the update's scan): the same log-probs, loss and gradients as without them."""
  model = M.init_sharded(CFG, ONE, seed=1)
  _, batch = rollout_batch(model)
  plain = Trainer(model, UpdateConfig(num_micro_batches=2), ONE)
  lean_model = M.init_sharded(CFG.replace(remat=True, attention_chunk=8), ONE, seed=1)
  lean = Trainer(lean_model, UpdateConfig(num_micro_batches=2), ONE)
  ref_state, state = plain.init_state(model), lean.init_state(lean_model)
  sharded = plain.shard_batch(batch)
  np.testing.assert_allclose(np.asarray(lean.logprobs(state.params, sharded)),
                             np.asarray(plain.logprobs(ref_state.params, sharded)), atol=1e-6)
  ref_loss, ref, _ = flat_grads(plain, ref_state, batch)
  loss, g, _ = flat_grads(lean, state, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)
  (ref_state, ref_m), (state, m) = plain.update(ref_state, sharded), lean.update(state, sharded)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  np.testing.assert_allclose(float(m["actor/pg_loss"]), float(ref_m["actor/pg_loss"]), rtol=1e-6)


def test_invalid_update_config_is_named():
  with pytest.raises(ValueError, match="clip_c"):
    UpdateConfig(clip_c=1.0)
  with pytest.raises(ValueError, match="loss_agg"):
    UpdateConfig(loss_agg="mean")
  model = M.init_sharded(CFG, ONE)
  t = Trainer(model, UpdateConfig(num_mini_batches=3), ONE)
  _, batch = rollout_batch(model)
  with pytest.raises(ValueError, match="16 rows does not split into 3 mini-batches"):
    t.shard_batch(batch)


def test_learning_rate_schedule_reference_vectors():
  from dapo_jax.train_step import lr_at
  cfg = UpdateConfig(lr=1e-6, warmup_steps=10)
  # Training steps 1, 2, 11 are rollout steps 0, 1, 10.
  np.testing.assert_allclose([float(lr_at(cfg, s)) for s in (0, 1, 10, 500)], [0.0, 1e-7, 1e-6, 1e-6], rtol=1e-6)
  assert float(lr_at(UpdateConfig(lr=1e-6, warmup_steps=0), 0)) == pytest.approx(1e-6)
