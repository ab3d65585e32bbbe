"""DAPO steps per second, off-policy (the sampler one step ahead on a device of its own) against synchronous.

    .venv/bin/python benchmarks/async_bench.py [--steps 40] [--rounds 2] [--workloads default,longtail]

Two host devices (the default config's `hardware.cpu_devices`), three runs of the training loop
(`dapo_jax.main`) per workload, interleaved in rounds (this machine's speed drifts):

* sync: staleness 0, sampling and training both on the two devices (a data mesh), one after the other;
* split: staleness 0, one device samples and the other trains, one after the other: each phase alone on its
  own device group, the two phases' times whose longer one bounds an overlapped step;
* off-policy: staleness 1 on the split devices, sampling step t + 1 while step t trains;
* split-1core: split, the process pinned to one core (`taskset`): each phase's time on one core.

The two devices share this machine's two cores, so an overlapped step cannot reach the longer phase's time
alone: while both phases run, each has about one core. How much that costs is how each phase scales from one
core to two (split-1core against split). With S1, T1 the phases on one core and S2, T2 on two, the best an
overlapped step can do, the shorter phase (say S) on one core beside the longer one and the longer alone on two
cores after it, is S1 + T2 (1 - S1 / T1); the script prints it and the speed-up over sync it allows.

Workloads: `default`, the embedded default (its warm start, dynamic sampling, 32-token responses); `longtail`,
the decode workload of `longtail_bench.py` in the loop: an untrained policy of the default's shape (no warm
start) over a 128-token vocabulary sampling up to 512 tokens, so each step stops a row with probability ~1/128
(geometric lengths, mean ~125, a tail to the cap), 8 prompts x 8 samples a step, every group kept (nothing to
filter: an untrained policy is always wrong).

Per run: seconds per step (the mean over the steps after `--skip`, less the slowest tenth: new shapes compile
as lengths grow), the phases (generation with its reward, the update with its old log-probs), and the time
each side waited (the trainer for its batch, the sampler for its weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "sync": {},
    "split": {"mesh.rollout_devices": 1},
    "off-policy": {"mesh.rollout_devices": 1, "rollout.max_staleness": 1},
    "split-1core": {"mesh.rollout_devices": 1},
}
WORKLOADS = {
    "default": {},
    "longtail": {"sft.steps": 0, "dynamic_sampling.enable": False, "rollout.train_batch_size": 8,
                 "rollout.gen_batch_size": 8, "actor.mini_batch_size": 8, "rollout.max_response_length": 512,
                 "data.max_prompt_length": 64, "tokenizer.vocab_size": 128,
                 "model.overrides.max_position_embeddings": 1024, "rollout.engine.slots": 64,
                 "actor.max_tokens_per_micro_batch": 8192, "overlong.buffer": 64},
}


def run(workload: str, variant: str, steps: int, cache: str, workdir: Path) -> list[dict]:
  flags = {"total_steps": steps, "eval.every": 0, "eval.before_train": False, "checkpoint.every": 0,
           "log.progress": False, "log.samples_per_step": 0, "sft.cache": True, "data.dir": cache,
           **WORKLOADS[workload], **VARIANTS[variant]}
  pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if variant.endswith("1core") else []
  cmd = [*pin, sys.executable, "-m", "dapo_jax.main", f"--workdir={workdir}",
         *[f"--config.{k}={v}" for k, v in flags.items()]]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{workload}/{variant} failed:\n{(out.stdout + out.stderr)[-4000:]}")
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def summary(rows: list[dict], skip: int) -> dict[str, float]:
  rows = sorted((r for r in rows if r["step"] > skip), key=lambda r: r["timing_s/step"])
  rows = rows[:len(rows) - len(rows) // 10]
  mean = lambda key: sum(r.get(key, 0.0) for r in rows) / len(rows)  # noqa: E731
  step = mean("timing_s/step")
  wait = mean("timing_s/wait_rollout")
  sampler = mean("timing_s/gen") + mean("timing_s/reward")
  # The trainer's own work: the step less its wait for the batch and the weight transfer.
  trainer = step - wait - mean("timing_s/sync_weights")
  return {"step_s": step, "steps_per_s": 1.0 / step, "sampler_s": sampler, "trainer_s": trainer,
          "trainer_wait_s": wait, "sampler_wait_s": mean("timing_s/sampler_idle"),
          "sync_weights_s": mean("timing_s/sync_weights"), "response_length": mean("response_length/mean"),
          "num_gen_batches": mean("train/num_gen_batches"), "cpu_cores": mean("perf/cpu_cores")}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", default="40,30", help="steps per run, per workload")
  p.add_argument("--skip", type=int, default=5, help="steps left out of the means (compilation)")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--workloads", default="default,longtail")
  p.add_argument("--json", default="")
  args = p.parse_args()
  cache = os.path.expanduser("~/.cache/dapo_jax")
  results: dict[str, dict[str, list]] = {}
  with tempfile.TemporaryDirectory() as tmp:
    workloads = args.workloads.split(",")
    steps = dict(zip(workloads, map(int, args.steps.split(","))))
    for rnd in range(args.rounds):
      for workload in workloads:
        for variant in VARIANTS:
          rows = run(workload, variant, steps[workload], cache, Path(tmp) / f"{workload}-{variant}-{rnd}")
          s = summary(rows, args.skip)
          results.setdefault(workload, {}).setdefault(variant, []).append(s)
          print(f"round {rnd} {workload:8s} {variant:10s} " + " ".join(f"{k} {v:.3f}" for k, v in s.items()),
                flush=True)
  best = {w: {v: min(runs, key=lambda s: s["step_s"]) for v, runs in vs.items()} for w, vs in results.items()}
  if args.json:
    Path(args.json).write_text(json.dumps({"rounds": results, "best": best}, indent=2))
  for workload, variants in best.items():
    sync, split, off, one = (variants[v] for v in VARIANTS)
    (s1, t1), (s2, t2) = ((v["sampler_s"], v["trainer_s"]) for v in (one, split))
    # The shorter phase on one core beside the longer one, then the longer alone on two cores.
    limit = s1 + t2 * (1 - s1 / t1) if s1 <= t1 else t1 + s2 * (1 - t1 / s1)
    print(f"\n{workload}: steps/s off-policy / sync = {off['steps_per_s'] / sync['steps_per_s']:.2f}x; "
          f"off-policy step / the longer phase alone on its device = {off['step_s'] / max(s2, t2):.2f}x "
          f"(sampler {s2:.3f} s, trainer {t2:.3f} s); one core against two: sampler {s1 / s2:.2f}x, trainer "
          f"{t1 / t2:.2f}x; overlap limit on two cores {limit:.3f} s: at most {sync['step_s'] / limit:.2f}x sync, "
          f"off-policy step / limit = {off['step_s'] / limit:.2f}x")
    print("| run | s / step | steps / s | sampling (gen + reward) s | update s | trainer waits s | sampler waits s |"
          " weight sync s | cores busy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in variants.items():
      print(f"| {name} | {s['step_s']:.3f} | {s['steps_per_s']:.3f} | {s['sampler_s']:.3f} | {s['trainer_s']:.3f} | "
            f"{s['trainer_wait_s']:.3f} | {s['sampler_wait_s']:.3f} | {s['sync_weights_s']:.4f} | "
            f"{s['cpu_cores']:.2f} |")


if __name__ == "__main__":
  main()
