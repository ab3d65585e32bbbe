"""What `dapo_jax.main` runs for a config: today grouped rollouts from the policy on its mesh, written to the
workdir with their throughput; the DAPO training loop takes this place (issue 5)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from dapo_jax import model as M
from dapo_jax import sharding
from dapo_jax.sampling import SamplingParams, generate
from dapo_jax.tokenizer import load_tokenizer


def build_policy(config, mesh):
  m = config.model
  if m.hf_path:
    model, cfg = M.load_hf(m.hf_path, dtype=m.param_dtype, compute_dtype=m.dtype, mesh=mesh)
  else:
    cfg = M.preset(m.preset, param_dtype=m.param_dtype, dtype=m.dtype)
    model = M.init_sharded(cfg, mesh, seed=config.seed)
  return model, cfg


def run(config, workdir: str) -> dict:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(dict(config.mesh))
  model, cfg = build_policy(config, mesh)
  r = config.rollout
  tok = load_tokenizer(config.tokenizer_path) if config.tokenizer_path else None
  if tok is not None:
    texts = [tok.apply_chat_template([{"role": "user", "content": p}]) if tok.chat_template else p
             for p in config.prompts]
    prompts = [tok.encode(t) for t in texts]
    prompts = (prompts * r.num_prompts)[: r.num_prompts]
    stop_ids, pad_id = tok.stop_ids, tok.pad_id
  else:
    rng = np.random.default_rng(config.seed)
    prompts = [rng.integers(0, cfg.vocab_size, int(rng.integers(8, 32))).tolist() for _ in range(r.num_prompts)]
    stop_ids, pad_id = (), 0
  params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, stop_ids=stop_ids, pad_id=pad_id)
  print(f"policy: {cfg.architecture} {cfg.num_params() / 1e6:.2f}M params on mesh {dict(mesh.shape)}; "
        f"{len(prompts)} prompts x {r.group_size} samples, up to {r.max_new_tokens} new tokens")
  with jax.set_mesh(mesh):
    key = jax.random.key(config.seed)
    t0 = time.perf_counter()
    out = jax.block_until_ready(generate(model, prompts, params, key, num_samples=r.group_size))
    t1 = time.perf_counter()
    out = jax.block_until_ready(generate(model, prompts, params, jax.random.fold_in(key, 1),
                                         num_samples=r.group_size))
    t2 = time.perf_counter()
  lengths = np.asarray(out.lengths_B)
  stats = {"compile_and_first_s": t1 - t0, "gen_s": t2 - t1, "response_tokens": int(lengths.sum()),
           "response_tokens_per_s": float(lengths.sum() / (t2 - t1)),
           "response_length/mean": float(lengths.mean()),
           "response_length/clip_ratio": float(np.asarray(out.truncated_B).mean())}
  tokens, mask = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
  with open(workdir / "rollouts.jsonl", "w") as f:
    for i in range(tokens.shape[0]):
      ids = tokens[i][mask[i]].tolist()
      row = {"prompt": i // r.group_size, "sample": i % r.group_size, "response_ids": ids,
             "length": int(lengths[i]), "truncated": bool(out.truncated_B[i])}
      if tok is not None:
        row["response"] = tok.decode(ids)
      f.write(json.dumps(row) + "\n")
  (workdir / "stats.json").write_text(json.dumps(stats, indent=2))
  print(json.dumps(stats, indent=2))
  print(f"wrote {workdir / 'rollouts.jsonl'}")
  return stats
