"""Decode throughput of this tree's sampler against another git revision's, in one process.

    .venv/bin/python benchmarks/sampler_ab.py --base c749a6e [--models S,M] [--repeats 7] [--devices 2]

Single runs of `sampler_bench.py` move 10-20% on a shared 2-core machine, more than most changes to the
sampler, so they cannot rank two versions. Here both samplers are compiled in one process on the same weights
(the base revision's `dapo_jax/` is copied out of git under another package name, `benchmarks/revision.py`)
and timed alternately through their one-call `generate`; the best of `--repeats` is reported for each, with
whether they sampled the same tokens (a revision before the rollout engine draws its randomness per step, the
engine per request: not the same tokens, the same distribution). Shapes as in `sampler_bench.py`: 8 prompts x
8 samples, 32-token prompts, 128 new tokens, float32. `--devices N` runs both on N host devices on a `data`
mesh; the default is one device.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse():
  p = argparse.ArgumentParser()
  p.add_argument("--base", default="HEAD", help="git revision to compare against (default: HEAD)")
  p.add_argument("--models", default="S,M")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--devices", type=int, default=1, help="host devices, on a data mesh")
  return p.parse_args()


def main():
  args = parse()
  sys.path.insert(0, str(ROOT))
  # XLA reads the host device count once, when jax starts.
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                             + os.environ.get("XLA_FLAGS", ""))
  import jax
  import numpy as np

  import dapo_jax
  from benchmarks.revision import generate_fn, import_revision
  from benchmarks.sampler_bench import MODELS, NEW, PROMPT_LEN, PROMPTS, SAMPLES

  with tempfile.TemporaryDirectory() as tmp:
    base = import_revision(args.base, tmp)
    print(f"base {args.base} ({base.__file__}) vs this tree ({dapo_jax.__file__}), best of {args.repeats}")
    for name in args.models.split(","):
      rng = np.random.default_rng(0)
      prompts = rng.integers(0, MODELS[name]["vocab_size"], (PROMPTS, PROMPT_LEN)).tolist()
      runs = {}
      for tag, pkg in (("base", "dapo_base"), ("tree", "dapo_jax")):
        M = importlib.import_module(f"{pkg}.model")
        S = importlib.import_module(f"{pkg}.sampling")
        H = importlib.import_module(f"{pkg}.sharding")
        generate = generate_fn(pkg)
        cfg = M.ModelConfig(architecture="qwen2", tie_word_embeddings=True, rope_theta=10000.0,
                            max_position_embeddings=4096, **MODELS[name])
        mesh = (H.make_mesh(devices=jax.devices()[:1]) if args.devices == 1 else
                H.make_mesh({"data": -1}, devices=jax.devices()[:args.devices]))
        model = M.init_sharded(cfg, mesh, seed=0)

        def run(n, S=S, generate=generate, model=model, mesh=mesh):
          with jax.set_mesh(mesh):
            out = generate(model, prompts, S.SamplingParams(max_new_tokens=n, temperature=1.0), jax.random.key(0),
                           num_samples=SAMPLES)
          return jax.block_until_ready(out)

        runs[tag] = (run, run(NEW))
        run(1)
      same = bool(np.array_equal(runs["base"][1].tokens_BxN, runs["tree"][1].tokens_BxN))
      diff = float(np.max(np.abs(np.asarray(runs["base"][1].logprobs_BxN) - np.asarray(runs["tree"][1].logprobs_BxN))))
      times = {tag: ([], []) for tag in runs}
      for _ in range(args.repeats):
        for tag, (run, _) in runs.items():
          for n, out in ((1, times[tag][0]), (NEW, times[tag][1])):
            t = time.perf_counter()
            run(n)
            out.append(time.perf_counter() - t)
      rates = {tag: PROMPTS * SAMPLES * (NEW - 1) / (min(full) - min(pre)) for tag, (pre, full) in times.items()}
      print(f"{name}: decode tok/s base {rates['base']:,.0f}  tree {rates['tree']:,.0f}  "
            f"({100 * (rates['tree'] / rates['base'] - 1):+.1f}%)  same tokens {same}, max logprob diff {diff:.1e}")


if __name__ == "__main__":
  main()
