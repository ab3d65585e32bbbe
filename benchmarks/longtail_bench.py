"""Useful tokens per second on a long-tailed RL decode workload: the rollout engine against the static sampler.

    .venv/bin/python benchmarks/longtail_bench.py [--models S,M] [--repeats 3] [--devices 1]

The workload (issue 18, fixed so that other systems can run it): 64 prompts x 8 samples, random 32-token
prompts, up to 512 new tokens, temperature 1.0, stop ids {1, 2, 3, 4}. A random-init model with std 0.02 has
near-uniform logits, so each step stops a row with probability ~4/512: geometric lengths, mean ~125, a long
tail to the cap. At most 64 rows decode at once:

* static: the static-batch sampler this project had before the engine (`sampling.generate` at
  `benchmarks/revision.py`'s STATIC_SAMPLER_REV, imported from git), in calls of 8 prompts x 8 samples (64
  rows), each decoding until its longest row stops, on the same weights;
* engine: `engine.Engine` with 64 slots, rows admitted as slots free up;
* engine, fixed length: the same engine and slots, stops suppressed and every row exactly 125 tokens (the
  rate the engine reaches when no row ends early).

Useful tokens are response tokens up to and including the stop token. Slot occupancy is the share of
slot-steps that produced one. The three are timed in turn, `--repeats` rounds (the machine's speed drifts),
and the best round of each is reported, with its compile time measured apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def parse(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="S,M")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--devices", type=int, default=1, help="host devices (a data mesh over them)")
  p.add_argument("--prompts", type=int, default=64)
  p.add_argument("--slots", type=int, default=64)
  p.add_argument("--steps_per_chunk", type=int, default=64)
  p.add_argument("--refill_fraction", type=float, default=0.125)
  p.add_argument("--page_size", type=int, default=16)
  p.add_argument("--skip_static", action="store_true")
  p.add_argument("--static_rev", default="", help="git revision of the static sampler (default: STATIC_SAMPLER_REV)")
  p.add_argument("--json", default="")
  return p.parse_args(argv)


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={parse().devices} "
                             + os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks import revision  # noqa: E402
from dapo_jax import model as M  # noqa: E402
from dapo_jax import sharding  # noqa: E402
from dapo_jax.engine import Engine, EngineConfig, Request  # noqa: E402
from dapo_jax.sampling import SamplingParams  # noqa: E402

MODELS = {
    "S": dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2),
    "M": dict(vocab_size=512, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=4),
}
SAMPLES, PROMPT_LEN, MAX_NEW, STOPS, FIXED = 8, 32, 512, (1, 2, 3, 4), 125


def build(name, mesh, model_lib=M):
  cfg = model_lib.preset("tiny", **MODELS[name], tie_word_embeddings=True, max_position_embeddings=1024,
                         dtype="float32", param_dtype="float32")
  return model_lib.init_sharded(cfg, mesh, seed=0)


def static_run(static, name, mesh, prompts):
  """The static sampler of the `static` package (another revision), on its own copy of the same weights."""
  model = build(name, mesh, static.model)
  params = static.sampling.SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, stop_ids=STOPS)

  def run():
    useful = 0
    for i in range(0, len(prompts), 8):
      out = static.sampling.generate(model, prompts[i:i + 8], params, jax.random.fold_in(jax.random.key(0), i),
                                     num_samples=SAMPLES)
      useful += int(np.asarray(out.lengths_B).sum())
    return {"useful_tokens": useful}
  return run


def engine_run(model, prompts, params, config, fixed: int | None = None):
  engine = Engine(params, config)

  def run():
    requests = [Request(p, SAMPLES, i, fixed) for i, p in enumerate(prompts)]
    useful = sum(sum(len(t) for t in r.tokens) for r in engine.stream(model, requests, jax.random.key(1)))
    return {"useful_tokens": useful, "occupancy": engine.stats.occupancy, "chunks": engine.stats.chunks,
            "occupancy_while_queued": engine.stats.queued_occupancy}
  return run


def main():
  args = parse()
  mesh = sharding.make_mesh({"data": args.devices, "fsdp": 1, "tensor": 1})
  rng = np.random.default_rng(0)
  prompts = [rng.integers(5, 512, PROMPT_LEN).tolist() for _ in range(args.prompts)]
  config = EngineConfig(slots=args.slots, steps_per_chunk=args.steps_per_chunk, page_size=args.page_size,
                        refill_fraction=args.refill_fraction)
  results = {}
  static = None
  if not args.skip_static:
    import importlib
    revision.import_revision(args.static_rev or revision.STATIC_SAMPLER_REV, tempfile.mkdtemp(), "dapo_static")
    static = importlib.import_module("dapo_static")
    importlib.import_module("dapo_static.model")
    importlib.import_module("dapo_static.sampling")
  for name in args.models.split(","):
    model = build(name, mesh)  # built outside `jax.set_mesh`: parameters carry logical axis names
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, stop_ids=STOPS)
    runs = {"engine": engine_run(model, prompts, params, config),
            "engine_fixed_length": engine_run(model, prompts, SamplingParams(max_new_tokens=MAX_NEW),
                                              config, fixed=FIXED)}
    if static is not None:
      runs = {"static": static_run(static, name, mesh, prompts), **runs}
    with jax.set_mesh(mesh):
      best = {k: None for k in runs}
      compile_s = {}
      for k, fn in runs.items():  # the first call compiles
        t = time.perf_counter()
        fn()
        compile_s[k] = time.perf_counter() - t
      for _ in range(args.repeats):
        for k, fn in runs.items():
          t = time.perf_counter()
          out = fn()
          dt = time.perf_counter() - t
          if best[k] is None or dt < best[k]["seconds"]:
            best[k] = {**out, "seconds": dt, "useful_tokens_per_s": out["useful_tokens"] / dt}
      for k in runs:
        best[k]["first_call_s"] = compile_s[k]
    results[name] = best
    print(f"model {name}:")
    for k, v in best.items():
      extra = (f"  occupancy {v['occupancy']:.3f} ({v['occupancy_while_queued']:.3f} while rows wait)"
               if "occupancy" in v else "")
      print(f"  {k:22s} {v['useful_tokens_per_s']:9.0f} useful tokens/s  ({v['useful_tokens']} tokens in "
            f"{v['seconds']:.2f} s; first call {v['first_call_s']:.1f} s){extra}")
    e, f = best["engine"], best["engine_fixed_length"]
    if "static" in best:
      print(f"  engine / static: {e['useful_tokens_per_s'] / best['static']['useful_tokens_per_s']:.2f}x")
    print(f"  long-tail / fixed-length (engine): {e['useful_tokens_per_s'] / f['useful_tokens_per_s']:.2f}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=2)


if __name__ == "__main__":
  main()
