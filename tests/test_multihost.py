"""Multi-host runs on one machine: 2 processes x 2 CPU devices (gloo collectives, launch/local_multiprocess.sh)
train exactly as 1 process x 4 devices.

Both continue from the same checkpoint, written by a single process (so a checkpoint moves between process
counts), on the default data-parallel mesh: each device samples its own rows in its own loop and gradients
are all-reduced. The two runs sum gradients in different orders (gloo across processes, in-process
otherwise), so parameters agree to float32 rounding, not bitwise (1.5e-8 apart after two steps); everything
sampled, scored and kept is identical while that holds. Rounding apart is not enough forever: at the third
step here a near tie in sampling went the other way and the rollouts differed; from then on the two are
different runs, so the comparison stops at two steps.

The off-policy run splits the devices within each process (one samples, one trains, staleness 1, partial
rollouts, asynchronous checkpoints): the sampler's thread and the trainer exchange host data on channels of
their own and move weights device to device within each process; 2 x 2 trains as 1 x 4 split the same way.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, config_flags as _flags, final_params as _final_params, subprocess_env, tiny_config

STEPS = 2


def _single(config, workdir):
  out = subprocess.run([sys.executable, "-m", "dapo_jax.main", *_flags(config, workdir)], cwd=ROOT,
                       env=subprocess_env(4), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  return out.stdout


def _multi(config, workdir, logs):
  env = subprocess_env(2, NUM_PROCESSES="2", DEVICES_PER_PROC="2", PYTHON=sys.executable, LOG_DIR=str(logs))
  # --verbosity=1: each process's start-up line (INFO, hidden by default) says how it joined.
  out = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), *_flags(config, workdir),
                        "--verbosity=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  text = "".join((logs / f"proc_{i}.log").read_text() for i in range(2) if (logs / f"proc_{i}.log").is_file())
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + text[-4000:]
  return text


def _metrics(workdir):
  return {r["step"]: r for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  tmp = tmp_path_factory.mktemp("multihost")
  config = tiny_config(data_dir, total_steps=0, **{"eval.every": STEPS, "eval.before_train": False,
                                                    "checkpoint.asynchronous": False})
  _single(config, tmp / "start")  # the warm start and checkpoint 0
  for name in ("one", "two", "split_one", "split_two"):
    shutil.copytree(tmp / "start", tmp / name)
  config.total_steps = STEPS
  _single(config, tmp / "one")
  logs = _multi(config, tmp / "two", tmp / "logs")
  split = tiny_config(data_dir, total_steps=STEPS, **{
      "eval.every": STEPS, "eval.before_train": False, "reward.workers": 1, "rollout.max_staleness": 1,
      "rollout.partial_rollouts": True, "mesh.rollout_devices": 2, "allow_different_config": True})
  _single(split, tmp / "split_one")
  _multi(split, tmp / "split_two", tmp / "split_logs")
  return tmp, logs


def test_two_processes_train_like_one(runs):
  tmp, logs = runs
  assert "process 1 of 2 (explicit flags), 2 local / 4 global devices" in logs
  one, two = _metrics(tmp / "one"), _metrics(tmp / "two")
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  for step in one:
    for key in ("train/num_gen_batches", "train/num_trained_groups", "critic/acc/mean", "rollout/acc/mean",
                "response_length/mean", "critic/advantages/max"):
      assert one[step][key] == two[step][key], (step, key)
    for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm"):
      np.testing.assert_allclose(one[step][key], two[step][key], rtol=1e-4, atol=1e-6, err_msg=f"{step} {key}")
  assert one[STEPS]["val/acc/mean"] == two[STEPS]["val/acc/mean"]
  for a, b in zip(_final_params(tmp / "one", STEPS), _final_params(tmp / "two", STEPS), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_two_processes_train_off_policy_on_split_devices_like_one(runs):
  tmp, _ = runs
  one, two = _metrics(tmp / "split_one"), _metrics(tmp / "split_two")
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  assert [one[s]["rollout/weight_version"] for s in one] == [0.0, 0.0]  # steps 0 and 1 both sample version 0
  assert [one[s]["rollout/staleness/max"] for s in one] == [0.0, 1.0]
  for step in one:
    for key in ("train/num_gen_batches", "critic/acc/mean", "rollout/acc/mean", "response_length/mean",
                "rollout/weight_version"):
      assert one[step][key] == two[step][key], (step, key)
    for key in ("actor/pg_loss", "actor/grad_norm"):
      np.testing.assert_allclose(one[step][key], two[step][key], rtol=1e-4, atol=1e-6, err_msg=f"{step} {key}")
  assert one[1]["timing_s/sync_weights"] > 0 and two[1]["timing_s/sync_weights"] > 0  # none after the last
  for a, b in zip(_final_params(tmp / "split_one", STEPS), _final_params(tmp / "split_two", STEPS), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_only_process_zero_writes_logs(runs):
  tmp, _ = runs
  rows = (tmp / "two" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(r)["step"] for r in rows] == list(range(1, STEPS + 1))  # written once, not twice
  proc1 = (tmp / "logs" / "proc_1.log").read_text()
  assert "warm start" not in proc1 and "memory per device" not in proc1
  assert sorted(p.name for p in (tmp / "two" / "checkpoints").iterdir() if p.name.isdigit()) == \
      [str(s) for s in range(STEPS - 2, STEPS + 1)]


def test_two_processes_evaluate_like_one(runs):
  """The evaluation CLI across 2 processes x 2 devices: the same samples, scores and summary as 1 x 4 (each
  process samples its devices' rows and scores its block of responses), written once, by process 0."""
  tmp, _ = runs
  flags = [f"--checkpoint={tmp / 'one'}", "--dataset=task", "--k=4", "--limit=6", "--max_new_tokens=24"]
  out = subprocess.run([sys.executable, "-m", "dapo_jax.evaluate", *flags, f"--out={tmp / 'eval_one.json'}"],
                       cwd=ROOT, env=subprocess_env(4), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  env = subprocess_env(2, MODULE="dapo_jax.evaluate", NUM_PROCESSES="2", DEVICES_PER_PROC="2",
                       PYTHON=sys.executable, LOG_DIR=str(tmp / "eval_logs"))
  out = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), *flags,
                        f"--out={tmp / 'eval_two.json'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  logs = [(tmp / "eval_logs" / f"proc_{i}.log").read_text() for i in range(2)]
  assert out.returncode == 0, "".join(log[-2000:] for log in logs)
  one, two = (json.loads((tmp / f"eval_{n}.json").read_text()) for n in ("one", "two"))
  assert len(two["problems"]) == 6 and one["overall"] == two["overall"]
  assert [(p["correct"], p["majority_pred"], p["sample"]) for p in one["problems"]] == \
      [(p["correct"], p["majority_pred"], p["sample"]) for p in two["problems"]]
  assert "wrote" in logs[0] and "wrote" not in logs[1]


def test_process_blocks_of_a_global_batch_are_the_single_process_batch():
  from dapo_jax.data.iterator import PromptIterator
  rows = list(range(37))
  single = PromptIterator(rows, seed=3)
  hosts = [PromptIterator(rows, seed=3, process_index=i, num_processes=3) for i in range(3)]
  for n in (6, 9, 12, 30):  # crosses epoch boundaries
    assert sum((h.next_batch(n) for h in hosts), []) == single.next_batch(n)
  assert all(h.state() == single.state() for h in hosts)


def test_cluster_detection_and_flag_checks():
  from dapo_jax import distributed
  assert distributed.detect_cluster({}) is None
  assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task: no cluster
  assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == "SLURM"
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == "Cloud TPU pod"
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM
  assert distributed.initialize() is False  # nothing asked, nothing detected: single process
  with pytest.raises(ValueError, match="give all of --coordinator_address, --num_processes and --process_id"):
    distributed.initialize(coordinator_address="localhost:1234")
  assert [distributed.share(10, i, 3) for i in range(3)] == [slice(0, 4), slice(4, 7), slice(7, 10)]


def test_cpu_devices_split_the_host_before_jax_starts():
  from dapo_jax import distributed
  with pytest.raises(ValueError, match="hardware.cpu_devices"):
    distributed.set_cpu_devices(-2)
  assert distributed.set_cpu_devices(0) == 0  # JAX's default: nothing touched
  script = ("from dapo_jax import distributed; n = distributed.set_cpu_devices({n}); import jax; "
            "print(n, jax.device_count())")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  for n, want in ((3, "3 3"), (-1, f"{len(os.sched_getaffinity(0))} {len(os.sched_getaffinity(0))}")):
    out = subprocess.run([sys.executable, "-c", script.format(n=n)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == want.split()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # a launcher's explicit count wins
  out = subprocess.run([sys.executable, "-c", script.format(n=2)], env=env, capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.split()[-2:] == ["0", "4"], out.stderr


_MAIN_FIRST = """
import sys
from pathlib import Path
import jax
from dapo_jax import distributed
me = int(sys.argv[2])
distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=me)
cache = Path(sys.argv[3])

def outcome(fn):
  try:
    return repr(distributed.main_first(fn, "building the cache"))
  except Exception as e:
    return f"{type(e).__name__}: {e}"

def fail_on(who):
  def fn():
    if me == who:
      raise FileNotFoundError(f"no tokenizer on process {me}")
    return me
  return fn

def fill_then_read():
  if me == 0:
    cache.write_text("filled by process 0")
  return cache.read_text()

for fn in (fail_on(0), fail_on(1), fill_then_read):
  print("OUTCOME", outcome(fn), flush=True)
"""


def test_a_failure_while_one_process_builds_the_task_stops_every_process(tmp_path):
  # With a bare barrier, process 1 waited forever for a process 0 that had died building the data.
  port = subprocess.run([sys.executable, "-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); "
                         "print(s.getsockname()[1])"], capture_output=True, text=True).stdout.strip()
  procs = [subprocess.Popen([sys.executable, "-c", _MAIN_FIRST, f"127.0.0.1:{port}", str(i), str(tmp_path / "c")],
                            env=subprocess_env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  got = [[line[len("OUTCOME "):] for line in out.splitlines() if line.startswith("OUTCOME")] for out, _ in outs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  assert got[0] == ["FileNotFoundError: no tokenizer on process 0",
                    "RuntimeError: building the cache failed on process 1: FileNotFoundError: no tokenizer on "
                    "process 1", "'filled by process 0'"]
  assert got[1] == ["RuntimeError: building the cache failed on process 0: FileNotFoundError: no tokenizer on "
                    "process 0", "FileNotFoundError: no tokenizer on process 1", "'filled by process 0'"]
