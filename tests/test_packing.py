"""The packed update: the packer's layout, and packed == padded for log-probs, loss and gradients."""

import jax
import numpy as np
import pytest

from dapo_jax import model as M
from dapo_jax import loss as loss_lib
from dapo_jax import sharding
from dapo_jax.packing import Packer
from dapo_jax.train_step import Batch, Trainer, UpdateConfig

ONE = sharding.make_mesh(devices=jax.devices()[:1])
CFG = M.preset("tiny", num_heads=8, num_kv_heads=4)


def long_tailed_batch(seed=0, rows=16, prompt=8, response=24, ref=False):
  """Left-padded prompts of 2..8 tokens, responses of geometric lengths (a few cut at the budget), one row
  overlong-filtered (loss mask zero) and one with a gap in its loss mask (a rejected token)."""
  rng = np.random.default_rng(seed)
  plen = rng.integers(2, prompt + 1, rows)
  pmask = np.arange(prompt)[None] >= (prompt - plen)[:, None]
  n = np.minimum(rng.geometric(1 / 8, rows), response)
  mask = (np.arange(response)[None] < n[:, None]).astype(np.float32)
  mask[3] = 0.0
  mask[int(np.argmax(n)), 1] = 0.0
  tokens = rng.integers(1, CFG.vocab_size, (rows, response)).astype(np.int32) * (mask > 0)
  old = rng.normal(-2.0, 0.5, (rows, response)).astype(np.float32) * mask
  return Batch(np.where(pmask, rng.integers(1, CFG.vocab_size, (rows, prompt)), 0).astype(np.int32), pmask,
               tokens, mask, old, rng.normal(size=rows).astype(np.float32),
               rng.normal(-2.0, 0.5, (rows, response)).astype(np.float32) * mask if ref else None)


def test_packer_places_every_row_once_within_the_budget():
  batch = long_tailed_batch(rows=64)
  plan = Packer(96, data=2, num_mini_batches=2).plan(batch.prompt_mask_BxP, batch.mask_BxN)
  packed = plan.pack(batch)
  m, k, r, width = plan.shape
  assert r % 2 == 0 and (r // 2) * width <= 96 and k & (k - 1) == 0
  # Each buffer row: segments contiguous, numbered 1.. in order, positions restarting at 0.
  for row_seg, row_pos in zip(packed.segment_RxL.reshape(-1, width), packed.position_RxL.reshape(-1, width)):
    live = row_seg > 0
    assert np.all(np.diff(live.astype(int)) <= 0)  # padding only at the end
    seg = row_seg[live]
    assert np.all(np.diff(seg) >= 0) and (seg.size == 0 or seg[0] == 1)
    starts = np.flatnonzero(np.diff(seg, prepend=0))
    assert np.all(row_pos[starts] == 0) and np.all(np.diff(row_pos[live])[np.diff(seg) == 0] == 1)
  # Rows come back where they were; rows with no loss token are left out; totals are the mini-batch's.
  x = np.random.default_rng(1).normal(size=batch.mask_BxN.shape).astype(np.float32)
  back = plan.rows(plan.token_field(x))
  n_B = np.where(batch.mask_BxN.any(1), batch.mask_BxN.shape[1] - np.argmax(batch.mask_BxN[:, ::-1] > 0, 1), 0)
  scored = np.arange(batch.mask_BxN.shape[1])[None] < n_B[:, None]
  np.testing.assert_array_equal(back, np.where(scored, x, 0))
  assert plan.tokens == int((batch.prompt_mask_BxP.sum(1) + n_B)[n_B > 0].sum())
  np.testing.assert_array_equal(packed.num_tokens_M, batch.mask_BxN.reshape(2, -1).sum(1))
  np.testing.assert_array_equal(packed.num_seqs_M, (batch.mask_BxN.sum(1) > 0).reshape(2, -1).sum(1))
  # Deterministic, and a row longer than the budget is refused, naming the field and the row.
  again = Packer(96, data=2, num_mini_batches=2).plan(batch.prompt_mask_BxP, batch.mask_BxN).pack(batch)
  for a, b in zip(packed, again):
    np.testing.assert_array_equal(a, b)
  longest = int((batch.prompt_mask_BxP.sum(1) + n_B).max())
  with pytest.raises(ValueError, match=rf"actor.max_tokens_per_micro_batch: row \d+ holds {longest} tokens"):
    Packer(longest - 1).plan(batch.prompt_mask_BxP, batch.mask_BxN)



def grads_of(trainer, state, batch):
  mini = jax.tree.map(lambda x: x[0], trainer.shard_batch(batch))
  loss, grads, metrics = jax.jit(trainer.minibatch_grads)(state.params, mini)
  return float(loss), np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(grads)]), metrics


@pytest.mark.parametrize("agg", loss_lib.AGG_MODES)
def test_every_loss_aggregation_of_packed_tokens_equals_the_padded_rows(agg):
  batch = long_tailed_batch(rows=32, seed=5)
  rng = np.random.default_rng(6)
  loss_BxN = rng.normal(size=batch.mask_BxN.shape).astype(np.float32)
  want = loss_lib.aggregate(loss_BxN, batch.mask_BxN, agg, num_tokens=batch.mask_BxN.sum(),
                            num_seqs=loss_lib.count_sequences(batch.mask_BxN), norm_len=batch.mask_BxN.shape[1])
  plan = Packer(48, data=2).plan(batch.prompt_mask_BxP, batch.mask_BxN)
  packed = plan.pack(batch)
  got = loss_lib.aggregate(plan.token_field(loss_BxN), packed.mask_RxL, agg, num_tokens=packed.num_tokens_M[0],
                           num_seqs=packed.num_seqs_M[0], norm_len=packed.norm_len_M[0],
                           seq_tokens=packed.seq_tokens_RxL)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


# token-mean with the KL and entropy terms (the other modes differ only in `aggregate`, tested above).
@pytest.mark.parametrize("agg", ["token-mean"])
def test_packed_equals_padded_loss_gradients_and_logprobs(agg):
  model = M.init_sharded(CFG, ONE, seed=1)
  batch = long_tailed_batch(ref=True)
  extra = dict(kl_coef=0.1, entropy_coef=0.01) if agg == "token-mean" else {}
  padded = Trainer(model, UpdateConfig(loss_agg=agg, num_micro_batches=2, **extra), ONE)
  state = padded.init_state(model)
  want_loss, want, want_m = grads_of(padded, state, batch)
  assert np.abs(want).max() > 0 and float(want_m["pg_clipfrac"]) > 0
  want_logp = np.asarray(padded.logprobs(state.params, padded.shard_batch(batch))).reshape(batch.mask_BxN.shape)
  # A row or two a micro-batch, and all rows in one: micro-batch invariance holds packed too.
  for budget in (32, 512):
    packed = Trainer(model, UpdateConfig(loss_agg=agg, max_tokens_per_micro_batch=budget, **extra), ONE)
    layout = packed.layout(batch)
    loss, got, m = grads_of(packed, state, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=str(budget))
    for key in want_m:
      np.testing.assert_allclose(float(m[key]), float(want_m[key]), rtol=1e-4, atol=1e-6, err_msg=key)
    logp = layout.rows(packed.logprobs(state.params, layout.shard(batch)))
    np.testing.assert_allclose(logp * batch.mask_BxN, want_logp * batch.mask_BxN, rtol=1e-5, atol=1e-5)


def test_packed_gradients_on_meshes_equal_padded_on_one_device():
  batch = long_tailed_batch(rows=16, seed=3)
  model = M.init_sharded(CFG, ONE, seed=2)
  padded = Trainer(model, UpdateConfig(num_mini_batches=2, num_micro_batches=2), ONE)
  want_loss, want, want_m = grads_of(padded, padded.init_state(model), batch)
  for shape in ({"fsdp": 8}, {"data": 4, "tensor": 2}):
    mesh = sharding.make_mesh(shape)
    sharded_model = M.init_sharded(CFG, mesh, seed=2)
    t = Trainer(sharded_model, UpdateConfig(num_mini_batches=2, max_tokens_per_micro_batch=48), mesh)
    with jax.set_mesh(mesh):
      loss, got, m = grads_of(t, t.init_state(sharded_model), batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=str(shape))
    for key in want_m:
      np.testing.assert_allclose(float(m[key]), float(want_m[key]), rtol=1e-4, atol=1e-6, err_msg=f"{shape} {key}")


def test_packed_query_blocks_and_remat_equal_the_plain_packed_update():
  batch = long_tailed_batch(seed=4)
  model = M.init_sharded(CFG, ONE, seed=3)
  plain = Trainer(model, UpdateConfig(max_tokens_per_micro_batch=64), ONE)
  state = plain.init_state(model)
  want_loss, want, _ = grads_of(plain, state, batch)
  lean_cfg = M.preset("tiny", num_heads=8, num_kv_heads=4, remat=True, attention_chunk=16)
  lean = Trainer(M.init_sharded(lean_cfg, ONE, seed=3), UpdateConfig(max_tokens_per_micro_batch=64), ONE)
  assert lean.layout(batch).plan.shape[-1] % 16 == 0
  loss, got, _ = grads_of(lean, state, batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
