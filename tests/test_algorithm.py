"""DAPO's pieces against the reference's numbers: advantages, dynamic sampling, the clipped loss and its
aggregation modes (NumPy reference implementations below)."""

import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax.advantages import group_advantages
from dapo_jax.dynamic_sampling import DynamicSampling, DynamicSamplingExhausted, GroupAccumulator, keep_groups
from dapo_jax.rollout import ScoredBatch
from dapo_jax.loss import aggregate, low_var_kl, policy_loss
from dapo_jax.rewards import overlong_penalty


# --- advantages ---------------------------------------------------------------------------------------------

def test_advantages_reference_vectors():
  r = np.array([1.0] * 4 + [-1.0] * 12)
  a = group_advantages(r, 16)
  np.testing.assert_allclose(a[:4], 1.677049, atol=1e-6)
  np.testing.assert_allclose(a[4:], -0.559016, atol=1e-6)
  # One wrong answer is 18432 tokens long: its overlong penalty is -0.5.
  lengths = np.array([100] * 15 + [18432])
  shaped = r + overlong_penalty(lengths, 20480, 4096)
  a = group_advantages(shaped, 16)
  np.testing.assert_allclose([a[0], a[4], a[15]], [1.661891, -0.508742, -1.051400], atol=1e-6)
  a = group_advantages(np.array([1.0] + [-1.0] * 15), 16)
  np.testing.assert_allclose([a[0], a[1]], [3.749993, -0.25], atol=1e-6)


def test_advantages_groups_are_independent_and_dr_grpo():
  r = np.array([1.0, -1.0, 1.0, 1.0, 0.5, -0.5])
  a = group_advantages(r, 2)
  np.testing.assert_allclose(a, [0.707106, -0.707106, 0.0, 0.0, 0.707106, -0.707106], atol=1e-5)
  np.testing.assert_allclose(group_advantages(r, 2, norm_by_std=False), [1, -1, 0, 0, 0.5, -0.5])
  np.testing.assert_allclose(group_advantages(np.array([0.7, -2.0]), 1), [0.7 / (1 + 1e-6), -2.0 / (1 + 1e-6)])
  with pytest.raises(ValueError, match="do not form groups of 4"):
    group_advantages(np.ones(6), 4)


# --- dynamic sampling ---------------------------------------------------------------------------------------

from tests.conftest import scored_batch as _batch  # noqa: E402


def _tags(batch):
  return batch.tokens_BxN[:, 0].tolist()


def test_keep_groups_filters_on_agreement():
  np.testing.assert_array_equal(keep_groups([1, 1, 0, 0, 1, 0, 1, 1], 2), [False, False, True, False])
  np.testing.assert_array_equal(keep_groups([1, 0, 1], 1), [True, True, True])


def test_accumulator_fills_truncates_and_logs():
  acc = GroupAccumulator(DynamicSampling(train_batch_size=3), group_size=2)
  b1 = _batch([1, 1, 1, 0, 0, 0, 0, 1], 1)  # groups: all right, mixed, all wrong, mixed -> keeps 2
  assert acc.add(b1) == 2 and not acc.ready
  b2 = _batch([0, 1, 1, 0, 1, 1, 0, 1], 2, width=5)  # keeps 3 -> 5 kept, 3 trained
  acc.add(b2)
  assert acc.ready
  batch, m = acc.take()
  assert _tags(batch) == [1, 1, 1, 1, 2, 2]  # groups whole, in order, truncated on a group boundary
  assert batch.tokens_BxN.shape == (6, 5) and batch.prompt_BxP.shape == (6, 5)
  np.testing.assert_array_equal(batch.prompt_BxP[0], [0, 0, 1, 1, 1])  # prompts padded on the left
  np.testing.assert_array_equal(batch.tokens_BxN[0], [1, 1, 1, 0, 0])  # responses on the right
  assert batch.group_B.tolist() == [101, 101, 103, 103, 200, 200]
  assert m["train/num_gen_batches"] == 2 and m["train/kept_group_fraction"] == 5 / 8
  assert m["train/rollouts_per_trained_sample"] == 16 / 6 and m["train/surplus_discarded_groups"] == 2


def test_accumulator_carry_over_and_state():
  acc = GroupAccumulator(DynamicSampling(train_batch_size=1, carry_over=True), group_size=2)
  b = _batch([1, 0, 0, 1, 1, 0], 7)
  acc.add(b)
  batch, m = acc.take()
  assert m["train/surplus_groups"] == 2 and m["train/surplus_discarded_groups"] == 0
  assert acc.ready and acc.carried_in == 2  # the next step starts with the surplus
  state = acc.state()
  fresh = GroupAccumulator(DynamicSampling(train_batch_size=1, carry_over=True), group_size=2)
  fresh.restore(state)
  nxt, m2 = fresh.take()
  assert m2["train/num_gen_batches"] == 0 and m2["train/carried_in_groups"] == 2
  assert np.isnan(m2["train/kept_group_fraction"])  # nothing sampled this step
  assert _tags(nxt) == [7, 7] and nxt.group_B.tolist() == [701, 701]


def test_accumulator_exhaustion_policies():
  strict = GroupAccumulator(DynamicSampling(train_batch_size=4, max_num_gen_batches=2), group_size=2)
  b = _batch([1, 1, 1, 0], 0)
  strict.add(b)
  with pytest.raises(DynamicSamplingExhausted, match="kept 2 of 4 groups after 2 generation batches"):
    strict.add(b)
  lenient = GroupAccumulator(DynamicSampling(train_batch_size=4, max_num_gen_batches=2,
                                             on_exhausted="train_on_kept"), group_size=2)
  lenient.add(b)
  lenient.add(b)
  batch, m = lenient.take()
  assert batch.num_rows == 4 and m["train/num_trained_groups"] == 2
  hopeless = GroupAccumulator(DynamicSampling(train_batch_size=4, max_num_gen_batches=2,
                                              on_exhausted="train_on_kept"), group_size=2)
  wrong = _batch([0, 0, 0, 0], 0)
  hopeless.add(wrong)
  with pytest.raises(DynamicSamplingExhausted, match="kept 0 of 4 groups .*, so even on_exhausted='train_on_kept' "
                                                     "has nothing to train on") as e:
    hopeless.add(wrong)
  assert "or set on_exhausted" not in str(e.value)
  off = GroupAccumulator(DynamicSampling(train_batch_size=2, enable=False), group_size=2)
  off.add(b)
  assert off.ready and off.take()[1]["train/kept_group_fraction"] == 1.0
  with pytest.raises(ValueError, match="on_exhausted"):
    DynamicSampling(train_batch_size=1, on_exhausted="ignore")


def test_the_filter_metric_is_the_strategys():
  b = _batch([1, 1, 0, 0], 0)._replace(score_B=np.float32([1, 1, -1, -1]), penalty_B=np.float32([0, -0.5, 0, 0]))
  assert GroupAccumulator(DynamicSampling(train_batch_size=2, metric="acc"), group_size=2).add(b) == 0
  # The overlong penalty differs inside the first group: seq_reward disagrees there, acc and score do not.
  assert GroupAccumulator(DynamicSampling(train_batch_size=2, metric="seq_reward"), group_size=2).add(b) == 1
  assert DynamicSampling(train_batch_size=4, gen_batch_size=12).gen_batch_prompts == 12
  assert DynamicSampling(train_batch_size=4, gen_batch_size=12, enable=False).gen_batch_prompts == 4


def test_carried_groups_get_the_log_probs_of_the_weights_that_sampled_them_once():
  acc = GroupAccumulator(DynamicSampling(train_batch_size=1, carry_over=True), group_size=2)
  acc.add(_batch([1, 0, 0, 1, 1, 0, 1, 0], 3))
  acc.take()  # 1 group trained, 3 carried
  calls = []

  def logprobs(part):
    calls.append(part.num_rows)
    return np.full(part.tokens_BxN.shape, -0.5, np.float32)
  acc.compute_carried_logprobs(logprobs, rows=4)
  assert calls == [4, 2]  # at most `rows` rows a call
  carried = acc.carried
  assert carried.old_logp_known_B.all() and np.all(carried.old_logp_BxN == -0.5)
  acc.take()  # 1 trained, 2 carried again: they keep their log-probs, nothing is recomputed
  acc.compute_carried_logprobs(logprobs, rows=4)
  assert calls == [4, 2] and np.all(acc.carried.old_logp_BxN == -0.5)
  back = GroupAccumulator(DynamicSampling(train_batch_size=1, carry_over=True), group_size=2)
  back.restore(acc.state())
  for name in ScoredBatch._fields:
    np.testing.assert_array_equal(getattr(back.carried, name), getattr(acc.carried, name))


def test_a_carried_batch_from_a_record_without_the_newer_fields():
  # A checkpoint from before old log-probs, predictions and group ids were kept: the log-probs are recomputed.
  record = {k: v for k, v in _batch([1, 0], 0).to_record().items()
            if k not in ("old_logp_BxN", "old_logp_known_B", "pred_B", "has_pred_B", "group_B")}
  back = ScoredBatch.from_record(record)
  assert back.old_logp_BxN.shape == (2, 3) and not back.old_logp_known_B.any() and not back.has_pred_B.any()
  with pytest.raises(ValueError, match=r"lacks the fields \['acc_B'\]"):
    ScoredBatch.from_record({k: v for k, v in record.items() if k != "acc_B"})


# --- the loss -----------------------------------------------------------------------------------------------

def np_token_loss(logp, old, adv, lo=0.2, hi=0.28, c=10.0):
  r = np.exp(logp - old)
  l1, l2 = -adv * r, -adv * np.clip(r, 1 - lo, 1 + hi)
  loss = np.maximum(l1, l2)
  return np.where(adv < 0, np.minimum(loss, -adv * c), loss)


@pytest.mark.parametrize("adv,ratio,want", [(1.0, 1.5, -1.28), (1.0, 0.5, -0.5), (-1.0, 0.5, 0.8),
                                            (-1.0, 1.2, 1.2), (-1.0, 20.0, 10.0), (2.0, 1.0, -2.0)])
def test_per_token_loss_reference_vectors(adv, ratio, want):
  logp = jnp.array([[np.log(ratio)]], jnp.float32)
  loss, _ = policy_loss(logp, jnp.zeros((1, 1)), jnp.array([adv]), jnp.ones((1, 1)))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_loss_metrics_and_aggregations_match_numpy():
  rng = np.random.default_rng(0)
  b, t = 6, 9
  logp = rng.normal(-2, 0.5, (b, t)).astype(np.float32)
  old = (logp + rng.normal(0, 0.4, (b, t))).astype(np.float32)
  adv = rng.normal(0, 1, b).astype(np.float32)
  mask = (np.arange(t)[None] < rng.integers(1, t + 1, b)[:, None]).astype(np.float32)
  ref = np_token_loss(logp, old, adv[:, None])
  want = {"token-mean": (ref * mask).sum() / mask.sum(),
          "seq-mean-token-mean": np.mean((ref * mask).sum(1) / mask.sum(1)),
          "seq-mean-token-sum": np.mean((ref * mask).sum(1)),
          "seq-mean-token-sum-norm": (ref * mask).sum() / (b * 32)}
  for agg, value in want.items():
    loss, m = policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), agg=agg,
                          norm_len=32 if agg.endswith("norm") else None)
    np.testing.assert_allclose(float(loss), value, rtol=1e-5, err_msg=agg)
  r = np.exp(logp - old)
  a = adv[:, None] * np.ones_like(r)
  high = (a > 0) & (r > 1.28)
  low = (a < 0) & (r < 0.8)
  np.testing.assert_allclose(float(m["pg_clipfrac_high"]), (high * mask).sum() / mask.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(m["pg_clipfrac_low"]), (low * mask).sum() / mask.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(m["ppo_kl"]), ((old - logp) * mask).sum() / mask.sum(), rtol=1e-5)
  assert float(m["pg_clipfrac"]) == pytest.approx(float(m["pg_clipfrac_high"] + m["pg_clipfrac_low"]))


def test_token_mean_over_microbatches_with_global_count_is_exact():
  rng = np.random.default_rng(1)
  loss_BxT = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  mask = jnp.asarray(rng.random((8, 5)) < 0.6, jnp.float32)
  whole = aggregate(loss_BxT, mask, "token-mean")
  total = jnp.sum(mask)
  parts = sum(aggregate(loss_BxT[i:i + 2], mask[i:i + 2], "token-mean", num_tokens=total) for i in range(0, 8, 2))
  np.testing.assert_allclose(float(parts), float(whole), rtol=1e-6)
  # The reference's scheme (per-micro-batch token mean weighted by sequences) is not the token mean.
  ref_style = sum(aggregate(loss_BxT[i:i + 2], mask[i:i + 2], "token-mean") * 2 / 8 for i in range(0, 8, 2))
  assert abs(float(ref_style) - float(whole)) > 1e-3


def test_entropy_metric_and_bad_arguments():
  logits = jnp.zeros((1, 2, 4))
  _, m = policy_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)), logits=logits)
  np.testing.assert_allclose(float(m["entropy"]), np.log(4), rtol=1e-6)
  with pytest.raises(ValueError, match="not one of"):
    policy_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones(1), jnp.ones((1, 1)), agg="sum")
  with pytest.raises(ValueError, match="clip_c=0.5"):
    policy_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones(1), jnp.ones((1, 1)), clip_c=0.5)


def test_entropy_bonus_is_aggregated_like_the_policy_loss():
  # Rows of different lengths and entropies: the seq-mean modes weigh them differently from the token mean.
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 2, (3, 4, 5)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], np.float32)
  logp = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
  ent = -(np.exp(logp) * logp).sum(-1)
  want = {"token-mean": (ent * mask).sum() / mask.sum(),
          "seq-mean-token-mean": np.mean((ent * mask).sum(1) / mask.sum(1)),
          "seq-mean-token-sum": np.mean((ent * mask).sum(1)),
          "seq-mean-token-sum-norm": (ent * mask).sum() / (3 * 4)}
  zeros = jnp.zeros((3, 4))
  for agg, value in want.items():
    loss, m = policy_loss(zeros, zeros, jnp.ones(3), jnp.asarray(mask), agg=agg, logits=jnp.asarray(logits),
                          entropy_coef=0.01)
    np.testing.assert_allclose(float(m["entropy_loss"]), value, rtol=1e-5, err_msg=agg)
    np.testing.assert_allclose(float(loss), float(m["pg_loss"]) - 0.01 * value, rtol=1e-6, err_msg=agg)
    # The logged entropy stays the token mean whatever the aggregation.
    np.testing.assert_allclose(float(m["entropy"]), (ent * mask).sum() / mask.sum(), rtol=1e-5)
  with pytest.raises(ValueError, match="needs the logits"):
    policy_loss(zeros, zeros, jnp.ones(3), jnp.asarray(mask), entropy_coef=0.01)


def test_seq_mean_modes_count_only_rows_with_loss_tokens():
  # Row 1 is overlong-filtered (mask all zero): it is not a sequence of the mean. Row 0's token mean is 1.0.
  loss_BxT = jnp.array([[1.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
  mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  assert float(aggregate(loss_BxT, mask, "seq-mean-token-mean")) == 1.0
  assert float(aggregate(loss_BxT, mask, "seq-mean-token-sum")) == 2.0
  assert float(aggregate(loss_BxT, mask, "seq-mean-token-sum-norm", norm_len=4)) == 0.5
  assert float(aggregate(loss_BxT, mask, "token-mean")) == 1.0
  assert float(aggregate(loss_BxT, jnp.zeros_like(mask), "seq-mean-token-mean")) == 0.0


def test_low_var_kl_is_the_references_k3_clamped():
  # verl's kl_penalty(logp, ref, "low_var_kl"): kl = clamp(ref - logp, -20, 20); clamp(exp(kl) - kl - 1, -10, 10).
  logp = np.array([-1.0, -2.0, -0.1, -30.0, -0.5], np.float32)
  ref = np.array([-1.0, -1.5, -3.0, -0.2, -40.0], np.float32)
  d = np.clip(ref - logp, -20, 20)
  want = np.clip(np.exp(d) - d - 1, -10, 10)
  np.testing.assert_allclose(np.asarray(low_var_kl(jnp.asarray(logp), jnp.asarray(ref))), want, rtol=1e-6)
  assert want[0] == 0.0 and want[3] == 10.0  # equal policies: 0; far apart: the clamp
  import jax
  grad = jax.grad(lambda x: low_var_kl(x, jnp.asarray(ref)).sum())(jnp.asarray(logp))
  assert np.all(np.isfinite(np.asarray(grad)))  # the clamp before exp keeps the gradient finite
