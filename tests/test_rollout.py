"""`rollout.Rollouts`: prompts -> a ScoredBatch whose every field is what the sampler, the tokenizer, the reward
and overlong shaping give for each row; chunked sampling equal to one call."""


import dataclasses

import jax
import numpy as np
import pytest

from dapo_jax import checkpoint, config_lib, sharding, tasks
from dapo_jax.rewards import OverlongShaping, RewardExecutor, overlong_penalty
from dapo_jax.engine import EngineConfig
from dapo_jax.rollout import PartialGroup, Rollouts, ScoredBatch
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


def test_partial_rollouts_continue_a_closed_streams_groups_as_if_never_stopped(policy):
  """`Rollouts.unfinished` of a stream closed mid-decoding, given to the next stream (`carried`) with the same
  weights and key, completes the groups as one stream would have: the same tokens, rewards and groups, log-probs
  to rounding; the tokens keep the version of the stream that sampled them. A checkpoint's record of them reads
  back exactly."""
  config, task, model, mesh = policy
  tok = task.tokenizer
  # An untrained policy: many stop tokens give responses of every length, so some are cut mid-response.
  params = dataclasses.replace(config_lib.sampling_params(config, tok), stop_ids=tuple(range(3, 15)))
  rows = task.eval_rows[:8]
  engine = EngineConfig(slots=6, steps_per_chunk=2)
  with RewardExecutor(config.reward.name, workers=0) as executor, jax.set_mesh(mesh):
    rollouts = Rollouts(tok, executor, params, num_samples=2, engine=engine)
    whole = ScoredBatch.concat(list(rollouts.stream(model, iter(rows), jax.random.key(0), first_group=7)))
    assert rollouts.unfinished == []
    source = iter(rows)  # pulled as slots free up: the rows not pulled yet come in the next stream
    stream = rollouts.stream(model, source, jax.random.key(0), first_group=7, version=3)
    first = next(stream)
    stream.close()
    left = rollouts.unfinished
    pulled = first.num_rows // 2 + len(left)
    assert 0 < len(left) and pulled <= 8
    assert any(len(t) and not d for pg in left for t, d in zip(pg.tokens, pg.done))  # cut mid-response
    assert rollouts.engine.stats.dropped_groups > 0
    left = [PartialGroup.from_record(checkpoint._decode(checkpoint._encode(pg.to_record()))) for pg in left]
    rest = ScoredBatch.concat(list(rollouts.stream(model, source, jax.random.key(0), first_group=7 + pulled,
                                                   version=4, carried=left)))
  both = ScoredBatch.concat([first, rest])
  for field in ("tokens_BxN", "mask_BxN", "group_B", "score_B", "truncated_B", "prompt_BxP"):
    np.testing.assert_array_equal(getattr(both, field), getattr(whole, field), err_msg=field)
  np.testing.assert_allclose(both.sampler_logp_BxN, whole.sampler_logp_BxN, atol=1e-5)
  assert set(np.unique(first.version_BxN[first.mask_BxN])) == {3}
  versions = rest.version_BxN[rest.mask_BxN]
  assert set(np.unique(versions)) == {3, 4} and np.all(rest.version_BxN[~rest.mask_BxN] == -1)
  assert np.all(rest.version_BxN[len(left) * 2:][rest.mask_BxN[len(left) * 2:]] == 4)  # the rows pulled anew
  # Within a row, the earlier weights' tokens come first.
  assert all(np.all(np.diff(v[m]) >= 0) for v, m in zip(rest.version_BxN, rest.mask_BxN))
