"""`rollout.Rollouts`: prompts -> a ScoredBatch whose every field is what the sampler, the tokenizer, the reward
and overlong shaping give for each row; chunked sampling equal to one call."""


import jax
import numpy as np
import pytest

from dapo_jax import config_lib, sharding, tasks
from dapo_jax.rewards import OverlongShaping, RewardExecutor, overlong_penalty
from dapo_jax.engine import EngineConfig
from dapo_jax.rollout import Rollouts, ScoredBatch
from tests.conftest import tiny_config
from tests.rewards import parity_reward


@pytest.fixture(scope="module")
def policy(data_dir):
  config = tiny_config(data_dir)
  task = tasks.build(config, None)
  mesh = sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])
  return config, task, tasks.build_policy(config, task, mesh), mesh


def test_a_scored_batch_holds_what_each_stage_gives(policy):
  config, task, model, mesh = policy
  tok = task.tokenizer
  rows = task.train_rows[:3]
  overlong = OverlongShaping(max_len=32, buffer=8)
  timings = {}
  with RewardExecutor(config.reward.name, workers=0) as executor, jax.set_mesh(mesh):
    batch = Rollouts(tok, executor, config_lib.sampling_params(config, tok), num_samples=2,
                     overlong=overlong)(model, rows, jax.random.key(3), first_group=10, timings=timings)
  assert isinstance(batch, ScoredBatch) and batch.num_rows == 6
  assert batch.group_B.tolist() == [10, 10, 11, 11, 12, 12]
  assert batch.truth_B.tolist() == [r["answer"] for r in rows for _ in range(2)]
  np.testing.assert_array_equal(batch.lengths_B, batch.mask_BxN.sum(axis=1))
  np.testing.assert_array_equal(batch.penalty_B, overlong_penalty(batch.lengths_B, 32, 8).astype(np.float32))
  np.testing.assert_array_equal(batch.reward_B, batch.score_B + batch.penalty_B)
  assert np.all(batch.sampler_logp_BxN[~batch.mask_BxN] == 0) and np.all(batch.sampler_logp_BxN[batch.mask_BxN] < 0)
  assert not batch.old_logp_known_B.any()
  for i in range(6):
    text = tok.decode(batch.tokens_BxN[i][batch.mask_BxN[i]])
    want = parity_reward(text, batch.truth_B[i])
    assert batch.text_B[i] == text and batch.pred_B[i] == want["pred"] and batch.has_pred_B[i]
    assert (batch.score_B[i], bool(batch.acc_B[i])) == (want["score"], want["acc"])
    prompt = batch.prompt_BxP[i][batch.prompt_mask_BxP[i]].tolist()
    assert prompt == rows[i // 2]["prompt_ids"]
  assert set(timings) == {"timing_s/gen", "timing_s/reward"}


def test_streamed_groups_and_slot_counts_change_no_sample(policy):
  config, task, model, mesh = policy
  tok = task.tokenizer
  params = config_lib.sampling_params(config, tok)
  rows = task.eval_rows[:5]
  with RewardExecutor(config.reward.name, workers=0) as executor, jax.set_mesh(mesh):
    whole = Rollouts(tok, executor, params, num_samples=2)(model, rows, jax.random.key(0), first_group=7)
    # 4 slots: rows wait for slots and are admitted as others stop; groups come back as they finish.
    few = Rollouts(tok, executor, params, num_samples=2, engine=EngineConfig(slots=4, steps_per_chunk=3))
    parts = list(few.stream(model, iter(rows), jax.random.key(0), first_group=7))
  streamed = ScoredBatch.concat(parts)
  assert len(parts) > 1 and sorted(streamed.group_B.tolist()) == whole.group_B.tolist()
  order = np.argsort(streamed.group_B, kind="stable")
  assert streamed.rows(order).text_B.tolist() == whole.text_B.tolist()
  np.testing.assert_array_equal(streamed.rows(order).score_B, whole.score_B)
  n = whole.tokens_BxN.shape[1]
  np.testing.assert_array_equal(streamed.rows(order).tokens_BxN[:, :n], whole.tokens_BxN)
  np.testing.assert_allclose(streamed.rows(order).sampler_logp_BxN[:, :n], whole.sampler_logp_BxN, atol=1e-5)
  assert few.engine.stats.finished_groups == 5 and few.engine.stats.dropped_groups == 0
