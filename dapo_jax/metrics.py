"""Run outputs: metrics as JSON Lines and TensorBoard events, a console progress line, and the final plot."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Mapping

import numpy as np


def summary(name: str, x) -> dict[str, float]:
  """`name/mean`, `name/max` and `name/min` of a per-sequence value."""
  x = np.asarray(x, np.float64)
  return {f"{name}/mean": float(x.mean()), f"{name}/max": float(x.max()), f"{name}/min": float(x.min())}


def token_summary(name: str, x_B, mask_BxN) -> dict[str, float]:
  """Mean, max and min of a per-sequence value over the response tokens (each row weighted by its length,
  rows without a token left out), as the reference logs advantages."""
  counts_B = np.asarray(mask_BxN).astype(bool).sum(axis=1)
  x_B = np.asarray(x_B, np.float64)
  present = counts_B > 0
  if not present.any():
    return {f"{name}/mean": 0.0, f"{name}/max": 0.0, f"{name}/min": 0.0}
  return {f"{name}/mean": float((x_B * counts_B).sum() / counts_B.sum()), f"{name}/max": float(x_B[present].max()),
          f"{name}/min": float(x_B[present].min())}


class MetricWriter:
  """Writes `metrics.jsonl` and TensorBoard events in the workdir, and with `wandb` (a dict of wandb.init
  arguments) a Weights & Biases run; process 0 only.

  `resume_from`: the checkpoint step a resumed run continues from. What the run logged after it (steps it will
  log again) is dropped: from `metrics.jsonl` and `samples.jsonl`, and hidden in TensorBoard (purge_step). A
  resumed run continues the same Weights & Biases run (its id is kept in the workdir's `wandb_run_id`)."""

  def __init__(self, workdir: str | Path, *, enabled: bool = True, resume_from: int | None = None,
               wandb: dict | None = None):
    self.enabled = enabled
    self.path = Path(workdir) / "metrics.jsonl"
    self._tb = self._wandb = None
    if enabled:
      import logging
      from tensorboardX import SummaryWriter
      # TensorBoard renames tags with '@' (val/pass@4 -> val/pass_4) and says so at INFO, once per tag and write.
      logging.getLogger("tensorboardX.summary").setLevel(logging.WARNING)
      purge = None
      if resume_from is not None:
        # Step 0's row is the pre-training evaluation, which a run resumed at step 0 repeats.
        trim_logs(workdir, resume_from if resume_from > 0 else -1)
        purge = resume_from + 1 if resume_from > 0 else 0
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge)
      if wandb is not None:
        self._wandb = _start_wandb(Path(workdir), wandb)

  def write(self, step: int, metrics: Mapping[str, float]):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

  def close(self):
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _start_wandb(workdir: Path, settings: dict):
  """A Weights & Biases run for the workdir: the same run (id) when the workdir is resumed."""
  import uuid
  try:
    import wandb
  except ImportError:
    raise ImportError("log.wandb=True needs the wandb package: pip install wandb (or set log.wandb=False)") from None
  id_file = workdir / "wandb_run_id"
  run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
  id_file.write_text(run_id)
  settings = dict(settings)
  mode = settings.pop("mode", "") or None
  return wandb.init(dir=str(workdir), id=run_id, resume="allow", name=settings.pop("name", workdir.name),
                    mode=mode, **settings)


def trim_logs(workdir: str | Path, through_step: int):
  """Keeps the rows of `metrics.jsonl` and `samples.jsonl` up to `through_step` (and drops a line a kill cut
  short), rewriting each file whole under a temporary name first."""
  for name in ("metrics.jsonl", "samples.jsonl"):
    path = Path(workdir) / name
    if not path.is_file():
      continue
    keep = []
    for line in path.read_text().splitlines():
      try:
        step = json.loads(line)["step"]
      except (ValueError, KeyError, TypeError):
        continue
      if step <= through_step:
        keep.append(line + "\n")
    tmp = path.with_name(name + ".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


def read_metrics(workdir: str | Path) -> list[dict]:
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_samples(workdir: str | Path) -> list[dict]:
  """The sampled responses a run logged (`log.samples_per_step` a step): step, response, truth, acc, score,
  length."""
  path = Path(workdir) / "samples.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def sample_records(step: int, batch, n: int) -> list[dict]:
  """The first `n` responses of a `rollout.ScoredBatch` as `samples.jsonl` holds them."""
  return [{"step": step, "response": str(batch.text_B[i]), "truth": str(batch.truth_B[i]),
           "acc": bool(batch.acc_B[i]), "score": float(batch.score_B[i]), "length": int(batch.lengths_B[i])}
          for i in range(min(n, batch.num_rows))]


def metrics_markdown(row: Mapping[str, float]) -> str:
  """A Markdown table of one `metrics.jsonl` row, by metric name."""
  return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(row.items())
                                                       if k != "step")


def samples_markdown(samples: list[dict], *, step: int | None = None, limit: int = 10, width: int = 120) -> str:
  """A Markdown table of logged samples (of one step, or the last ones) with their rewards."""
  chosen = [s for s in samples if step is None or s["step"] == step][-limit:]

  def cell(text):
    text = str(text).replace("|", "\\|").replace("\n", "⏎ ")
    return text if len(text) <= width else "…" + text[-width:]

  lines = ["| step | score | acc | length | truth | response (end) |", "|---|---|---|---|---|---|"]
  lines += [f"| {s['step']} | {s['score']:+.2f} | {int(s['acc'])} | {s['length']} | {cell(s['truth'])} | "
            f"{cell(s['response'])} |" for s in chosen]
  return "\n".join(lines)


class Progress:
  """One console line per step: a bar, chosen metrics, seconds per step and the ETA."""

  def __init__(self, total: int, start: int = 0, *, enabled: bool = True, stream=sys.stdout):
    self.total, self.start, self.enabled, self.stream = total, start, enabled, stream
    self.t0 = time.perf_counter()

  def update(self, step: int, metrics: Mapping[str, float], keys: Mapping[str, str]):
    if not self.enabled:
      return
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    rate = elapsed / max(done, 1)
    eta = rate * (self.total - step)
    width = 24
    filled = int(width * step / max(self.total, 1))
    shown = "  ".join(f"{label} {metrics[k]:.3f}" for k, label in keys.items() if k in metrics)
    self.stream.write(f"step {step}/{self.total} [{'=' * filled}{' ' * (width - filled)}] {shown}  "
                      f"{rate:.1f}s/step  ETA {int(eta // 60)}m{int(eta % 60):02d}s\n")
    self.stream.flush()


PLOT_PANELS = (
    ("accuracy", ("val/acc/mean", "rollout/acc/mean")),
    ("reward", ("critic/score/mean",)),
    ("entropy", ("actor/entropy",)),
    ("response length", ("response_length/mean",)),
)


def plot_run(workdir: str | Path, out: str | Path | None = None) -> Path | None:
  """A PNG of accuracy, reward, entropy and response length over steps, from `metrics.jsonl`."""
  rows = read_metrics(workdir)
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(PLOT_PANELS), figsize=(4.2 * len(PLOT_PANELS), 3.4))
  for ax, (title, keys) in zip(axes, PLOT_PANELS):
    for key in keys:
      pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
      if pts:
        ax.plot(*zip(*pts), marker="o" if key.startswith("val/") else None, markersize=3, label=key)
    ax.set_title(title)
    style_axes(ax, legend_size=7)
  return save_figure(fig, out or Path(workdir) / "curves.png")


def style_axes(ax, ylabel: str | None = None, legend_size: int = 8):
  """The look every run and sweep plot shares: steps on x, a light grid, a small legend."""
  ax.set_xlabel("step")
  if ylabel:
    ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=legend_size)


def save_figure(fig, out: str | Path) -> Path:
  import matplotlib.pyplot as plt
  fig.tight_layout()
  out = Path(out)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out
