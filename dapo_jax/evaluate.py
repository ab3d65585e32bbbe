"""Evaluation: `python -m dapo_jax.evaluate --config=configs/<name>.py --checkpoint=DIR --dataset=aime24 --k=32`.

Samples k responses per problem (temperature 1.0, top-p 0.7 by default, as the paper) and reports, per
problem and overall: avg@k (mean accuracy), pass@k (the unbiased estimator of Chen et al. 2021, for every
power of two up to k) and maj@k (an exact majority vote over normalised answers; ties go to the answer
seen first). `--checkpoint` is a Hugging Face checkpoint directory or a training workdir (its newest
checkpoint). Writes JSON (`--out`) and prints a table.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from pathlib import Path

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
  if n - c < k:
    return 1.0
  return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority(preds: list[str]) -> str:
  counts = collections.Counter(preds)
  best = max(counts.values())
  return next(p for p in preds if counts[p] == best)


def summarize(problems: list[dict], k: int) -> dict:
  """`problems`: [{"answer", "results": [reward dicts, k of them]}] -> per-problem and overall metrics."""
  ks = [2**i for i in range(int(math.log2(k)) + 1)] if k >= 1 else []
  per = []
  for p in problems:
    accs = [bool(r["acc"]) for r in p["results"]]
    preds = [str(r.get("pred", "")) for r in p["results"]]
    vote = majority(preds)
    # No "pred" from the reward (a custom one may not give it): no vote to take, so no maj@k (it would be
    # pass@k under another name).
    has_pred = any("pred" in r for r in p["results"])
    vote_acc = any(r["acc"] for r, pr in zip(p["results"], preds) if pr == vote) if has_pred else float("nan")
    row = {"index": p.get("index"), "answer": p["answer"], "correct": sum(accs), "n": len(accs),
           f"avg@{k}": float(np.mean(accs)), f"maj@{k}": float(vote_acc), "majority_pred": vote}
    for kk in ks:
      row[f"pass@{kk}"] = pass_at_k(len(accs), sum(accs), kk)
    per.append(row)
  overall = {key: float(np.mean([r[key] for r in per])) for key in per[0] if key.startswith(("avg@", "pass@", "maj@"))}
  return {"overall": overall, "problems": per}


def evaluate_rows(model, tokenizer, rows, *, k: int, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int = 0, batch_prompts: int = 8, workers: int = 2,
                  reward_name: str = "math_dapo") -> dict:
  """Samples k responses to each row's prompt, `batch_prompts` prompts per sampler call (chunk i with
  fold_in(key(seed), i), as training's evaluation), scores them and summarises (see `summarize`). Every
  process samples its share of each call's rows and scores its block of the responses; all get the summary."""
  import jax
  from dapo_jax.rewards import RewardExecutor
  from dapo_jax.sampling import SamplingParams
  from dapo_jax.train import generate_in_chunks, score_shared
  params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
  # The last chunk is filled up to the others' size, so that every call runs one program.
  out = generate_in_chunks(model, [r["prompt_ids"] for r in rows], params, jax.random.key(seed), k,
                           batch_prompts, fill=True)
  tokens, mask = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
  texts = [tokenizer.decode(tokens[i][mask[i]]) for i in range(len(tokens))]
  with RewardExecutor(reward_name, workers=workers) as executor:
    results = score_shared(executor, texts, [rows[i // k]["answer"] for i in range(len(texts))])
  problems = [{"index": r.get("index", r.get("id")), "answer": r["answer"], "results": results[j * k:(j + 1) * k]}
              for j, r in enumerate(rows)]
  summary = summarize(problems, k)
  for j, s in enumerate(summary["problems"]):
    s["sample"] = texts[j * k][-300:]
    if rows[j].get("prompt_truncated"):
      s["prompt_truncated"] = True
  summary["truncated_prompts"] = sum(bool(r.get("prompt_truncated")) for r in rows)
  return summary


def load_policy(checkpoint: str, config, mesh, *, step: int | None = None):
  """(model, tokenizer) from a Hugging Face checkpoint dir or a training workdir (its newest readable
  checkpoint, or checkpoint `step`)."""
  import jax
  from dapo_jax import model as M
  from dapo_jax import tasks
  from dapo_jax.checkpoint import Checkpointer
  from dapo_jax.tokenizer import load_tokenizer
  from dapo_jax.train_step import Trainer
  from dapo_jax import config_lib
  path = Path(checkpoint).expanduser()
  if (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
    model, _ = M.load_hf(path, dtype=config.model.param_dtype, compute_dtype=config.model.dtype, mesh=mesh)
    return model, load_tokenizer(config.tokenizer.path or path)
  task = tasks.build(config, path)
  model = tasks.build_policy(config, task, mesh)
  trainer = Trainer(model, config_lib.update_config(config), mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          jax.eval_shape(trainer.init_state, model), trainer.state_shardings)
  checkpointer = Checkpointer(path / "checkpoints")
  if step is not None and step not in checkpointer.steps():
    raise FileNotFoundError(f"{path}: no checkpoint step {step} (there are {checkpointer.steps()})")
  restored = checkpointer.restore_latest(abstract, up_to=step)
  if restored is None:
    raise FileNotFoundError(f"{path}: no readable checkpoint under {path / 'checkpoints'}")
  step, state, _ = restored
  print(f"loaded {path} checkpoint step {step}")
  return trainer.model(state), task.tokenizer


def load_run(workdir: str | Path, step: int | None = None):
  """(config, model, tokenizer, mesh) of a training run: its config as it ran and its newest readable
  checkpoint (or checkpoint `step`), on a mesh of this process's devices.

      config, model, tokenizer, mesh = evaluate.load_run("runs/default")
  """
  import ml_collections
  from dapo_jax import sharding
  path = Path(workdir)
  saved = path / "run_config.json"
  if not saved.is_file():
    raise FileNotFoundError(f"{saved}: not a training run directory (no run_config.json)")
  config = ml_collections.ConfigDict(json.loads(saved.read_text()))
  mesh = sharding.make_mesh(dict(config.mesh))
  model, tokenizer = load_policy(str(path), config, mesh, step=step)
  return config, model, tokenizer, mesh


def eval_rows_for(dataset: str, config, tokenizer):
  """Held-out rows: 'task' (the config's own eval split) or a source data set name (aime24, math500, ...)."""
  import os
  from dapo_jax import tasks
  from dapo_jax.data import math_datasets as md
  if dataset == "task":
    return tasks.build(config, Path(".")).eval_rows
  if dataset not in md.SOURCES:
    raise ValueError(f"evaluate: unknown dataset {dataset!r}; known: 'task', {', '.join(map(repr, md.SOURCES))}")
  split = "test" if "test" in md.SOURCES[dataset][1] else next(iter(md.SOURCES[dataset][1]))
  builder = md.math_builder(dataset, config.data.source_dir, str(Path(os.path.expanduser(config.data.dir)) / "tfds"))
  rows = md.read_builder_split(builder, split)
  limit = config.data.max_prompt_length
  longest = 0
  for r in rows:
    r["prompt_ids"], r["prompt_truncated"] = tasks.encode_prompt(tokenizer, r["messages"], limit)
    if r["prompt_truncated"]:
      longest = max(longest, len(tasks.encode_prompt(tokenizer, r["messages"], 10**9)[0]))
  cut = sum(r["prompt_truncated"] for r in rows)
  if cut:
    # A problem cut short is scored as if it were whole: say so, loudly (a Hugging Face checkpoint evaluated
    # without --config gets configs/default.py's 64 tokens, made for its arithmetic task).
    logging.warning("evaluate: %d of %d %s prompts are longer than data.max_prompt_length=%d (the longest has %d "
                    "tokens) and were left-truncated; pass --config.data.max_prompt_length=%d (and the run's "
                    "--config) to evaluate them whole", cut, len(rows), dataset, limit, longest, longest)
  return rows


def print_table(summary: dict, dataset: str, k: int):
  o = summary["overall"]
  keys = [key for key in o]
  print(f"\n{dataset}: {len(summary['problems'])} problems x {k} samples")
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  print("| " + " | ".join(f"{100 * o[key]:.1f}" for key in keys) + " |")
  if summary.get("truncated_prompts"):
    print(f"!! {summary['truncated_prompts']} of these prompts were left-truncated (data.max_prompt_length)")


def main(argv):
  from absl import flags
  from dapo_jax import cli
  F = flags.FLAGS
  config, mesh, _ = cli.start_checkpoint_program()
  import jax
  from dapo_jax import distributed
  # Built outside `jax.set_mesh`: abstract models carry logical axis names, which are not mesh axes.
  model, tokenizer = load_policy(F.checkpoint, config, mesh)
  rows = eval_rows_for(F.dataset, config, tokenizer)
  with jax.set_mesh(mesh):
    if F.limit:
      rows = rows[:F.limit]
    reward = F.reward or config.reward.name
    # The config's evaluation chunk and reward workers: the recipes size them for their accelerators.
    summary = evaluate_rows(model, tokenizer, rows, k=F.k, temperature=F.temperature,
                            top_p=F.top_p, max_new_tokens=F.max_new_tokens or config.rollout.max_response_length,
                            seed=F.seed, reward_name=reward, batch_prompts=config.eval.get("chunk_size", 0) or 8,
                            workers=config.reward.workers)
  summary.update(dataset=F.dataset, k=F.k, temperature=F.temperature, top_p=F.top_p, checkpoint=F.checkpoint)
  if distributed.is_main():  # every process has the same summary; one writes it
    out = Path(F.out or Path(F.checkpoint) / f"eval_{F.dataset}_k{F.k}.json")
    out.write_text(json.dumps(summary, indent=2))
    print_table(summary, F.dataset, F.k)
    print(f"wrote {out}")


def _define_flags():
  from absl import flags
  from dapo_jax import cli
  cli.define_checkpoint_flags()
  flags.DEFINE_string("dataset", "task", "'task' (the config's held-out split) or aime24, aime25, amc2023, "
                      "math500, gsm8k, dapo_aime24.")
  flags.DEFINE_integer("k", 32, "Samples per problem.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
  flags.DEFINE_float("top_p", 0.7, "Nucleus mass.")
  flags.DEFINE_integer("max_new_tokens", 0, "Token budget (0: the config's max_response_length).")
  flags.DEFINE_integer("limit", 0, "Evaluate only the first N problems (0: all).")
  flags.DEFINE_string("reward", "", "Reward name (default: the config's; math_verify for LaTeX answers).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("out", "", "JSON output path (default: in the checkpoint dir).")
  cli.define_distributed_flags()


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
