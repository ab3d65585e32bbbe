"""Runs a config's sweep: every point locally one after another, one point (a job-array task), or prints one
command per point; then aggregates the runs into a table and a plot.

    python launch/sweep.py --config=configs/ablation.py --workdir=runs/ablation            # all, in turn
    python launch/sweep.py --config=configs/ablation.py --workdir=runs/ablation --list     # one command a line
    python launch/sweep.py --config=configs/ablation.py --workdir=runs/ablation --index=$SLURM_ARRAY_TASK_ID
    python launch/sweep.py --config=configs/ablation.py --workdir=runs/ablation --aggregate
    python launch/sweep.py --config=configs/ablation.py:smoke --workdir=/tmp/s --config.total_steps=1

Flags after the sweep's own (`--config.x=y`) apply to every point and win over the point's values. A point
whose run directory already holds a finished run resumes and exits at once, so an interrupted sweep is
continued by running the same command again. Writes `sweep.json`, `summary.md`, `summary.json` and
`sweep.png` in the sweep directory. Runs on several hosts: launch each point with launch/slurm_gpu.sbatch or
launch/tpu_pod.sh, passing the point's flags from --list.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dapo_jax import sweeps  # noqa: E402


def _run(cmd) -> int:
  """Runs one point; on Ctrl-C lets it finish its step and checkpoint before the sweep stops."""
  proc = subprocess.Popen(cmd, env=dict(os.environ))
  try:
    return proc.wait()
  except KeyboardInterrupt:
    # A terminal's Ctrl-C reached the run too: it is finishing its step to checkpoint. SIGTERM asks the same of
    # a run it did not reach (`kill -INT` to the sweep alone), without the second SIGINT that aborts a run.
    print("[sweep] waiting for the current run to checkpoint and stop (Ctrl-C again to abort it)", flush=True)
    proc.terminate()
    try:
      proc.wait()
    except KeyboardInterrupt:
      proc.kill()
      proc.wait()
    raise


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="configs/<name>.py[:arg] defining sweep(arg=None)")
  parser.add_argument("--workdir", required=True, help="The sweep directory; each point runs in a subdirectory.")
  parser.add_argument("--list", action="store_true", help="Print one command per point and exit.")
  parser.add_argument("--index", type=int, default=None, help="Run only point INDEX (0-based; job arrays).")
  parser.add_argument("--aggregate", action="store_true", help="Only aggregate the runs already there.")
  parser.add_argument("--metric", default="val/acc/mean", help="The metric the table and plot report.")
  parser.add_argument("--last", type=int, default=1, help="Average the last N logged values of the metric.")
  parser.add_argument("--keep_going", action="store_true", help="Continue with the next point when one fails.")
  args, extra = parser.parse_known_args(argv)
  bad = [a for a in extra if not a.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad}: only --config.<field>=<value> overrides pass through to the runs")

  points = sweeps.expand(args.config)
  sweep_dir = Path(args.workdir).absolute()
  if args.list:
    for p in points:
      print(sweeps.shell_line(sweeps.command(p, args.config, sweep_dir, extra, python="python")))
    return 0
  if args.index is not None and not 0 <= args.index < len(points):
    parser.error(f"--index={args.index}: {args.config} has {len(points)} points (0..{len(points) - 1})")
  if not args.aggregate:
    sweeps.write_manifest(points, args.config, sweep_dir, extra)
    chosen = points if args.index is None else [points[args.index]]
    t0, failed, ran = time.perf_counter(), [], 0
    for i, p in enumerate(chosen):
      print(f"[sweep] {i + 1}/{len(chosen)} {p.run}: {' '.join(p.flags())}", flush=True)
      t = time.perf_counter()
      try:
        code = _run(sweeps.command(p, args.config, sweep_dir, extra))
      except KeyboardInterrupt:
        print(f"[sweep] interrupted during {p.run}; run the same command again to continue", flush=True)
        return 130
      ran += 1
      print(f"[sweep] {p.run}: exit {code} after {time.perf_counter() - t:.0f}s", flush=True)
      if code:
        failed.append(p.run)
        if not args.keep_going:
          break
    elapsed = time.perf_counter() - t0
    skipped = f", {len(chosen) - ran} not run (a run failed; --keep_going runs the rest)" if ran < len(chosen) else ""
    print(f"[sweep] {ran - len(failed)} of {len(chosen)} runs ended well in {elapsed / 60:.1f} min{skipped}")
    if args.index is not None:  # one point of a job array: aggregate once all are done (--aggregate)
      return 1 if failed else 0
    (sweep_dir / "timing.json").write_text(json.dumps({"seconds": elapsed, "runs": len(chosen),
                                                       "failed": failed}))
    if failed:
      print(f"[sweep] failed: {failed}")
  module, _ = sweeps.load_module(args.config)
  table = sweeps.aggregate(sweep_dir, args.metric, args.last)
  md = sweeps.markdown(table, args.metric, getattr(module, "REFERENCE", None))
  (sweep_dir / "summary.md").write_text(md + "\n")
  (sweep_dir / "summary.json").write_text(json.dumps(sweeps.json_safe(table), indent=2))
  png = sweeps.plot(sweep_dir, args.metric)
  print(md)
  print(f"[sweep] wrote {sweep_dir / 'summary.md'} and {png}")
  return 1 if (not args.aggregate and failed) else 0


if __name__ == "__main__":
  sys.exit(main())
