"""Sampler throughput against transformers `generate`, on the same weights and thread count.

    .venv/bin/python benchmarks/sampler_bench.py [--models S,M] [--threads 2]

8 prompts x 8 samples, 32-token prompts, 128 new tokens (no stop token, so every row decodes all 128),
float32 on CPU. Prefill rate = prompt tokens / prefill time; decode rate = decoded tokens / (full - prefill).
Also measures this machine's single-matmul rate (2048^3 float32) and the share of it the decode loop reaches.
Needs the test requirements (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dapo_jax import model as M
from dapo_jax import sampling, sharding


def parse():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="S,M")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default="")
  return p.parse_args()


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


def decode_flops_per_token(cfg, context):
  # Every matmul weight once (the tied embedding as the LM head), plus attention over `context` slots.
  matmul_params = cfg.num_params() - cfg.hidden_size * (2 * cfg.num_layers + 1)
  attn = 2 * 2 * cfg.num_layers * context * cfg.num_heads * cfg.head_dim
  return 2 * matmul_params + attn


def bench_ours(model, prompts, repeats):
  graphdef, state = nnx.split(model)
  prompt, mask = sampling.pad_prompts(prompts, 0, PROMPT_LEN)
  params = sampling.SamplingParams(max_new_tokens=NEW, temperature=1.0)

  def run(n):
    out = sampling._generate(graphdef, state, jnp.asarray(prompt), jnp.asarray(mask), jax.random.key(0),
                             jnp.asarray(n, jnp.int32), params=params, num_samples=SAMPLES, budget=NEW)
    return jax.block_until_ready(out)

  t0 = time.perf_counter()
  run(1)
  compile_s = time.perf_counter() - t0
  prefill = best_of(lambda: run(1), repeats)  # prefill + the fan-out + one decode step
  full = best_of(lambda: run(NEW), repeats)
  assert int(run(NEW).lengths_B.min()) == NEW
  return compile_s, prefill, full


def bench_hf(path, prompts, threads, repeats):
  import torch
  import transformers
  torch.set_num_threads(threads)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").float().eval()
  ids = torch.tensor(prompts)

  def run(n):
    with torch.no_grad():
      out = hf.generate(ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=n,
                        min_new_tokens=n, num_return_sequences=SAMPLES, pad_token_id=0, eos_token_id=None)
    assert out.shape == (PROMPTS * SAMPLES, PROMPT_LEN + n)

  run(2)
  return best_of(lambda: run(1), repeats), best_of(lambda: run(NEW), repeats)


def main():
  ARGS = parse()
  rate = matmul_rate(ARGS.repeats)
  print(f"matmul 2048^3 float32: {rate / 1e9:.1f} GFLOP/s  (jax {jax.__version__}, threads {ARGS.threads})")
  rows = []
  one = sharding.make_mesh(devices=jax.devices()[:1])
  for name in ARGS.models.split(","):
    cfg = M.ModelConfig(architecture="qwen2", tie_word_embeddings=True, rope_theta=10000.0,
                        max_position_embeddings=4096, **MODELS[name])
    model = M.init_sharded(cfg, one, seed=0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (PROMPTS, PROMPT_LEN)).tolist()
    compile_s, pre, full = bench_ours(model, prompts, ARGS.repeats)
    with tempfile.TemporaryDirectory() as d:
      M.save_hf(model, d)
      hf_pre, hf_full = bench_hf(d, prompts, ARGS.threads, ARGS.repeats)
    decoded = PROMPTS * SAMPLES * (NEW - 1)
    ours_dec, hf_dec = decoded / (full - pre), decoded / (hf_full - hf_pre)
    flops = decode_flops_per_token(cfg, PROMPT_LEN + NEW)
    row = {"model": name, "params_M": cfg.num_params() / 1e6, "compile_s": compile_s,
           "prefill_tok_s": PROMPTS * PROMPT_LEN / pre, "hf_prefill_tok_s": PROMPTS * PROMPT_LEN / hf_pre,
           "decode_tok_s": ours_dec, "hf_decode_tok_s": hf_dec, "decode_speedup": ours_dec / hf_dec,
           "decode_matmul_share": ours_dec * flops / rate}
    rows.append(row)
    print(json.dumps(row))
  print()
  print("| model | params | prefill tok/s (ours / transformers) | decode tok/s (ours / transformers) | "
        "decode speedup | decode share of matmul rate | compile s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['params_M']:.1f}M | {r['prefill_tok_s']:,.0f} / {r['hf_prefill_tok_s']:,.0f} | "
          f"{r['decode_tok_s']:,.0f} / {r['hf_decode_tok_s']:,.0f} | {r['decode_speedup']:.2f}x | "
          f"{100 * r['decode_matmul_share']:.0f}% | {r['compile_s']:.1f} |")
  if ARGS.json:
    with open(ARGS.json, "w") as f:
      json.dump({"matmul_gflops": rate / 1e9, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
