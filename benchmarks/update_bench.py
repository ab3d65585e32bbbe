"""The update step (forward + backward + AdamW of one mini-batch), packed against padded, beside PyTorch.

    .venv/bin/python benchmarks/update_bench.py [--models S,M] [--batches long,fixed] [--repeats 2]

Batches: "long", 512 rows with 32-token prompts and responses of geometric lengths (mean 125, cut at 512: the
long-tail workload of `longtail_bench.py`, fixed seed); "fixed", the DAPO step benchmark's 8 prompts x 8 with
32-token prompts and 128 response tokens each. Models S and M of `longtail_bench.py`, float32, one host
device. Padded micro-batches hold `--micro` rows of the padded width; packed ones the same number of tokens
(`actor.max_tokens_per_micro_batch` = micro x padded width). The peer is the same update in PyTorch on the same
weights (a transformers Qwen2 with sdpa attention, `--threads` threads): rows sorted by length, micro-batches
of at most the same tokens each padded to its longest row, the token-mean clipped policy loss, backward,
global-norm clipping, torch.optim.AdamW. The three run interleaved, each after one untimed warm-up; a figure
is the median over repeats. Useful tokens are the rows' real tokens (prompt and response); the matmul share
counts the FLOPs of those tokens alone (3x the forward's matmuls and attention) against a 2048^3 float32
matmul timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.longtail_bench import MODELS, build  # noqa: E402
from benchmarks.rl_step_bench import forward_flops, matmul_rate  # noqa: E402
from dapo_jax import model as M  # noqa: E402
from dapo_jax import sharding  # noqa: E402
from dapo_jax.train_step import Batch, Trainer, UpdateConfig  # noqa: E402

PROMPT_LEN = 32
BATCHES = {"long": dict(rows=512, width=512, mean=125), "fixed": dict(rows=64, width=128, mean=0)}


def parse(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="S,M")
  p.add_argument("--batches", default="long,fixed")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--micro", type=int, default=16, help="rows per padded micro-batch (packed: the same tokens)")
  p.add_argument("--threads", type=int, default=2, help="torch threads")
  p.add_argument("--skip_torch", action="store_true")
  p.add_argument("--json", default="")
  return p.parse_args(argv)


def workload(kind: str, vocab: int) -> Batch:
  spec = BATCHES[kind]
  rng = np.random.default_rng(0)
  rows, width = spec["rows"], spec["width"]
  lengths = np.minimum(rng.geometric(1 / spec["mean"], rows), width) if spec["mean"] else np.full(rows, width)
  mask = (np.arange(width)[None] < lengths[:, None]).astype(np.float32)
  tokens = (rng.integers(5, vocab, (rows, width)) * mask).astype(np.int32)
  # Old log-probs near a random model's (-log V), so that some ratios clip.
  old = ((-np.log(vocab) + rng.normal(0, 0.1, (rows, width))) * mask).astype(np.float32)
  return Batch(rng.integers(5, vocab, (rows, PROMPT_LEN)).astype(np.int32), np.ones((rows, PROMPT_LEN), bool),
               tokens, mask, old, rng.normal(size=rows).astype(np.float32))


def jax_update(model, mesh, batch: Batch, *, packed: bool, micro: int):
  rows = batch.tokens_BxN.shape[0]
  budget = micro * (PROMPT_LEN + batch.tokens_BxN.shape[1])
  cfg = UpdateConfig(lr=1e-6, warmup_steps=0, max_tokens_per_micro_batch=budget if packed else 0,
                     num_micro_batches=1 if packed else rows // micro)
  trainer = Trainer(model, cfg, mesh)
  holder = {"state": trainer.init_state(model)}

  def run():
    holder["state"], metrics = trainer.update(holder["state"], trainer.shard_batch(batch))
    return float(jax.block_until_ready(metrics)["actor/pg_loss"])
  return run


def torch_update(path: str, batch: Batch, *, micro: int, threads: int):
  import torch
  import transformers
  torch.set_num_threads(threads)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").float().train()
  opt = torch.optim.AdamW(hf.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
  lengths = batch.mask_BxN.sum(axis=1).astype(int)
  budget = micro * (PROMPT_LEN + batch.tokens_BxN.shape[1])
  order = np.argsort(-lengths, kind="stable")
  groups, current = [], []
  for i in order:  # longest first: each micro-batch is padded to its first row
    if current and (len(current) + 1) * (PROMPT_LEN + lengths[current[0]]) > budget:
      groups.append(current)
      current = []
    current.append(i)
  groups.append(current)
  total = float(batch.mask_BxN.sum())

  def run():
    opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for idx in groups:
      n = int(lengths[idx[0]])
      ids = torch.tensor(np.concatenate([batch.prompt_BxP[idx], batch.tokens_BxN[idx, :n]], axis=1), dtype=torch.long)
      mask = torch.tensor(batch.mask_BxN[idx, :n])
      attn = torch.cat([torch.ones(len(idx), PROMPT_LEN), mask], dim=1).long()
      logits = hf(input_ids=ids, attention_mask=attn).logits[:, PROMPT_LEN - 1:-1].float()
      logp_all = torch.log_softmax(logits, dim=-1)
      logp = logp_all.gather(-1, ids[:, PROMPT_LEN:, None])[..., 0]
      ratio = torch.exp(torch.clamp(logp - torch.tensor(batch.old_logp_BxN[idx, :n]), -20, 20))
      adv = torch.tensor(batch.adv_B[idx])[:, None]
      per_token = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.28))
      per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * 10.0), per_token)
      loss = (per_token * mask).sum() / total
      loss.backward()
      with torch.no_grad():  # the entropy metric, as ours logs
        (-(logp_all.exp() * logp_all).sum(-1) * mask).sum()
      loss_sum += float(loss)
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    opt.step()
    return loss_sum
  return run


def main():
  args = parse()
  rate = matmul_rate()
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  print(f"matmul 2048^3 float32: {rate / 1e9:.1f} GFLOP/s (jax {jax.__version__}, one host device; torch "
        f"{args.threads} threads)")
  results = []
  for name in args.models.split(","):
    model = build(name, mesh)
    cfg = model.cfg
    with tempfile.TemporaryDirectory() as d:
      M.save_hf(model, d)
      for kind in args.batches.split(","):
        batch = workload(kind, cfg.vocab_size)
        lengths = PROMPT_LEN + batch.mask_BxN.sum(axis=1).astype(int)
        useful = int(lengths.sum())
        flops = 3 * sum(forward_flops(cfg, 1, int(n)) for n in lengths)
        runs = {"padded": jax_update(model, mesh, batch, packed=False, micro=args.micro),
                "packed": jax_update(model, mesh, batch, packed=True, micro=args.micro)}
        if not args.skip_torch:
          runs["torch"] = torch_update(d, batch, micro=args.micro, threads=args.threads)
        times = {k: [] for k in runs}
        for k, run in runs.items():
          run()  # compile / warm up
        for _ in range(args.repeats):
          for k, run in runs.items():
            t = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t)
        for k, ts in times.items():
          s = float(np.median(ts))
          row = {"model": name, "batch": kind, "update": k, "seconds": s, "useful_tokens": useful,
                 "useful_tokens_per_s": useful / s, "matmul_share": flops / s / rate, "repeats": ts}
          results.append(row)
          print(f"{name:2s} {kind:5s} {k:7s} {s:8.3f} s  {useful / s:9.0f} useful tok/s  "
                f"{100 * row['matmul_share']:5.1f}% of matmul rate", flush=True)
        base = {r["update"]: r["seconds"] for r in results if r["model"] == name and r["batch"] == kind}
        line = f"{name} {kind}: packed is {base['padded'] / base['packed']:.2f}x padded"
        if "torch" in base:
          line += f", {base['torch'] / base['packed']:.2f}x torch"
        print(line, flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"matmul_gflops": rate / 1e9, "rows": results}, f, indent=2)


if __name__ == "__main__":
  main()
