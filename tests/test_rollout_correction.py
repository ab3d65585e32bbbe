"""The rollout correction against a NumPy reference written out here, and in the loss and a training step."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import config_lib, loss as loss_lib
from dapo_jax.rollout_correction import RolloutCorrection

# Two rows: three tokens, then two (the third is padding).
OLD = np.array([[-1.0, -2.0, -0.5], [-2.5, -1.0, 0.0]])
ROLL = np.array([[-1.5, -1.0, -0.5], [-2.0, -1.1, 0.0]])
MASK = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def reference(level, threshold, rs=None, bounds=None, veto=None):
  """Each quantity by its definition, row by row."""
  weights, keep = np.zeros((2, 3)), np.zeros((2, 3))
  for b in range(2):
    n = int(MASK[b].sum())
    rho = [np.exp(OLD[b, t] - ROLL[b, t]) for t in range(n)]
    seq = np.prod(rho)
    for t in range(n):
      weights[b, t] = min(rho[t] if level == "token" else seq, threshold)
      ratio = {"token": rho[t], "sequence": seq, "geometric": np.exp(np.mean(np.log(rho))), None: 1.0}[rs]
      keep[b, t] = bounds[0] <= ratio <= bounds[1] if rs else 1.0
      if veto and min(rho) < veto:
        keep[b, t] = 0.0
  return weights, keep


@pytest.mark.parametrize("level,rs", [("token", None), ("sequence", None), ("token", "token"),
                                      ("sequence", "sequence"), ("token", "geometric")])
def test_weights_and_rejection_equal_the_reference(level, rs):
  c = RolloutCorrection(rollout_is=level, rollout_is_threshold=2.0, rollout_rs=rs or "", rollout_rs_threshold=1.5)
  weights, mask, metrics = c.apply(OLD, ROLL, MASK)
  want_w, want_keep = reference(level, 2.0, rs, (1 / 1.5, 1.5))
  np.testing.assert_allclose(weights, want_w, rtol=1e-6)
  np.testing.assert_array_equal(mask, MASK * want_keep)
  w = want_w[MASK > 0]
  np.testing.assert_allclose(metrics["rollout_corr/rollout_is_mean"], w.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["rollout_corr/rollout_is_max"], w.max(), rtol=1e-6)
  np.testing.assert_allclose(metrics["rollout_corr/rollout_is_eff_sample_size"], w.sum() ** 2 / (5 * (w * w).sum()),
                             rtol=1e-6)
  log_rho = (OLD - ROLL)[MASK > 0]
  np.testing.assert_allclose(metrics["rollout_corr/kl"], -log_rho.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["rollout_corr/k3_kl"], np.mean(np.exp(log_rho) - log_rho - 1), rtol=1e-6)
  if rs:
    np.testing.assert_allclose(metrics["rollout_corr/rollout_rs_masked_fraction"], 1 - want_keep[MASK > 0].mean())


def test_veto_rejects_the_row_of_a_catastrophic_token_and_configs_are_checked():
  _, mask, metrics = RolloutCorrection(rollout_token_veto_threshold=0.5).apply(OLD, ROLL, MASK)
  np.testing.assert_array_equal(mask, MASK * reference("token", 2.0, veto=0.5)[1])  # row 0: rho = e^-1 < 0.5
  assert metrics["rollout_corr/rollout_is_veto_fraction"] == 0.5
  assert not RolloutCorrection().enabled
  with pytest.raises(ValueError, match="rollout_is: 'row' is not one of"):
    RolloutCorrection(rollout_is="row")
  with pytest.raises(ValueError, match="rollout_rs_threshold_lower: 3.0 must be below the upper threshold 2.0"):
    RolloutCorrection(rollout_rs="token", rollout_rs_threshold_lower=3.0)


def test_the_weights_scale_each_tokens_policy_loss():
  rng = np.random.default_rng(0)
  logp, old = (jnp.asarray(rng.normal(-2, 0.3, (2, 3)), jnp.float32) for _ in range(2))
  adv, w = jnp.asarray([1.0, -1.0]), jnp.asarray(rng.uniform(0.5, 2.0, (2, 3)), jnp.float32)
  mask = jnp.asarray(MASK, jnp.float32)
  plain, _ = loss_lib.policy_loss(logp, old, adv, mask)
  same, _ = loss_lib.policy_loss(logp, old, adv, mask, is_weight=jnp.ones_like(w))
  weighted, _ = loss_lib.policy_loss(logp, old, adv, mask, is_weight=w)
  per_token, *_ = loss_lib.per_token_loss(logp, old, adv[:, None] * jnp.ones_like(logp), clip_low=0.2,
                                           clip_high=0.28, clip_c=10.0)
  assert float(same) == float(plain)
  np.testing.assert_allclose(float(weighted), float(jnp.sum(per_token * w * mask) / jnp.sum(mask)), rtol=1e-6)


def test_a_training_step_with_the_correction_logs_it(tmp_path, data_dir):
  from conftest import tiny_config
  from dapo_jax.train import train_and_evaluate
  with pytest.raises(config_lib.ConfigValidationError, match="config.rollout_correction.rollout_rs: 'x' is not"):
    train_and_evaluate(tiny_config(data_dir, **{"rollout_correction.rollout_rs": "x"}), str(tmp_path / "bad"))
  config = tiny_config(data_dir, total_steps=1, **{"eval.every": 0, "eval.before_train": False,
                                                    "rollout_correction.rollout_is": "token",
                                                    "rollout_correction.rollout_rs": "token",
                                                    "rollout_correction.rollout_rs_threshold": 1.01})
  train_and_evaluate(config, str(tmp_path / "run"))
  (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  # Sampler and trainer share the weights here: the gap is float noise, and the 1% band rejects nothing.
  assert abs(row["rollout_corr/rollout_is_mean"] - 1.0) < 1e-3 and abs(row["rollout_corr/kl"]) < 1e-4
  assert row["rollout_corr/rollout_rs_masked_fraction"] == 0.0 and np.isfinite(row["actor/pg_loss"])
