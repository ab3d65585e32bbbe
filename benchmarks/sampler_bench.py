"""Sampler throughput against transformers `generate`, on the same weights and thread count.

    .venv/bin/python benchmarks/sampler_bench.py [--models S,M] [--threads 2] [--dtype bfloat16]

8 prompts x 8 samples, 32-token prompts, 128 new tokens (no stop token, so every row decodes all 128),
float32 on CPU. Prefill rate = prompt tokens / prefill time; decode rate = decoded tokens / (full - prefill).
Also measures this machine's single-matmul rate (2048^3 float32) and the share of it the decode loop reaches,
and a ceiling: the decode rate if a step were nothing but its weight matmuls, run back to back in a loop
(`weight_matmuls_alone`, random weights of the model's shapes), on one device and on one device per thread.
Needs the test requirements (torch, transformers).

Ours (the rollout engine, a slot a row) runs twice on the same weights: on one CPU device (XLA's intra-op threads split each op), and on one CPU
device per thread (`--threads` host devices, a `data` mesh: each device decodes its own rows in its own loop,
so the many small ops of a decode step run on both cores at once). transformers uses `--threads` torch
threads. The three are timed in turn, `--repeats` rounds, best of each, so that the machine's drift (10-20%
here over minutes) hits them alike. Both layouts of ours must sample the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def parse(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="S,M")
  p.add_argument("--threads", type=int, default=2, help="torch threads, and our host devices per core layout")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default="")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="weights, activations and KV cache of both samplers (the issue's benchmark is float32; "
                      "bfloat16 shows what lower precision would give, for both)")
  return p.parse_args(argv)


if __name__ == "__main__":
  # XLA reads the host device count once, when jax starts: before the import below.
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={parse().threads} "
                             + os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dapo_jax import model as M  # noqa: E402
from dapo_jax import engine, sampling, sharding  # noqa: E402


MODELS = {
    # ~4M and ~30M parameters, vocab 512, tied embeddings (the shapes of the CPU performance notes, deeper).
    "S": dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=5, num_heads=4, num_kv_heads=2),
    "M": dict(vocab_size=512, hidden_size=512, intermediate_size=1408, num_layers=10, num_heads=8, num_kv_heads=4),
}
PROMPTS, SAMPLES, PROMPT_LEN, NEW = 8, 8, 32, 128


def best_of(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def matmul_rate(repeats):
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = best_of(lambda: f(a).block_until_ready(), repeats * 3)
  return 2 * 2048**3 / t


def weight_matmul_shapes(cfg) -> list[tuple[int, int]]:
  """(in, out) of every weight matmul of a decode step, in order: each layer's fused q/k/v, output, fused
  gate/up and down projections, then the LM head."""
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  qkv, nh = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.num_heads * cfg.head_dim
  return [(d, qkv), (nh, d), (d, 2 * f), (f, d)] * cfg.num_layers + [(d, v)]


def weight_matmuls_alone(cfg, mesh, repeats):
  """(seconds a step, FLOPs a step per device) of a decode step's weight matmuls (`weight_matmul_shapes`,
  random weights, the LM head tied as [V, D]) run back to back in a loop, nothing else, the 64 rows split over
  `mesh`'s devices: the ceiling set by the matmuls alone, with every other op of a step free."""
  rows = PROMPTS * SAMPLES // mesh.size
  *shapes, (d, v) = weight_matmul_shapes(cfg)
  keys = jax.random.split(jax.random.key(0), len(shapes) + 1)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  dt = jnp.dtype(cfg.dtype)
  ws = [jax.device_put((jax.random.normal(k, s) * 0.02).astype(dt), rep) for k, s in zip(keys, shapes)]
  emb = jax.device_put((jax.random.normal(keys[-1], (v, d)) * 0.02).astype(dt), rep)
  n = 64

  def chain(x, ws, emb):
    def body(_, x):
      h = x
      for w in ws:  # each output sliced to the next weight's input width (q/k/v -> heads, gate/up -> gate)
        h = h[:, :w.shape[0]] @ w
      return x + 1e-3 * jnp.einsum("bd,vd->bv", h, emb)[:, :d]
    return jax.lax.fori_loop(0, n, body, x)

  axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
  spec = jax.sharding.PartitionSpec(axes or None)
  fn = jax.jit(jax.shard_map(chain, mesh=mesh, in_specs=(spec, rep.spec, rep.spec), out_specs=spec))
  x = jax.device_put(jnp.ones((rows * mesh.size, d), dt), jax.sharding.NamedSharding(mesh, spec))
  fn(x, ws, emb).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn(x, ws, emb).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return best / n, 2.0 * rows * sum(a * b for a, b in weight_matmul_shapes(cfg))


def decode_flops_per_token(cfg, context):
  # Every matmul weight once (the tied embedding as the LM head), plus attention over `context` slots.
  attn = 2 * 2 * cfg.num_layers * context * cfg.num_heads * cfg.head_dim
  return 2 * sum(a * b for a, b in weight_matmul_shapes(cfg)) + attn


def ours(cfg, mesh, prompts):
  """(compile seconds, run(n) -> Rollout) for our sampler (the rollout engine, a slot for every row, one chunk
  for the whole budget) on `mesh`, weights from seed 0. run(n) decodes n tokens a row (a per-request budget:
  the same programs for every n)."""
  model = M.init_sharded(cfg, mesh, seed=0)
  params = sampling.SamplingParams(max_new_tokens=NEW, temperature=1.0)
  eng = engine.Engine(params, engine.EngineConfig(slots=PROMPTS * SAMPLES, steps_per_chunk=NEW))

  def run(n):
    with jax.set_mesh(mesh):
      return eng.generate(model, prompts, jax.random.key(0), num_samples=SAMPLES, max_new_tokens=[n] * len(prompts))

  t0 = time.perf_counter()
  run(1)
  compile_s = time.perf_counter() - t0
  assert int(run(NEW).lengths_B.min()) == NEW
  return compile_s, run


def time_alternately(runs, repeats):
  """Best (prefill, full) seconds of each runner, the runners timed in turn so drift hits them alike."""
  best = [[float("inf")] * 2 for _ in runs]
  for _ in range(repeats):
    for b, run in zip(best, runs):
      for i, n in enumerate((1, NEW)):
        t = time.perf_counter()
        run(n)
        b[i] = min(b[i], time.perf_counter() - t)
  return best


def hf_runner(path, prompts, threads, dtype="float32"):
  """run(n) for transformers `generate` on the checkpoint at `path`, warmed up."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(
      getattr(torch, dtype)).eval()
  ids = torch.tensor(prompts)

  def run(n):
    with torch.no_grad():
      out = hf.generate(ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=n,
                        min_new_tokens=n, num_return_sequences=SAMPLES, pad_token_id=0, eos_token_id=None)
    assert out.shape == (PROMPTS * SAMPLES, PROMPT_LEN + n)

  run(2)
  return run


def main():
  ARGS = parse()
  rate = matmul_rate(ARGS.repeats)
  n = min(ARGS.threads, jax.device_count())
  print(f"matmul 2048^3 float32: {rate / 1e9:.1f} GFLOP/s  (jax {jax.__version__}, threads {ARGS.threads}, "
        f"{n} host devices, models in {ARGS.dtype})")
  rows = []
  one = sharding.make_mesh(devices=jax.devices()[:1])
  per_core = sharding.make_mesh({"data": -1}, devices=jax.devices()[:n])
  for name in ARGS.models.split(","):
    cfg = M.ModelConfig(architecture="qwen2", tie_word_embeddings=True, rope_theta=10000.0,
                        max_position_embeddings=4096, param_dtype=ARGS.dtype, dtype=ARGS.dtype, **MODELS[name])
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (PROMPTS, PROMPT_LEN)).tolist()
    compile_s, run_one = ours(cfg, one, prompts)
    _, run_cores = ours(cfg, per_core, prompts)
    same = np.array_equal(np.asarray(run_one(NEW).tokens_BxN), np.asarray(run_cores(NEW).tokens_BxN))
    with tempfile.TemporaryDirectory() as d:
      M.save_hf(M.init_sharded(cfg, one, seed=0), d)
      run_hf = hf_runner(d, prompts, ARGS.threads, ARGS.dtype)
      (pre, full), (pre_c, full_c), (hf_pre, hf_full) = time_alternately([run_one, run_cores, run_hf],
                                                                         ARGS.repeats)
    # Right after the three, so that the machine is in the same state.
    ceil_one, ceil_c = (PROMPTS * SAMPLES / weight_matmuls_alone(cfg, m, ARGS.repeats)[0] for m in (one, per_core))
    decoded = PROMPTS * SAMPLES * (NEW - 1)
    dec, dec_c, hf_dec = decoded / (full - pre), decoded / (full_c - pre_c), decoded / (hf_full - hf_pre)
    flops = decode_flops_per_token(cfg, PROMPT_LEN + NEW)
    row = {"model": name, "params_M": cfg.num_params() / 1e6, "compile_s": compile_s,
           "prefill_tok_s": PROMPTS * PROMPT_LEN / pre, "hf_prefill_tok_s": PROMPTS * PROMPT_LEN / hf_pre,
           "decode_tok_s": dec, "hf_decode_tok_s": hf_dec, "decode_speedup": dec / hf_dec,
           "decode_matmul_share": dec * flops / rate,
           "per_core_devices": n, "per_core_prefill_tok_s": PROMPTS * PROMPT_LEN / pre_c,
           "per_core_decode_tok_s": dec_c, "per_core_decode_speedup": dec_c / hf_dec,
           "per_core_decode_matmul_share": dec_c * flops / rate, "per_core_same_tokens": bool(same),
           "matmuls_alone_tok_s": ceil_one, "per_core_matmuls_alone_tok_s": ceil_c,
           "matmuls_alone_speedup": max(ceil_one, ceil_c) / hf_dec}
    rows.append(row)
    print(json.dumps(row))
  print()
  print(f"| model | params | decode tok/s: ours, 1 device / ours, {n} devices / transformers | decode speedup "
        f"(1 / {n} devices) | decode share of matmul rate (1 / {n}) | weight matmuls alone, tok/s (1 / {n} "
        "devices), best x transformers | prefill tok/s (ours / transformers) | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['params_M']:.1f}M | {r['decode_tok_s']:,.0f} / {r['per_core_decode_tok_s']:,.0f} / "
          f"{r['hf_decode_tok_s']:,.0f} | {r['decode_speedup']:.2f}x / {r['per_core_decode_speedup']:.2f}x | "
          f"{100 * r['decode_matmul_share']:.0f}% / {100 * r['per_core_decode_matmul_share']:.0f}% | "
          f"{r['matmuls_alone_tok_s']:,.0f} / {r['per_core_matmuls_alone_tok_s']:,.0f}, "
          f"{r['matmuls_alone_speedup']:.2f}x | {r['prefill_tok_s']:,.0f} / {r['hf_prefill_tok_s']:,.0f} | "
          f"{r['compile_s']:.1f} |")
    if not r["per_core_same_tokens"]:
      print(f"!! {r['model']}: the {n}-device run sampled different tokens")
  if ARGS.json:
    with open(ARGS.json, "w") as f:
      json.dump({"matmul_gflops": rate / 1e9, "dtype": ARGS.dtype, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
