"""Seconds per DAPO step by phase, and the update step's share of the machine's matmul rate.

    .venv/bin/python benchmarks/rl_step_bench.py

~4M-parameter policy (hidden 256, 5 layers, vocab 512), 8 prompts x 8 samples, 32-token prompts, 128 new
tokens (no stop token), float32 on CPU. Phases: generation, scoring (math_dapo in 2 worker processes),
old log-probs (a forward pass), update (forward + backward + AdamW, one mini-batch in micro-batches of 16).
Model FLOP utilisation counts the matmul and attention FLOPs of forward + backward (3x forward).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dapo_jax import model as M
from dapo_jax import sharding
from dapo_jax.advantages import group_advantages
from dapo_jax.rewards import RewardExecutor
from dapo_jax.engine import generate
from dapo_jax.sampling import SamplingParams
from dapo_jax.train_step import Batch, Trainer, UpdateConfig

PROMPTS, G, PROMPT_LEN, NEW = 8, 8, 32, 128


def matmul_rate(repeats=9):
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_time(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * 2048**3 / best


def _time(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def forward_flops(cfg, rows, length):
  matmul_params = cfg.num_params() - cfg.hidden_size * (2 * cfg.num_layers + 1)
  attention = 4 * cfg.num_layers * length * length * cfg.num_heads * cfg.head_dim
  return rows * (2 * matmul_params * length + attention)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--micro", type=int, default=16)
  p.add_argument("--json", default="")
  args = p.parse_args()
  rate = matmul_rate()
  cfg = M.ModelConfig(architecture="qwen2", vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=5,
                      num_heads=4, num_kv_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
                      max_position_embeddings=1024)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model = M.init_sharded(cfg, mesh, seed=0)
  trainer = Trainer(model, UpdateConfig(lr=1e-5, num_micro_batches=PROMPTS * G // args.micro), mesh)
  state = trainer.init_state(model)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, cfg.vocab_size, (PROMPTS, PROMPT_LEN)).tolist()
  params = SamplingParams(max_new_tokens=NEW, temperature=1.0)
  truths = [str(rng.integers(0, 1000)) for _ in range(PROMPTS)]

  def text(ids):  # a stand-in detokenizer: printable characters, so the reward has real strings to read
    return "".join(chr(32 + int(i) % 95) for i in ids)

  phases = {"gen": [], "reward": [], "old_log_prob": [], "update": []}
  with RewardExecutor("math_dapo", workers=2) as executor:
    for rep in range(args.repeats + 1):
      t = time.perf_counter()
      out = jax.block_until_ready(generate(model, prompts, params, jax.random.key(rep), num_samples=G))
      gen = time.perf_counter() - t
      tokens, mask = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
      t = time.perf_counter()
      scores = executor.score([text(tokens[i][mask[i]]) for i in range(len(tokens))],
                              [truths[i // G] for i in range(len(tokens))])
      reward = time.perf_counter() - t
      adv = group_advantages(np.asarray([s["score"] for s in scores]) + rng.normal(0, 1, len(scores)), G)
      batch = trainer.shard_batch(Batch(np.asarray(out.prompt_BxP), np.asarray(out.prompt_mask_BxP), tokens,
                                        mask.astype(np.float32), np.asarray(out.logprobs_BxN), adv))
      t = time.perf_counter()
      old = jax.block_until_ready(trainer.logprobs(state.params, batch))
      logp_s = time.perf_counter() - t
      batch = batch._replace(old_logp_BxN=old)
      t = time.perf_counter()
      state, metrics = trainer.update(state, batch)
      jax.block_until_ready(metrics)
      update = time.perf_counter() - t
      if rep:  # the first repetition compiles
        for k, v in zip(phases, (gen, reward, logp_s, update)):
          phases[k].append(v)
  best = {k: min(v) for k, v in phases.items()}
  seq = PROMPT_LEN + NEW
  fwd = forward_flops(cfg, PROMPTS * G, seq)
  rows = {**{f"{k}_s": v for k, v in best.items()}, "step_s": sum(best.values()),
          "params_M": cfg.num_params() / 1e6, "matmul_gflops": rate / 1e9,
          "update_mfu": 3 * fwd / best["update"] / rate, "old_log_prob_mfu": fwd / best["old_log_prob"] / rate}
  print(json.dumps(rows, indent=2))
  print()
  print("| phase | seconds | share of step |")
  print("|---|---|---|")
  for k in phases:
    print(f"| {k} | {best[k]:.3f} | {100 * best[k] / rows['step_s']:.0f}% |")
  print(f"| step | {rows['step_s']:.3f} | |")
  print(f"\nupdate step: {100 * rows['update_mfu']:.0f}% of the {rate / 1e9:.0f} GFLOP/s matmul rate "
        f"(old log-probs forward: {100 * rows['old_log_prob_mfu']:.0f}%)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
