"""Held-out evaluation: k samples per problem, scored, summarised. Training's periodic evaluation
(`evaluate_task`) and the evaluation CLI (`evaluate_rows`) sample and score through `rollout.Rollouts`.

Two families of metrics, kept apart by name:

* exact: avg@k (mean accuracy over the k samples: the reference's `acc/mean@k`), pass@n (the unbiased
  estimator of Chen et al. 2021 for every power of two n <= k) and maj@k (a majority vote over all k
  predictions; ties go to the prediction seen first);
* the reference's bootstrap estimates (`bootstrap`), as its validation metrics compute them: for n in
  2, 4, ..., k, 1000 subsets of n samples drawn with replacement (seed 42, the same draws for every problem),
  `best@n/mean` (the mean over subsets of the best accuracy: a biased pass@n), `worst@n/mean` and
  `maj@n/mean` (the accuracy of the subset's majority prediction), with their `/std` over subsets, and
  `std@k`. Put `acc/best@k/mean` and `acc/maj@k/mean` next to the reference's `val-core/.../acc/best@k/mean`
  and `maj@k/mean` curves; put avg@k next to `acc/mean@k`.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from dapo_jax import config_lib
from dapo_jax.rewards import RewardExecutor
from dapo_jax.rollout import Rollouts, ScoredBatch
from dapo_jax.engine import EngineConfig
from dapo_jax.sampling import SamplingParams

BOOTSTRAP_DRAWS, BOOTSTRAP_SEED = 1000, 42


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
  if n - c < k:
    return 1.0
  return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority(preds: list[str]) -> str:
  counts = collections.Counter(preds)
  best = max(counts.values())
  return next(p for p in preds if counts[p] == best)


def bootstrap_sizes(n: int) -> list[int]:
  """The subset sizes the reference reports for n samples: 2, 4, 8, ... below n, then n itself."""
  if n <= 1:
    return []
  sizes, size = [], 2
  while size < n:
    sizes.append(size)
    size *= 2
  return sizes + [n]


def bootstrap(acc: list[float], preds: list[str] | None, size: int, *, draws: int = BOOTSTRAP_DRAWS,
              seed: int = BOOTSTRAP_SEED) -> dict[str, float]:
  """The reference's bootstrap over one problem's samples: `draws` subsets of `size` indices drawn with
  replacement from a generator seeded `seed` (numpy's legacy one, reseeded per problem and size, as the
  reference's `np.random.seed` + `np.random.choice`). The majority of a subset is the prediction with the
  most votes, ties to the one first drawn, and scores the accuracy of its first draw."""
  acc_S = np.asarray(acc, np.float64)
  idx_DxS = np.random.RandomState(seed).randint(0, len(acc_S), size=(draws, size))
  vals_DxS = acc_S[idx_DxS]
  best_D, worst_D = vals_DxS.max(axis=1), vals_DxS.min(axis=1)
  out = {f"best@{size}/mean": best_D.mean(), f"best@{size}/std": best_D.std(),
         f"worst@{size}/mean": worst_D.mean(), f"worst@{size}/std": worst_D.std()}
  if preds is not None:
    codes_S = np.unique(np.asarray(preds, object).astype(str), return_inverse=True)[1].reshape(-1)
    drawn_DxS = codes_S[idx_DxS]
    votes_DxS = (drawn_DxS[:, :, None] == drawn_DxS[:, None, :]).sum(axis=2)
    # The first position holding a most-voted prediction is that prediction's first draw, and among tied
    # predictions the one drawn first.
    first_D = np.argmax(votes_DxS == votes_DxS.max(axis=1, keepdims=True), axis=1)
    maj_D = vals_DxS[np.arange(draws), first_D]
    out.update({f"maj@{size}/mean": maj_D.mean(), f"maj@{size}/std": maj_D.std()})
  return {k: float(v) for k, v in out.items()}


def summarize(problems: list[dict], k: int) -> dict:
  """`problems`: [{"answer", "results": [reward dicts, k of them]}] -> {"overall": the exact metrics
  averaged over problems, "bootstrap": the reference's estimates averaged over problems, "problems": each
  problem's exact metrics}."""
  ks = sorted({2**i for i in range(int(math.log2(k)) + 1)} | {k}) if k >= 1 else []
  per, boot = [], []
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
    b = {f"mean@{len(accs)}": float(np.mean(accs))}
    if len(accs) > 1:
      b[f"std@{len(accs)}"] = float(np.std(np.asarray(accs, np.float64)))
    for size in bootstrap_sizes(len(accs)):
      b.update(bootstrap(accs, preds if has_pred else None, size))
    boot.append(b)
  overall = {key: float(np.mean([r[key] for r in per])) for key in per[0] if key.startswith(("avg@", "pass@", "maj@"))}
  bootstrap_overall = {key: float(np.mean([b[key] for b in boot])) for key in boot[0]}
  return {"overall": overall, "bootstrap": bootstrap_overall, "problems": per}


def problems_of(batch: ScoredBatch, rows: list[dict], k: int) -> list[dict]:
  """The scored batch of k samples per row as `summarize` reads it."""
  results = [dict({"acc": bool(batch.acc_B[i]), "score": float(batch.score_B[i])},
                  **({"pred": str(batch.pred_B[i])} if batch.has_pred_B[i] else {}))
             for i in range(batch.num_rows)]
  return [{"index": r.get("index", r.get("id")), "answer": r["answer"], "results": results[j * k:(j + 1) * k]}
          for j, r in enumerate(rows)]


def score_rows(model, rollouts: Rollouts, rows: list[dict], rng) -> tuple[ScoredBatch, dict]:
  """Samples `rollouts.num_samples` responses to each row, scores and summarises them: (batch, summary)."""
  batch = rollouts(model, rows, rng)
  return batch, summarize(problems_of(batch, rows, rollouts.num_samples), rollouts.num_samples)


def evaluate_rows(model, tokenizer, rows, *, k: int, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int = 0, engine: EngineConfig = EngineConfig(), workers: int = 2,
                  reward_name: str = "math_dapo", timeout_s: float = 5.0, kill_after_s: float = 5.0) -> dict:
  """The summary (`summarize`) of k samples to each row's prompt (problem i with fold_in(key(seed), i), as
  training's evaluation), with a sample response per problem, sampled by the rollout engine (`engine`: its
  slots). Every process scores its block of the responses; all get the summary."""
  import jax
  params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
  with RewardExecutor(reward_name, workers=workers, timeout_s=timeout_s, kill_after_s=kill_after_s) as executor:
    rollouts = Rollouts(tokenizer, executor, params, num_samples=k, engine=engine)
    batch, summary = score_rows(model, rollouts, rows, jax.random.key(seed))
  for j, s in enumerate(summary["problems"]):
    s["sample"] = str(batch.text_B[j * k])[-300:]
    if rows[j].get("prompt_truncated"):
      s["prompt_truncated"] = True
  summary["truncated_prompts"] = sum(bool(r.get("prompt_truncated")) for r in rows)
  summary["timeouts"] = int(batch.timeout_B.sum())  # responses scored wrong at the reward's time limit
  return summary


def evaluate_task(model, task, config, rng, executor: RewardExecutor) -> dict[str, float]:
  """Training's evaluation on the task's held-out problems (`eval.*`), as `val/` metrics: avg@k as
  `val/acc/mean`, the exact `val/pass@k` and `val/maj@k`, and the reference's bootstrap
  `val/acc/best@k/mean` and `val/acc/maj@k/mean`."""
  e = config.eval
  rows = task.eval_rows[: e.num_problems]
  params = config_lib.sampling_params(config, task.tokenizer, evaluation=True)
  rollouts = Rollouts(task.tokenizer, executor, params, num_samples=e.k, engine=config_lib.engine_config(config))
  batch, summary = score_rows(model, rollouts, rows, rng)
  overall, boot = summary["overall"], summary["bootstrap"]
  out = {"val/acc/mean": overall[f"avg@{e.k}"], f"val/pass@{e.k}": overall[f"pass@{e.k}"],
         f"val/maj@{e.k}": overall[f"maj@{e.k}"],
         "val/response_length/mean": float(batch.lengths_B.mean()),
         "val/reward/timeouts": float(batch.timeout_B.sum())}
  for key in (f"best@{e.k}/mean", f"maj@{e.k}/mean"):
    out[f"val/acc/{key}"] = boot.get(key, float("nan"))
  return out
