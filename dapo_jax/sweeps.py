"""Config sweeps: a config module may define `sweep(arg=None)`, a list of points, each a dict of config
overrides (dotted field names) with an optional "name" (the label runs of one setting share, e.g. across
seeds). `launch/sweep.py` expands a sweep into runs; `aggregate` reads them back into a table and a plot.

    def sweep(arg=None):
      return [{"name": f"lr{lr}", "actor.lr": lr, "seed": s} for lr in (1e-4, 3e-4) for s in range(3)]

A point's run directory is `<sweep dir>/<name>.seed<seed>` (`<name>` alone when the point sets no seed);
`sweep.json` in the sweep directory records the points.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from dapo_jax import paths
from dapo_jax.metrics import read_metrics, save_figure, style_axes


@dataclasses.dataclass(frozen=True)
class Point:
  name: str  # the setting's label, shared by its seeds
  run: str  # the run directory's name, unique in the sweep
  overrides: dict

  def flags(self) -> list[str]:
    return [f"--config.{k}={_flag_value(v)}" for k, v in self.overrides.items()]


def _flag_value(v) -> str:
  if isinstance(v, (list, tuple)):
    return ",".join(map(str, v))
  return str(v)


def load_module(config_spec: str):
  """The config module of `path/to/config.py[:arg]`, and the arg ("" when none)."""
  path, _, arg = config_spec.partition(":")
  file = Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"sweep: no config file {file}")
  spec = importlib.util.spec_from_file_location(f"_sweep_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  paths.make_configs_importable()
  spec.loader.exec_module(module)
  return module, arg


def expand(config_spec: str) -> list[Point]:
  """The points of the sweep defined by the config module's `sweep(arg)`; checked against its config."""
  module, arg = load_module(config_spec)
  if not hasattr(module, "sweep"):
    raise ValueError(f"sweep: {config_spec.partition(':')[0]} defines no sweep(arg=None)")
  config = module.get_config(arg or None)
  points, runs = [], set()
  for i, raw in enumerate(module.sweep(arg or None)):
    raw = dict(raw)
    name = str(raw.pop("name", f"point{i}"))
    for key in raw:
      node = config
      for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
          raise KeyError(f"sweep point {i} ({name}): config has no field {key!r}")
        node = node[part]
    run = f"{name}.seed{raw['seed']}" if "seed" in raw else name
    if run in runs:
      raise ValueError(f"sweep point {i}: run name {run!r} repeats; give points distinct names or seeds")
    runs.add(run)
    points.append(Point(name, run, raw))
  return points


def command(point: Point, config_spec: str, sweep_dir: str | Path, extra: Sequence[str] = (),
            python: str = sys.executable) -> list[str]:
  """The `dapo_jax.main` command line of one point (its overrides, then `extra` flags, which win)."""
  return [python, "-m", "dapo_jax.main", f"--config={config_spec}", f"--workdir={Path(sweep_dir) / point.run}",
          *point.flags(), *extra]


def write_manifest(points: Sequence[Point], config_spec: str, sweep_dir: str | Path, extra: Sequence[str]):
  sweep_dir = Path(sweep_dir)
  sweep_dir.mkdir(parents=True, exist_ok=True)
  (sweep_dir / "sweep.json").write_text(json.dumps(
      {"config": config_spec, "extra_flags": list(extra),
       "points": [{"name": p.name, "run": p.run, "overrides": p.overrides} for p in points]}, indent=2))


# --- reading a sweep back ---

def load_sweep(sweep_dir: str | Path) -> dict[str, list[dict]]:
  """{setting name: [{"run", "overrides", "metrics": rows, "total_steps"}, ...]} in the manifest's order;
  total_steps from the run's run_config.json (None before the run has started)."""
  manifest = json.loads((Path(sweep_dir) / "sweep.json").read_text())
  out: dict[str, list[dict]] = {}
  for p in manifest["points"]:
    run_dir = Path(sweep_dir) / p["run"]
    saved = run_dir / "run_config.json"
    total = json.loads(saved.read_text()).get("total_steps") if saved.is_file() else None
    out.setdefault(p["name"], []).append({"run": p["run"], "overrides": p["overrides"],
                                          "metrics": read_metrics(run_dir), "total_steps": total})
  return out


def final_value(rows: list[dict], key: str, last: int = 1) -> float:
  """The mean of the last `last` logged values of `key` (nan when the run logged none)."""
  values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
  return float(np.mean(values[-last:])) if values else float("nan")


def aggregate(sweep_dir: str | Path, key: str = "val/acc/mean", last: int = 1) -> list[dict]:
  """One row per setting: mean and sample standard deviation over its finished seeds of the final `key`
  (`values` lists every seed's latest value; a run stopped before its total_steps is not finished)."""
  table = []
  for name, runs in load_sweep(sweep_dir).items():
    values = [final_value(r["metrics"], key, last) for r in runs]
    steps = [max((m["step"] for m in r["metrics"]), default=0) for r in runs]
    done = [v for v, s, r in zip(values, steps, runs)
            if math.isfinite(v) and r["total_steps"] is not None and s >= r["total_steps"]]
    table.append({"name": name, "mean": float(np.mean(done)) if done else float("nan"),
                  "std": float(np.std(done, ddof=1)) if len(done) > 1 else 0.0, "values": values,
                  "runs": len(runs), "finished": len(done), "steps": max(steps, default=0)})
  return table


def json_safe(x):
  """`x` with nan and inf as None: strict JSON (json.dumps writes a bare NaN that other parsers reject)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  return x


def markdown(table: list[dict], key: str, reference: dict[str, float] | None = None) -> str:
  ref_col = reference is not None
  head = f"| setting | {key} (mean ± std over seeds) | seeds |" + (" paper |" if ref_col else "")
  lines = [head, "|" + "---|" * (3 + ref_col)]
  for row in table:
    per = ", ".join(f"{v:.3f}" if math.isfinite(v) else "-" for v in row["values"])  # "-": nothing logged yet
    cell = f"{row['mean']:.3f} ± {row['std']:.3f} ({per})" if row["finished"] else f"no finished run ({per})"
    paper = f" {reference.get(row['name'], float('nan')):g} |" if ref_col else ""
    lines.append(f"| {row['name']} | {cell} | {row['finished']}/{row['runs']} |{paper}")
  return "\n".join(lines)


def plot(sweep_dir: str | Path, key: str = "val/acc/mean", out: str | Path | None = None) -> Path:
  """Each setting's `key` over steps: the mean over its seeds, with the seeds' range shaded."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for name, runs in load_sweep(sweep_dir).items():
    curves = [{r["step"]: r[key] for r in run["metrics"] if key in r} for run in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
    if not steps:
      continue
    values = np.asarray([[c[s] for s in steps] for c in curves])
    ax.plot(steps, values.mean(axis=0), marker="o", markersize=3, label=name)
    ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.15)
  style_axes(ax, ylabel=key)
  return save_figure(fig, out or Path(sweep_dir) / "sweep.png")


def shell_line(argv: Sequence[str]) -> str:
  return " ".join(shlex.quote(a) for a in argv)
