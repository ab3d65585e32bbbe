"""Evaluation: `python -m dapo_jax.evaluate --config=configs/<name>.py --checkpoint=DIR --dataset=aime24 --k=32`.

Samples k responses per problem (temperature 1.0, top-p 0.7 by default, as the paper) and reports, per
problem and overall, the exact avg@k, pass@n and maj@k, and beside them the reference's bootstrap
estimates (best@n, worst@n, maj@n over resampled subsets; see `dapo_jax.evaluation`). `--checkpoint` is a
Hugging Face checkpoint directory or a training workdir (its newest checkpoint). Writes JSON (`--out`) and
prints a table. The library behind it: `dapo_jax.evaluation` and `dapo_jax.runs`.
"""

from __future__ import annotations

import json
from pathlib import Path


def print_table(summary: dict, dataset: str, k: int):
  o = summary["overall"]
  b = summary.get("bootstrap", {})
  keys = list(o) + [key for key in (f"best@{k}/mean", f"maj@{k}/mean") if key in b]
  values = {**o, **{key: b[key] for key in keys if key in b}}
  print(f"\n{dataset}: {len(summary['problems'])} problems x {k} samples (best@/maj@.../mean: the reference's "
        f"bootstrap estimates)")
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  print("| " + " | ".join(f"{100 * values[key]:.1f}" for key in keys) + " |")
  if summary.get("truncated_prompts"):
    print(f"!! {summary['truncated_prompts']} of these prompts were left-truncated (data.max_prompt_length)")


def main(argv):
  from absl import flags
  from dapo_jax import cli
  F = flags.FLAGS
  config, mesh, _ = cli.start_checkpoint_program()
  import jax
  from dapo_jax import config_lib, distributed, runs
  from dapo_jax.evaluation import evaluate_rows
  # Built outside `jax.set_mesh`: abstract models carry logical axis names, which are not mesh axes.
  model, tokenizer = runs.load_policy(F.checkpoint, config, mesh)
  rows = runs.eval_rows_for(F.dataset, config, tokenizer)
  with jax.set_mesh(mesh):
    if F.limit:
      rows = rows[:F.limit]
    reward = F.reward or config.reward.name
    # The config's engine slots and reward workers: the recipes size them for their accelerators.
    summary = evaluate_rows(model, tokenizer, rows, k=F.k, temperature=F.temperature,
                            top_p=F.top_p, max_new_tokens=F.max_new_tokens or config.rollout.max_response_length,
                            seed=F.seed, reward_name=reward, engine=config_lib.engine_config(config),
                            workers=config.reward.workers, timeout_s=config.reward.timeout_s,
                            kill_after_s=config.reward.get("kill_after_s", 5.0))
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
