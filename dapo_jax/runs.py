"""What the programs and notebooks that read a trained policy share: load a policy (a Hugging Face checkpoint
or a training workdir's checkpoint), load a whole run, and the held-out rows to evaluate on.

    config, model, tokenizer, mesh = runs.load_run("runs/default")
    rows = runs.eval_rows_for("task", config, tokenizer)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import ml_collections

from dapo_jax import config_lib, distributed, sharding, tasks
from dapo_jax import model as M
from dapo_jax.checkpoint import Checkpointer
from dapo_jax.tokenizer import load_tokenizer
from dapo_jax.train_step import Trainer


def load_policy(checkpoint: str, config, mesh, *, step: int | None = None):
  """(model, tokenizer) from a Hugging Face checkpoint dir or a training workdir (its newest readable
  checkpoint, or checkpoint `step`)."""
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
  if distributed.is_main():
    print(f"loaded {path} checkpoint step {step}")
  return trainer.model(state), task.tokenizer


def run_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """A training run's whole config as it ran (its `run_config.json`)."""
  saved = Path(workdir).expanduser() / "run_config.json"
  if not saved.is_file():
    raise FileNotFoundError(f"{saved}: not a training run directory (no run_config.json)")
  return ml_collections.ConfigDict(json.loads(saved.read_text()))


def load_run(workdir: str | Path, step: int | None = None):
  """(config, model, tokenizer, mesh) of a training run: its config as it ran and its newest readable
  checkpoint (or checkpoint `step`), on a mesh of this process's devices."""
  config = run_config(workdir)
  mesh = sharding.make_mesh(config_lib.mesh_axes(config))
  model, tokenizer = load_policy(str(workdir), config, mesh, step=step)
  return config, model, tokenizer, mesh


def eval_rows_for(dataset: str, config, tokenizer):
  """Held-out rows: 'task' (the config's own eval split) or a source data set name (aime24, math500, ...)."""
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
