"""The research workflow: a config's sweep expanded, run (one step a point) and aggregated; the notebooks
executed on the runs it made."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dapo_jax import sweeps
from tests.conftest import FAST_COMPILE, ROOT, subprocess_env

ABLATION = str(ROOT / "configs" / "ablation.py")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, data_dir):
  out_dir = tmp_path_factory.mktemp("sweep")
  env = subprocess_env()
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), f"--config={ABLATION}:smoke",
                        f"--workdir={out_dir}", "--config.total_steps=1", f"--config.data.dir={data_dir}",
                        "--config.sft.steps=60", "--config.sft.warmup_steps=10"],  # seconds, for the test
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out_dir, out.stdout


def test_ablation_ladder_accumulates_one_technique_a_rung():
  points = sweeps.expand(ABLATION)
  assert len(points) == 18 and len({p.run for p in points}) == 18
  ladder = [p for p in points if p.overrides["seed"] == 0]
  assert [p.name for p in ladder] == ["naive_grpo", "overlong_filtering", "clip_higher", "soft_overlong_punishment",
                                      "token_level_loss", "dynamic_sampling_dapo"]
  first, last = ladder[0].overrides, ladder[-1].overrides
  assert (first["actor.clip_high"], first["actor.loss_agg"], first["dynamic_sampling.enable"]) == \
      (0.2, "seq-mean-token-mean", False)
  assert not first["overlong.enable"] and not first["overlong.filter"] and ladder[1].overrides["overlong.filter"]
  # Each rung differs from the one before in the technique it adds.
  changed = [sorted(k for k in b.overrides if a.overrides.get(k) != b.overrides[k]) for a, b in zip(ladder, ladder[1:])]
  assert changed == [["overlong.filter"], ["actor.clip_high"], ["overlong.enable", "overlong.filter"],
                     ["actor.loss_agg"], ["dynamic_sampling.enable"]]
  # The top rung is the embedded default's DAPO.
  from configs import default
  d = default.get_config()
  assert (d.actor.clip_high, d.actor.loss_agg, d.overlong.enable, d.overlong.filter, d.dynamic_sampling.enable) == \
      (last["actor.clip_high"], last["actor.loss_agg"], last["overlong.enable"], last["overlong.filter"],
       last["dynamic_sampling.enable"])


def test_sweep_points_are_checked_against_the_config(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(textwrap.dedent("""
      from configs import tiny
      def get_config(arg=None):
        return tiny.get_config()
      def sweep(arg=None):
        return [{"name": "a", "actor.learning_rate": 1.0}]
  """))
  with pytest.raises(KeyError, match="no field 'actor.learning_rate'"):
    sweeps.expand(str(bad))
  bad.write_text(bad.read_text().replace('"actor.learning_rate": 1.0}]', '"seed": 1}, {"name": "a", "seed": 1}]'))
  with pytest.raises(ValueError, match="'a.seed1' repeats"):
    sweeps.expand(str(bad))


def test_list_prints_one_command_per_point(tmp_path):
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), f"--config={ABLATION}",
                        f"--workdir={tmp_path}", "--list", "--config.total_steps=7"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  lines = out.stdout.strip().splitlines()
  assert out.returncode == 0 and len(lines) == 18
  assert lines[0].endswith("--config.dynamic_sampling.enable=False --config.total_steps=7")
  assert f"--workdir={tmp_path}/naive_grpo.seed0" in lines[0]


def test_one_step_sweep_runs_and_aggregates(sweep_dir):
  out_dir, stdout = sweep_dir
  manifest = json.loads((out_dir / "sweep.json").read_text())
  assert [p["run"] for p in manifest["points"]] == [f"{name}.seed0" for name, _ in
                                                    __import__("configs.ablation").ablation.rungs()]
  table = json.loads((out_dir / "summary.json").read_text())
  assert [row["finished"] for row in table] == [1] * 6 and all(row["steps"] == 1 for row in table)
  from PIL import Image
  plot = Image.open(out_dir / "sweep.png").convert("RGB")
  assert plot.size == (770, 462)  # sweeps.plot's figure: 7 x 4.2 inches at 110 dpi
  colors = {c for _, c in plot.getcolors(maxcolors=1 << 20)}
  assert len({c for c in colors if max(c) - min(c) > 60}) >= 6  # a saturated colour per rung's curve, at least
  assert "| dynamic_sampling_dapo |" in (out_dir / "summary.md").read_text()
  # The rungs share one supervised warm start: made by the first run, reused by the other five.
  assert stdout.count("warm start: reused") == 5


@pytest.mark.parametrize("name", ["analysis", "quickstart"])
def test_notebook_executes(name, sweep_dir, monkeypatch):
  import nbclient
  import nbformat
  out_dir, _ = sweep_dir
  monkeypatch.setenv("DAPO_RUN_DIR", str(out_dir / "dynamic_sampling_dapo.seed0"))
  monkeypatch.setenv("DAPO_SWEEP_DIR", str(out_dir))
  monkeypatch.setenv("DAPO_REPO", str(ROOT))
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)  # the kernel: one CPU device, as a user's first try
  monkeypatch.setenv("PYTHONPATH", str(ROOT))
  nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
  text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                   + str(o.get("data", {}).get("text/plain", "")) for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
  if name == "analysis":
    assert "| dynamic_sampling_dapo |" in text and "| critic/score/mean |" in text and "| step | score |" in text
  else:
    assert "avg@4" in text and "best@4/mean" in text and "| step | score |" in text


def _sweep_config(tmp_path, points):
  spec = tmp_path / "my_sweep.py"
  spec.write_text(textwrap.dedent(f"""
      from configs import tiny
      def get_config(arg=None):
        return tiny.get_config()
      def sweep(arg=None):
        return {points!r}
  """))
  return str(spec)


def test_a_failed_point_stops_the_sweep_and_is_reported_as_such(tmp_path, data_dir):
  # The first point's config is refused at start-up; without --keep_going the other two never run.
  spec = _sweep_config(tmp_path, [{"name": "bad", "overlong.buffer": 999}, {"name": "a"}, {"name": "b"}])
  env = subprocess_env()
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), f"--config={spec}",
                        f"--workdir={tmp_path / 'sw'}", f"--config.data.dir={data_dir}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 1
  assert "[sweep] 0 of 3 runs ended well" in out.stdout and "2 not run" in out.stdout
  table = json.loads((tmp_path / "sw" / "summary.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"summary.json holds a bare {c}"))
  assert [r["mean"] for r in table] == [None] * 3
  assert "| bad | no finished run (-) | 0/1 |" in (tmp_path / "sw" / "summary.md").read_text()


def test_ctrl_c_on_a_sweep_lets_the_current_run_checkpoint(tmp_path, data_dir):
  """Ctrl-C in a terminal reaches the sweep and its run: the run finishes its step and checkpoints it, the
  sweep waits for that and stops; the same command continues the sweep."""
  import signal
  import time
  spec = _sweep_config(tmp_path, [{"name": "a"}])
  env = subprocess_env()
  run = tmp_path / "sw" / "a"
  proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "sweep.py"), f"--config={spec}",
                           f"--workdir={tmp_path / 'sw'}", f"--config.data.dir={data_dir}", "--config.total_steps=200",
                           "--config.eval.every=0", "--config.eval.before_train=False", "--config.sft.steps=20",
                           "--config.sft.warmup_steps=5", "--config.dynamic_sampling.enable=False"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  deadline = time.time() + 300
  while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None \
        else "no step logged in time"
    time.sleep(0.5)
  os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground process group
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 130, out[-3000:]
  assert "interrupted during a;" in out
  steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
  saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert 0 < steps[-1] < 200 and saved[-1] == steps[-1]


def test_aggregate_counts_only_runs_that_reached_their_last_step(tmp_path):
  points = [{"name": "a", "run": f"a.seed{i}", "overrides": {}} for i in range(3)]
  (tmp_path / "sweep.json").write_text(json.dumps({"config": "x", "extra_flags": [], "points": points}))
  for i, (last, acc) in enumerate([(4, 0.5), (2, 0.9), (4, 0.7)]):  # seed 1 was stopped at step 2 of 4
    run = tmp_path / f"a.seed{i}"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"total_steps": 4}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val/acc/mean": acc}) + "\n"
                                               for s in range(0, last + 1, 2)))
  row, = sweeps.aggregate(tmp_path)
  assert row["finished"] == 2 and row["runs"] == 3 and row["values"] == [0.5, 0.9, 0.7]
  assert row["mean"] == pytest.approx(0.6) and row["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_a_config_file_loads_from_any_directory(tmp_path):
  # Config files import each other (`from configs import default`); run from elsewhere that needs the checkout
  # on the path, which the entry points add.
  script = textwrap.dedent(f"""
      import sys
      sys.argv = ["main", "--config={ROOT}/configs/ablation.py:smoke", "--workdir=x"]
      from absl import flags
      from dapo_jax import main
      flags.FLAGS(sys.argv)
      print(flags.FLAGS.config.rollout.train_batch_size)
  """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1].isdigit()
