"""Off-policy RL (`off_policy.py`): split meshes, the weights moved between them, the sampler running a fixed
number of steps ahead on its thread with partial rollouts, exact against the same schedule run inline and
across a crash."""

import json
import threading
import time

import jax
import numpy as np
import pytest

from dapo_jax import config_lib, off_policy, sharding
from dapo_jax import train as train_lib
from tests.conftest import final_params, run_main, tiny_config

OFF_POLICY = {"rollout.max_staleness": 1, "mesh.rollout_devices": 4, "reward.workers": 1, "eval.every": 0,
              "eval.before_train": False, "checkpoint.asynchronous": False, "rollout.engine.slots": 16,
              "rollout.partial_rollouts": True}


def _rows(workdir):
  return {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def _same_run(a, b):
  for x, y in zip(final_params(a, 3), final_params(b, 3), strict=True):
    np.testing.assert_array_equal(x, y)
  ra, rb = _rows(a), _rows(b)
  assert sorted(ra) == sorted(rb) == [1, 2, 3]
  for step in ra:
    keys = {k for k in ra[step] if not k.startswith(("timing_s/", "perf/"))}
    assert keys == {k for k in rb[step] if not k.startswith(("timing_s/", "perf/"))}
    for k in keys:
      assert ra[step][k] == rb[step][k] or (np.isnan(ra[step][k]) and np.isnan(rb[step][k])), (step, k)


def test_split_meshes_give_each_process_its_own_part_of_both():
  train, rollout = sharding.split_meshes({"data": -1}, {"data": 2, "tensor": -1}, 4)
  assert [d.id for d in rollout.devices.flat] == [0, 1, 2, 3] and dict(rollout.shape)["tensor"] == 2
  assert [d.id for d in train.devices.flat] == [4, 5, 6, 7]
  same, also = sharding.split_meshes({"data": -1}, None, 0)
  assert same is also and same.devices.size == 8
  with pytest.raises(ValueError, match="rollout_devices=8"):
    sharding.split_meshes({"data": -1}, None, 8)  # nothing left to train on


@pytest.mark.parametrize("changes, match", [
    ({"mesh.rollout_devices": 9}, "config.mesh.rollout_devices=9"),
    ({"mesh.rollout_devices": 4, "rollout.engine.slots": 6}, "the rollout mesh's data axes"),
    ({"rollout.max_staleness": 1}, "config.reward.workers"),
    ({"rollout.max_staleness": -1}, "config.rollout.max_staleness"),
])
def test_off_policy_settings_are_checked_with_the_config(data_dir, changes, match):
  config = tiny_config(data_dir, **changes)
  with pytest.raises(config_lib.ConfigValidationError, match=match):
    config_lib.validate(config, *config_lib.meshes(config))


def test_weights_move_to_the_rollout_mesh_device_to_device_and_survive_the_updates_donation():
  from flax import nnx
  from dapo_jax import model as M
  train, rollout = sharding.split_meshes({"fsdp": -1}, {"data": 2, "tensor": 2}, 4)
  cfg = M.preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                 num_kv_heads=2)
  graphdef, params = nnx.split(M.init_sharded(cfg, train, seed=0))
  abstract = jax.eval_shape(lambda x: x, params)
  timings = {}
  _, moved = off_policy.WeightSync(graphdef, abstract, train, rollout, concurrent=True)(params, timings)
  assert timings["timing_s/sync_weights"] > 0
  want = sharding.state_shardings(abstract, rollout)
  for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(moved), jax.tree.leaves(want), strict=True):
    assert b.sharding == s and {d.id for d in b.sharding.device_set} <= {0, 1, 2, 3}
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # On the trainer's own devices, a sampler beside the update gets a copy: the update donates its weights.
  before = [np.asarray(x) for x in jax.tree.leaves(params)]
  _, copied = off_policy.WeightSync(graphdef, abstract, train, train, concurrent=True)(params, {})
  jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(params)
  for a, b in zip(before, jax.tree.leaves(copied), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_the_sampler_runs_ahead_in_order_and_raises_its_errors_in_the_trainer():
  calls, gate = [], threading.Event()

  def generate(step, policy, version):
    gate.wait()
    calls.append((step, policy, version, threading.current_thread().name))
    if step == 3:
      raise ValueError("step 3 failed")
    return off_policy.Generated(step, version, None, {})

  mesh = sharding.make_mesh({"data": -1})
  sampler = off_policy.Sampler(generate, threaded=True, mesh=mesh)
  for step in (0, 1, 2, 3):
    sampler.submit(step, f"weights {max(0, step - 1)}", max(0, step - 1))
  gate.set()
  timings = {}
  assert sampler.result(1, timings).step == 1 and timings["timing_s/wait_rollout"] >= 0
  assert sampler.result(0, {}).step == 0
  with pytest.raises(ValueError, match="step 3 failed"):
    sampler.pending()  # steps 2 and 3: waits for both, and 3 failed
  assert [c[:3] for c in calls] == [(0, "weights 0", 0), (1, "weights 0", 0), (2, "weights 1", 1),
                                    (3, "weights 2", 2)]
  assert {c[3] for c in calls} == {"dapo-sampler"}
  sampler.close()

  # Closed while it generates: the generation sees `cancelled` and the thread ends.
  def slow(step, policy, version):
    while not sampler.cancelled:
      time.sleep(0.01)
    raise off_policy.Cancelled

  sampler = off_policy.Sampler(slow, threaded=True, mesh=mesh)
  sampler.submit(0, None, 0)
  sampler.close()
  assert not sampler._thread.is_alive()


def test_off_policy_on_a_thread_equals_the_same_schedule_inline_and_resumes_after_a_crash_bitwise(
    tmp_path, data_dir, monkeypatch):
  config = tiny_config(data_dir, **OFF_POLICY)
  train_lib.train_and_evaluate(config, str(tmp_path / "threaded"))
  rows = _rows(tmp_path / "threaded")
  # Step t's batch is sampled by the weights of step t - 1 (step 0's and 1's by the first weights), and the
  # trainer's log-probs move away from the sampler's once the weights do (the first update has lr 0, warmup).
  assert [rows[s]["rollout/weight_version"] for s in (1, 2, 3)] == [0.0, 0.0, 1.0]
  assert [rows[s]["rollout/staleness/max"] for s in (1, 2, 3)][:2] == [0.0, 1.0]
  assert rows[2]["training/rollout_probs_diff_max"] < 1e-5 < 1e-3 < rows[3]["training/rollout_probs_diff_max"]
  assert all(rows[s]["timing_s/sync_weights"] > 0 for s in (1, 2))
  # Partial rollouts: groups left unfinished by one step's batch continue in the next with its weights, so
  # step 3 trains tokens of the weights of steps 0 (lag 2, sampled for step 1 and continued) and 1 (lag 1).
  assert rows[2]["rollout/partial/continued_groups"] > 0 and rows[2]["rollout/partial/continued_tokens"] > 0
  assert all(rows[s]["rollout/partial/unfinished_groups"] > 0 for s in (1, 2))
  assert rows[3]["rollout/staleness/max"] == 2.0 and rows[3]["rollout/tokens_at_staleness_2"] > 0
  assert rows[3]["rollout/tokens_at_staleness_1"] > 0 and rows[3].get("rollout/tokens_at_staleness_0", 0) == 0

  real_init = off_policy.Sampler.__init__

  def inline(self, generate, *, threaded, mesh):
    real_init(self, generate, threaded=False, mesh=mesh)
  with monkeypatch.context() as m:
    m.setattr(off_policy.Sampler, "__init__", inline)
    train_lib.train_and_evaluate(config, str(tmp_path / "inline"))
  _same_run(tmp_path / "threaded", tmp_path / "inline")

  # Killed after checkpoint 2 (it holds the batch sampled ahead for step 2) but before step 2's logs.
  real_write = train_lib.MetricWriter.write

  def crash_at_2(self, step, metrics):
    if step == 2:
      raise KeyboardInterrupt("killed")
    real_write(self, step, metrics)
  with monkeypatch.context() as m:
    m.setattr(train_lib.MetricWriter, "write", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
      train_lib.train_and_evaluate(config, str(tmp_path / "crashed"))
  train_lib.train_and_evaluate(config, str(tmp_path / "crashed"))
  _same_run(tmp_path / "threaded", tmp_path / "crashed")


def test_synchronous_on_split_devices_trains_as_one_mesh(tmp_path, data_dir):
  """Staleness 0 with a device of its own for the sampler (2 CPU devices: one samples, one trains) against
  the same meshes shared (1 device): the same batches and weights, bit for bit."""
  common = {"eval.every": 0, "eval.before_train": False, "checkpoint.asynchronous": False}
  split = tiny_config(data_dir, **common, **{"mesh.rollout_devices": 1, "hardware.cpu_devices": 2})
  one = tiny_config(data_dir, **common, **{"hardware.cpu_devices": 1})
  procs = [run_main(split, tmp_path / "split"), run_main(one, tmp_path / "one")]
  for p in procs:
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
  _same_run(tmp_path / "split", tmp_path / "one")
  assert _rows(tmp_path / "split")[1]["timing_s/sync_weights"] > 0
