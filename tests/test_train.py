"""The training loop end to end on a tiny config: outputs, config checks, checkpoints and exact resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import checkpoint as ckpt_lib
from dapo_jax import config_lib, sharding
from dapo_jax.metrics import read_metrics
from dapo_jax.train import train_and_evaluate
from dapo_jax.train_step import NonFiniteError

from tests.conftest import ROOT, final_params as _final_params, run_main as _run, subprocess_env, tiny_config


def test_training_writes_metrics_plots_and_checkpoints(tmp_path, data_dir, monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = tiny_config(data_dir, **{"log.wandb": True, "log.wandb_mode": "offline"})  # no network, no account
  result = train_and_evaluate(config, str(tmp_path))
  assert "val/acc/mean" in result
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in rows]
  assert steps == [0, 1, 2, 3]
  for key in ("critic/score/mean", "critic/acc/mean", "response_length/mean", "response_length/clip_ratio",
              "actor/pg_clipfrac", "actor/entropy", "actor/grad_norm", "actor/ppo_kl", "actor/lr",
              "train/num_gen_batches", "timing_s/gen", "timing_s/reward", "timing_s/old_log_prob",
              "timing_s/update_actor", "timing_s/step", "perf/gen_tokens_per_s", "perf/cpu_cores"):
    assert all(key in r for r in rows[1:]), key
  # One name per quantity (the reference's duplicates critic/rewards, critic/returns, and ours, are not logged).
  for gone in ("critic/rewards/mean", "critic/returns/mean", "actor/pg_clipfrac_dual", "val/acc/mean@2"):
    assert not any(gone in r for r in rows), gone
  assert [("val/acc/mean" in r, "val/acc/best@2/mean" in r) for r in rows] == [(True, True), (False, False),
                                                                                (True, True), (True, True)]
  for r in (rows[0], rows[2], rows[3]):
    # Exact maj@k <= pass@k; the bootstrap best@k (subsets drawn with replacement) <= the exact pass@k.
    assert 0 <= r["val/maj@2"] <= r["val/pass@2"] and r["val/acc/best@2/mean"] <= r["val/pass@2"]
    assert r["val/acc/mean"] <= r["val/acc/best@2/mean"]
  from PIL import Image
  assert Image.open(tmp_path / "curves.png").size == (1848, 374)  # the four panels of metrics.PLOT_PANELS
  assert any((tmp_path / "tensorboard").iterdir())
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2", "3"]
  assert (tmp_path / "samples.jsonl").is_file()
  # Weights & Biases, offline: one run, under the id kept for a resume, holding the logged metrics.
  run_id = (tmp_path / "wandb_run_id").read_text()
  (run_file,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
  logged = run_file.read_bytes()
  for key in ("critic/score/mean", "actor/pg_loss", "val/acc/mean", "val/acc/best@2/mean"):
    assert key.encode() in logged, key
  # The evaluation CLI on the workdir, with no --config, evaluates it with the config it ran with (2 layers).
  env = subprocess_env()
  out = subprocess.run([sys.executable, "-m", "dapo_jax.evaluate", f"--checkpoint={tmp_path}", "--dataset=task",
                        "--k=2", "--limit=4", "--max_new_tokens=8"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  assert "run_config.json" in out.stdout and "checkpoint step 3" in out.stdout
  assert json.loads((tmp_path / "eval_task_k2.json").read_text())["k"] == 2
  # Overrides apply on top of run_config.json (they used to be dropped silently).
  out = subprocess.run([sys.executable, "-m", "dapo_jax.evaluate", f"--checkpoint={tmp_path}", "--dataset=task",
                        "--k=2", "--limit=4", "--max_new_tokens=8", "--config.data.max_prompt_length=4",
                        f"--out={tmp_path / 'short.json'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  assert json.loads((tmp_path / "short.json").read_text())["truncated_prompts"] == 4
  # Exported as a Hugging Face checkpoint: the same policy and tokenizer, loaded from the export alone.
  out = subprocess.run([sys.executable, "-m", "dapo_jax.export", f"--checkpoint={tmp_path}", "--step=2",
                        f"--out={tmp_path / 'hf'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  assert "tokenizer.model, tokenizer_config.json, generation_config.json" in out.stdout
  from dapo_jax import model as M, runs
  from dapo_jax.tokenizer import load_tokenizer
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  trained, tok = runs.load_policy(str(tmp_path), config, mesh, step=2)
  exported, _ = M.load_hf(tmp_path / "hf", mesh=mesh)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, trained.cfg.vocab_size, (2, 9)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(exported(tokens)), np.asarray(trained(tokens)))
  tok2 = load_tokenizer(tmp_path / "hf")
  prompt = tok.apply_chat_template([{"role": "user", "content": "7+5"}])
  assert tok2.apply_chat_template([{"role": "user", "content": "7+5"}]) == prompt
  assert tok2.encode(prompt) == tok.encode(prompt) and tok2.stop_ids == tok.stop_ids
  # The same workdir with another config is refused; with the override it resumes (and has nothing to do).
  with pytest.raises(ValueError, match=r"holds a run of another config \(fields differ: \['actor.lr'\]"):
    train_and_evaluate(tiny_config(data_dir, **{"actor.lr": 5e-4}), str(tmp_path))
  # Killed after checkpoint 3 was saved but before its log rows were written: resuming writes them from it.
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
  samples = (tmp_path / "samples.jsonl").read_text().splitlines()
  (tmp_path / "samples.jsonl").write_text("".join(s + "\n" for s in samples if json.loads(s)["step"] < 3))
  train_and_evaluate(tiny_config(data_dir, **{"actor.lr": 5e-4, "allow_different_config": True}), str(tmp_path))
  back = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(back) == len(lines) and json.loads(back[-1])["step"] == 3
  measured = lambda k: k.startswith("timing_s/") or k == "perf/cpu_cores"  # noqa: E731
  assert {k: v for k, v in json.loads(back[-1]).items() if not measured(k)} == \
      {k: v for k, v in json.loads(lines[-1]).items() if not measured(k)}
  assert (tmp_path / "samples.jsonl").read_text().splitlines() == samples
  # Killed between the two writes: the metrics row is there, the sample lines are not.
  (tmp_path / "samples.jsonl").write_text("".join(s + "\n" for s in samples if json.loads(s)["step"] < 3))
  train_and_evaluate(tiny_config(data_dir, **{"actor.lr": 5e-4, "allow_different_config": True}), str(tmp_path))
  assert (tmp_path / "samples.jsonl").read_text().splitlines() == samples
  assert (tmp_path / "metrics.jsonl").read_text().splitlines() == back


def test_a_run_that_failed_before_its_first_checkpoint_starts_again_with_a_corrected_config(tmp_path, data_dir):
  with pytest.raises(ValueError, match="must name a tokenizer for real data"):
    train_and_evaluate(tiny_config(data_dir, **{"data.name": "math", "total_steps": 0}), str(tmp_path))
  assert (tmp_path / "config.json").is_file() and not (tmp_path / "checkpoints").exists()
  train_and_evaluate(tiny_config(data_dir, total_steps=0), str(tmp_path))  # not "holds a run of another config"
  assert (tmp_path / "checkpoints" / "0").is_dir()
  with pytest.raises(ValueError, match="holds a run of another config"):
    train_and_evaluate(tiny_config(data_dir, **{"data.name": "math", "total_steps": 0}), str(tmp_path))


@pytest.mark.parametrize("field,value,match", [
    ("actor.mini_batch_size", 3, "actor.mini_batch_size: 3 does not divide rollout.train_batch_size=4"),
    ("actor.micro_batch_size", {"actor.packed": False, "actor.micro_batch_size": 3},
     "actor.micro_batch_size: 3 rows do not divide a mini-batch of 8 rows"),
    ("actor.micro_batch_size", {"actor.packed": False, "actor.micro_batch_size": 4},
     "actor.micro_batch_size: 4 rows do not divide over the 8 devices"),
    ("actor.max_tokens_per_micro_batch", 40, "actor.max_tokens_per_micro_batch: 40 tokens cannot hold a row of "
     r"data.max_prompt_length \+ rollout.max_response_length = \d+ tokens"),
    ("actor.clip_low", 1.5, r"actor.clip_low: must be in \[0, 1\)"),
    ("actor.clip_c", 1.0, "actor.clip_c: the dual-clip constant must be > 1"),
    ("overlong.buffer", 32, "overlong.buffer: 32 must be positive and smaller than rollout.max_response_length=32"),
    ("reward.name", "nope", "reward.name: unknown reward 'nope'"),
    ("rollout.group_size", 1, "rollout.group_size: dynamic sampling needs groups of at least 2"),
    ("actor.loss_agg", "sum", "actor.loss_agg: 'sum' is not one of"),
    ("checkpoint.every", -1, "checkpoint.every: must be a non-negative integer"),
    ("actor.lr", -1e-3, "actor.lr: must be >= 0"),
    ("actor.warmup_steps", -2, "actor.warmup_steps: must be an integer >= 0"),
    ("actor.grad_clip", 0.0, "actor.grad_clip: must be > 0"),
    ("actor.weight_decay", -1.0, "actor.weight_decay: must be >= 0"),
    ("rollout.top_k", -5, "rollout.top_k must be >= 0"),
    ("eval.top_p", 0.0, r"eval.top_p must be in \(0, 1\]"),
    ("overlong.factor", -1.0, "overlong.factor: must be >= 0"),
    ("dynamic_sampling.metric", "reward", "dynamic_sampling.metric: must be one of"),
    ("dynamic_sampling.max_num_gen_batches", -1, "dynamic_sampling.max_num_gen_batches: must be an integer >= 0"),
    ("checkpoint.keep", 0, "checkpoint.keep: must be a positive integer"),
    ("data.max_prompt_length", 0, "data.max_prompt_length: must be a positive integer"),
    ("reward.workers", -1, "reward.workers: must be a non-negative integer"),
    ("reward.timeout_s", 0.0, "reward.timeout_s: must be > 0 seconds"),
    ("reward.kill_after_s", 0.0, "reward.kill_after_s: must be > 0 seconds"),
    ("eval.every", -1, "eval.every: must be a non-negative integer"),
])
def test_config_is_validated_before_anything_is_built(tmp_path, data_dir, field, value, match):
  with pytest.raises(config_lib.ConfigValidationError, match=match):
    train_and_evaluate(tiny_config(data_dir, **(value if isinstance(value, dict) else {field: value})),
                       str(tmp_path / "run"))
  assert not any(tmp_path.iterdir())  # nothing written: the corrected command starts afresh


def test_a_diverging_run_stops_naming_the_step_and_the_cause_and_saves_nothing_non_finite(tmp_path, data_dir):
  # lr 1e10: the first update's gradient is finite, the weights it gives are not usable (NaN logits after).
  config = tiny_config(data_dir, **{"actor.lr": 1e10, "actor.warmup_steps": 0, "eval.every": 0,
                                    "total_steps": 4})
  with pytest.raises(NonFiniteError, match=r"^step [12]: .*(not finite|skipped).*actor\.lr=1e\+10; try "
                                           r"--config\.actor\.lr=1e\+09.*The newest checkpoint is step [01]"):
    train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] <= 1
  for step in steps:
    assert all(np.isfinite(x).all() for x in _final_params(tmp_path, step))
  assert max(r["step"] for r in read_metrics(tmp_path)) <= steps[-1]  # the failing step logged nothing


def test_an_override_of_a_field_the_run_config_lacks_is_refused():
  import ml_collections
  from dapo_jax import cli
  config = ml_collections.ConfigDict({"data": {"max_prompt_length": 8}, "seed": 0})
  cli.apply_override(config, "data.max_prompt_length", 4, "run_config.json")
  assert config.data.max_prompt_length == 4
  for field in ("data.nope", "nope.x", "seed.x"):
    with pytest.raises(SystemExit, match=rf"--config.{field}: run_config.json has no field '{field}'"):
      cli.apply_override(config, field, 1, "run_config.json")


def test_real_data_set_and_split_names_are_checked_with_the_config(data_dir):
  for changes, match in [({"data.train_split": "validation"},
                          r"data.train_split: data set 'gsm8k' has no split 'validation'; it has \['test', "
                          r"'train'\], e.g. --config.data.train_split=test"),
                         ({"data.eval": "aime"}, r"data.eval: unknown data set 'aime'; known: \['aime24'"),
                         ({"data.eval": "aime24", "data.eval_split": "train"},
                          r"data.eval_split: data set 'aime24' has no split 'train'; it has \['test'\]")]:
    with pytest.raises(config_lib.ConfigValidationError, match=match):
      config_lib.validate(tiny_config(data_dir, **{"data.name": "math", **changes}))


def test_a_url_workdir_is_refused_before_anything_is_written(tmp_path, data_dir, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="--workdir=gs://bucket/run: URLs are not supported; give a path every"):
    train_and_evaluate(tiny_config(data_dir), "gs://bucket/run")
  assert not any(tmp_path.iterdir())


def test_generation_batch_must_divide_the_mesh(data_dir):
  mesh = sharding.make_mesh({"data": 8})
  with pytest.raises(config_lib.ConfigValidationError, match="rollout.gen_batch_size: 3 prompts x 4 responses do "
                                                             "not divide over the 8 devices"):
    config_lib.validate(tiny_config(data_dir, **{"rollout.gen_batch_size": 3}), mesh)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, asynchronous=True)
  for step in (1, 2):
    ck.save(step, {"w": jnp.full((4,), float(step))}, {"data": {"index": step}, "carry": []})
  ck.close()
  files = [p for p in (tmp_path / "2").rglob("*") if p.is_file() and p.stat().st_size > 0 and "state" in str(p)]
  for f in files:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3)
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  with caplog.at_level("WARNING"):
    step, state, record = ck.restore_latest(abstract)
  assert step == 1 and record["data"]["index"] == 1
  np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(4))
  assert any("checkpoint" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
  # The unreadable step is kept beside, out of orbax's way: the resumed run's next saves are written.
  assert (tmp_path / "2.unreadable").is_dir() and ck.steps() == [1]
  ck.save(2, {"w": jnp.full((4,), 7.0)}, {"data": {"index": 2}, "carry": []}, wait=True)
  ck.save(3, {"w": jnp.full((4,), 8.0)}, {"data": {"index": 3}, "carry": []}, wait=True)
  assert ck.steps() == [1, 2, 3]
  step, state, _ = ck.restore_latest(abstract)
  assert step == 3 and float(state["w"][0]) == 8.0
  ck.close()


_NOISE = ("Event loop is closed", "Exception ignored", "exception was never retrieved", "shutting down")


def _checkpoint_failure(kind: str, directory):
  env = subprocess_env()
  # Through a pipe: the "full" case caps file sizes, a log file included.
  out = subprocess.run([sys.executable, "-m", "tests.checkpoint_failures", kind, str(directory)], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
  return out.returncode, out.stdout


def test_a_corrupted_checkpoint_falls_back_without_a_flood_of_tracebacks(tmp_path):
  rc, out = _checkpoint_failure("corrupt", tmp_path)
  assert rc == 0 and out.splitlines()[-1] == "restored step 1", out[-3000:]
  assert "is unreadable" in out and not [n for n in _NOISE if n in out], out[-3000:]


def test_a_checkpoint_that_cannot_be_written_fails_with_its_cause_last(tmp_path):
  rc, out = _checkpoint_failure("full", tmp_path)
  assert rc == 1, (rc, out[-3000:])
  assert out.splitlines()[-1].startswith("dapo_jax.checkpoint.CheckpointWriteError: a checkpoint being written "
                                         f"asynchronously could not be written to {tmp_path}: "), out[-3000:]
  assert "File too large" in out and not [n for n in _NOISE if n in out], out[-3000:]
  assert (tmp_path / "1").is_dir() and not (tmp_path / "2").exists()  # the last good checkpoint is kept


def test_a_save_orbax_refuses_is_an_error(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, asynchronous=False)
  ck.save(5, {"w": jnp.zeros(2)}, {"data": {}, "carry": []})
  ck.save(5, {"w": jnp.ones(2)}, {"data": {}, "carry": []})  # already saved: left as it is
  with pytest.raises(RuntimeError, match="checkpoint step 3 was not written"):
    ck.save(3, {"w": jnp.ones(2)}, {"data": {}, "carry": []})
  ck.close()


def test_runs_writing_one_cache_at_once_keep_one_whole_copy(tmp_path, monkeypatch):
  """The warm start's cache: runs that compute the same result at once (a sweep's points, two runs of one
  data.dir) each write a folder of their own and rename it into place; the first stays, the others' go."""
  import shutil
  import orbax.checkpoint as ocp
  path = tmp_path / "cache" / "key"
  path.parent.mkdir()
  (tmp_path / "cache" / ".key.a").mkdir()  # what writer a left when it was killed mid-save
  (tmp_path / "cache" / ".key.a" / "junk").write_text("x")
  first, second = {"w": jnp.arange(3.0)}, {"w": jnp.ones(3)}

  class Racing(ocp.StandardCheckpointer):  # while b renames, a's copy lands first
    def save(self, directory, state, **kw):
      super().save(directory, state, **kw)
      shutil.copytree(tmp_path / "a_result", path)

  assert ckpt_lib.save_tree(path, first, writer="a")
  assert ckpt_lib.save_tree(path, second, writer="b") is False  # already there: b's copy is dropped
  np.testing.assert_array_equal(ckpt_lib.restore_tree(path, first)["w"], first["w"])
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["key"]
  path.rename(tmp_path / "a_result")
  monkeypatch.setattr(ckpt_lib.ocp, "StandardCheckpointer", Racing)
  assert ckpt_lib.save_tree(path, second, writer="b") is False
  monkeypatch.undo()
  np.testing.assert_array_equal(ckpt_lib.restore_tree(path, first)["w"], first["w"])
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["key"]


def test_carry_over_round_trips_exactly():
  carry = [{"tokens": np.arange(6, dtype=np.int32).reshape(2, 3), "logp": np.float32([-0.1, -1e-8]),
            "text": np.asarray(["a", "b"], dtype=object), "flag": np.asarray([True, False])}]
  back = ckpt_lib._decode(json.loads(json.dumps(ckpt_lib._encode({"carry": carry}))))["carry"]
  for k, v in carry[0].items():
    assert back[0][k].dtype == v.dtype
    np.testing.assert_array_equal(back[0][k], v)
  # Records written before numeric arrays were stored as .npy bytes still read.
  old = {"__ndarray__": [[1.5, -2.0]], "dtype": "float32", "shape": [1, 2]}
  np.testing.assert_array_equal(ckpt_lib._decode(old), np.float32([[1.5, -2.0]]))


def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, data_dir):
  # With a KL term: the resumed run reads back the frozen reference policy its first start wrote.
  config = tiny_config(data_dir, total_steps=4, **{"eval.every": 0, "checkpoint.asynchronous": False,
                                                    "actor.kl_coef": 0.5})
  straight = _run(config, tmp_path / "straight")
  out, _ = straight.communicate(timeout=600)
  assert straight.returncode == 0, out[-3000:]

  victim = _run(config, tmp_path / "killed")
  deadline = time.monotonic() + 600
  while not (tmp_path / "killed" / "checkpoints" / "2").is_dir():
    assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[0][-3000:]
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.communicate()
  resumed = _run(config, tmp_path / "killed")
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out[-3000:]
  assert "resumed from checkpoint step" in out
  for a, b in zip(_final_params(tmp_path / "straight", 4), _final_params(tmp_path / "killed", 4)):
    np.testing.assert_array_equal(a, b)
  # The steps logged after the checkpoint and logged again on resume are not in the logs twice.
  for name in ("metrics.jsonl", "samples.jsonl"):
    steps = [[json.loads(line)["step"] for line in (tmp_path / run / name).read_text().splitlines()]
             for run in ("straight", "killed")]
    assert steps[0] == steps[1] and steps[0][-1] == 4, name
  rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()][1:]
  # Step 1 trains with lr 0 (warmup): the policy is still the reference, their KL 0 (to the rounding of two
  # programs: the update's forward pass under the gradient and the reference's); then it is not.
  assert abs(rows[0]["actor/kl_loss"]) < 1e-8 and all(r["actor/kl_loss"] > 1e-6 for r in rows[1:])
  assert all(r["actor/kl_coef"] == 0.5 and r["timing_s/ref"] > 0 for r in rows)


def test_trim_logs_keeps_rows_through_a_step_and_drops_a_cut_line(tmp_path):
  from dapo_jax.metrics import trim_logs
  (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "x": 2.0}\n{"step": 2}\n{"step": 3, "x"')
  trim_logs(tmp_path, 1)
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n{"step": 1, "x": 2.0}\n'
  trim_logs(tmp_path, -1)
  assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_signal_after_a_steps_checkpoint_decision_still_ends_on_a_checkpoint(tmp_path, data_dir, monkeypatch):
  # The signal lands just after step 1 decided not to checkpoint (the window a fresh-clone CI run hit): the run
  # goes on to finish step 2, checkpoints it and stops, so its last logged step is its last checkpoint.
  from dapo_jax.metrics import MetricWriter
  write = MetricWriter.write

  def write_then_signal(self, step, metrics):
    write(self, step, metrics)
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(MetricWriter, "write", write_then_signal)
  config = tiny_config(data_dir, total_steps=5, **{"eval.every": 0, "eval.before_train": False,
                                                   "checkpoint.every": 100})
  train_and_evaluate(config, str(tmp_path))
  logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert logged == [1, 2]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == 2


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, data_dir):
  config = tiny_config(data_dir, total_steps=50, **{"eval.every": 0, "checkpoint.every": 100,
                                                   "rollout.engine.slots": 16})  # rows wait for slots
  proc = _run(config, tmp_path)
  deadline = time.monotonic() + 600
  metrics = tmp_path / "metrics.jsonl"

  def last_step():  # the step-0 line (written before any DAPO step) does not count: the signal goes mid-run
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=-1)

  while last_step() < 1:
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  last = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
  assert 0 < last < 50 and steps[-1] == last


def test_evaluation_with_fewer_slots_equals_all_at_once(tmp_path, data_dir):
  from dapo_jax import tasks
  from dapo_jax.evaluation import evaluate_task
  from dapo_jax.rewards.executor import RewardExecutor
  config = tiny_config(data_dir, **{"eval.num_problems": 5, "eval.k": 2})
  mesh = sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])
  task = tasks.build(config, tmp_path)
  model = tasks.build_policy(config, task, mesh)
  with RewardExecutor(config.reward.name, workers=0, timeout_s=5.0) as executor, jax.set_mesh(mesh):
    whole = evaluate_task(model, task, config, jax.random.key(0), executor)
    config.rollout.engine.slots = 4  # 10 rows through 4 slots, 2 per device: sampled at temperature 1 all the same
    fewer = evaluate_task(model, task, config, jax.random.key(0), executor)
  assert whole == fewer and 0.0 < whole["val/response_length/mean"]


def test_advantages_are_summarised_over_response_tokens():
  from dapo_jax.metrics import token_summary
  adv_B = np.array([1.0, -1.0, 5.0])
  mask_BxN = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # row 2 has no token: left out
  s = token_summary("critic/advantages", adv_B, mask_BxN)
  assert s == {"critic/advantages/mean": 0.5, "critic/advantages/max": 1.0, "critic/advantages/min": -1.0}


def test_carried_groups_keep_the_log_probs_of_the_weights_that_sampled_them(tmp_path, data_dir):
  # Groups carried over by dynamic sampling train one or more steps later, under updated weights. Their old log-probs
  # must be those of the policy that sampled them, which in float32 are the sampler's own to ~1e-6; recomputed
  # with the new weights (lr 1e-3 here) they were off by far more.
  config = tiny_config(data_dir, total_steps=4, **{"eval.every": 0, "eval.before_train": False,
                                                    "dynamic_sampling.carry_over": True, "actor.warmup_steps": 0,
                                                    "rollout.train_batch_size": 2, "rollout.streaming": False,
                                                    "checkpoint.asynchronous": False})
  train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # This seed keeps 7 of the 8 groups of step 1's generation batch and trains 2 a step: steps 2 and 3 sample
  # nothing and train groups sampled 1 and 2 updates before (carried again and again); step 4 trains the last
  # carried group beside a new one.
  assert [r["train/carried_in_groups"] for r in rows] == [0, 5, 3, 1]
  assert [r["train/num_gen_batches"] for r in rows] == [1, 0, 0, 1] and np.isnan(rows[1]["rollout/acc/mean"])
  for r in rows:
    assert r["training/rollout_probs_diff_max"] < 1e-4, (r["step"], r["training/rollout_probs_diff_max"])
  # The checkpoint holds the carried groups with their log-probs, for a resumed run.
  for step in [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]:
    record = json.loads((tmp_path / "checkpoints" / str(step) / "record" / "metadata").read_text())
    for part in ckpt_lib._decode(record["carry"]["carry"]):
      assert part["old_logp_known_B"].all() and part["old_logp_BxN"].dtype == np.float32
      np.testing.assert_allclose(part["old_logp_BxN"], part["sampler_logp_BxN"], atol=2e-5)


def test_without_dynamic_sampling_a_generation_batch_is_the_training_batch(tmp_path, data_dir):
  # rollout.gen_batch_size (8) is for dynamic sampling; with it off every group is kept, and sampling 8 prompts to
  # train 4 threw half away.
  from dapo_jax import config_lib
  config = tiny_config(data_dir, total_steps=1, **{"eval.every": 0, "eval.before_train": False,
                                                    "dynamic_sampling.enable": False})
  assert config_lib.gen_batch_prompts(config) == 4
  train_and_evaluate(config, str(tmp_path))
  (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert row["train/rollouts_per_trained_sample"] == 1.0 and row["train/surplus_groups"] == 0


# One DAPO step of tiny_config (parity reward, streaming dynamic sampling, lr 1e-3 from the first step) on 8 fake CPU devices, as recorded. A change that moves any of them changes what
# a step computes: if that is intended, run this test, check the new values are explained by the change, and
# paste them here (the assertion message prints them all). Last recorded when attention went through
# jax.nn.dot_product_attention and the update packed its rows (padded gives the same to 1e-6).
GOLDEN_STEP = {
    "actor/pg_loss": 0.13304080069065094, "actor/pg_clipfrac": 0.07012195140123367,
    "actor/pg_clipfrac_high": 0.03963414579629898, "actor/pg_clipfrac_low": 0.030487805604934692,
    "actor/ppo_kl": 0.13483311235904694, "actor/grad_norm": 0.9106353521347046, "actor/entropy": 1.4613531827926636,
    "train/num_gen_batches": 1.0, "train/num_trained_groups": 4.0, "train/kept_group_fraction": 0.875,
    "critic/score/mean": 0.1875, "response_length/mean": 20.375,
    "train/dropped_groups": 0.0, "train/decoded_tokens_per_trained_token": 1.9662576687116564,
}


def test_one_dapo_step_gives_the_recorded_metrics(tmp_path, data_dir):
  config = tiny_config(data_dir, total_steps=1, **{"eval.every": 0, "eval.before_train": False,
                                                    "actor.warmup_steps": 0, "checkpoint.asynchronous": False})
  train_and_evaluate(config, str(tmp_path))
  (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  got = {k: row[k] for k in ("actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_high", "actor/pg_clipfrac_low",
                             "actor/ppo_kl", "actor/grad_norm", "actor/entropy", "train/num_gen_batches",
                             "train/num_trained_groups", "train/kept_group_fraction", "critic/score/mean",
                             "response_length/mean", "train/dropped_groups", "train/decoded_tokens_per_trained_token")}
  assert got.keys() == GOLDEN_STEP.keys() and all(
      np.isclose(got[k], GOLDEN_STEP[k], rtol=1e-4, atol=1e-7) for k in got), f"got {got}"


def test_streaming_trains_on_the_groups_generation_batches_keep(tmp_path, data_dir):
  # Streaming hands the filter the groups in prompt order (a group that finishes early waits for the ones
  # before it), and each group's samples are its own: the batch is the one whole generation batches give,
  # and so is the run, bit for bit.
  rows = {}
  for streaming in (False, True):
    # 16 slots: 4 of a generation batch's 8 groups decode at once, the others wait for slots.
    config = tiny_config(data_dir, total_steps=2, **{"eval.every": 0, "eval.before_train": False,
                                                      "rollout.streaming": streaming, "rollout.engine.slots": 16,
                                                      "checkpoint.asynchronous": False})
    train_and_evaluate(config, str(tmp_path / str(streaming)))
    rows[streaming] = [json.loads(line) for line in (tmp_path / str(streaming) / "metrics.jsonl").read_text()
                       .splitlines()]
  for a, b in zip(_final_params(tmp_path / "False", 2), _final_params(tmp_path / "True", 2)):
    np.testing.assert_array_equal(a, b)
  for whole, streamed in zip(rows[False], rows[True]):
    for key in ("actor/pg_loss", "actor/grad_norm", "critic/score/mean", "response_length/mean",
                "train/num_trained_groups", "train/num_gen_batches"):
      assert whole[key] == streamed[key], key
    # What each spent differs: streaming decodes ahead into the next generation batch while the current one's
    # last groups finish, and drops what is in flight when the batch fills.
    assert whole["train/dropped_groups"] == 0 and streamed["train/dropped_groups"] >= 0
    assert min(whole["train/decoded_tokens_per_trained_token"], streamed["train/decoded_tokens_per_trained_token"]) >= 1
