"""What a run trains on: the tokenizer, the prompts (train and held-out), the reward, and the policy it starts
from. `build(config, workdir)` makes them for `config.data.name`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import jax
from flax import nnx

from dapo_jax import checkpoint, distributed
from dapo_jax import model as M
from dapo_jax.data import synthetic
from dapo_jax.data.iterator import PromptIterator
from dapo_jax.sft import SFTConfig, pack, train_sft
from dapo_jax.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass
class Task:
  tokenizer: Tokenizer
  train_rows: list[dict]  # each: prompt_ids, answer, ...
  eval_rows: list[dict]
  demonstrations: Callable[[int, int], list[tuple[list[int], list[int]]]] | None = None
  truncated_prompts: int = 0

  def train_iterator(self, seed: int) -> PromptIterator:
    """Each process reads its block of every global batch."""
    return PromptIterator(self.train_rows, seed, process_index=jax.process_index(),
                          num_processes=jax.process_count())


def encode_prompt(tokenizer: Tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], bool]:
  """Chat-templated prompt ids, left-truncated to `max_len` (as the reference): (ids, truncated)."""
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True) if tokenizer.chat_template else \
      messages[-1]["content"]
  ids = tokenizer.encode(text)
  return (ids[-max_len:], True) if len(ids) > max_len else (ids, False)


def _arithmetic(config, workdir: Path) -> Task:
  from dapo_jax.data.tfds_builders import arithmetic_builder, read_split
  task = synthetic.ArithmeticTask(**dict(config.data.task))
  data_dir = Path(os.path.expanduser(config.data.dir))
  builder = arithmetic_builder(task, str(data_dir / "tfds"))
  if config.tokenizer.path:
    tok = load_tokenizer(config.tokenizer.path)
  else:
    key = f"arith_d{task.digits}_s{task.seed}_e{task.error_rate}_v{config.tokenizer.vocab_size}"
    tok = load_tokenizer(synthetic.build_tokenizer(task, data_dir / "tokenizers" / key,
                                                   vocab_size=config.tokenizer.vocab_size))
  truncated = 0

  def rows(split):
    nonlocal truncated
    out = []
    for r in read_split(builder, split):
      ids, cut = encode_prompt(tok, synthetic.prompt_messages(r["problem"]), config.data.max_prompt_length)
      truncated += cut
      out.append({**r, "prompt_ids": ids, "prompt_truncated": bool(cut)})
    return out

  train, test = rows("train"), rows("test")
  by_problem = {r["problem"]: r["prompt_ids"] for r in train}

  def demonstrations(n, seed):
    return [(by_problem[p], tok.encode(solution) + [tok.eos_id])
            for p, solution, _ in synthetic.demonstrations(task, n, seed)]

  return Task(tok, train, test, demonstrations, truncated)


def _math(config, workdir: Path) -> Task:
  """Real math data (`data.train` / `data.eval` name sources in `dapo_jax.data.math_datasets.SOURCES`)."""
  from dapo_jax.data import math_datasets as md
  d = config.data
  data_dir = str(Path(os.path.expanduser(d.dir)) / "tfds")
  tok_path = config.tokenizer.path or config.model.hf_path
  if not tok_path:
    raise ValueError("config.tokenizer.path (or config.model.hf_path) must name a tokenizer for real data")
  tok = load_tokenizer(tok_path)
  truncated = 0

  def rows(name, split, dedup):
    nonlocal truncated
    out = []
    builder = md.math_builder(name, d.source_dir, data_dir, dedup=dedup, skip_bad_rows=d.get("skip_bad_rows", False))
    for r in md.read_builder_split(builder, split):
      ids, cut = encode_prompt(tok, r["messages"], d.max_prompt_length)
      truncated += cut
      out.append({**r, "prompt_ids": ids, "prompt_truncated": bool(cut)})
    return out

  # data.dedup=False trains on the parquet's copies as the reference did; evaluation always takes each problem
  # once (the AIME file's 30 problems x 32 copies, shuffled: its first 30 rows hold 21 problems).
  return Task(tok, rows(d.train, d.train_split, d.dedup), rows(d.eval, d.eval_split, True), None, truncated)


TASKS = {"arithmetic": _arithmetic, "math": _math}


def build(config, workdir: Path) -> Task:
  if config.data.name not in TASKS:
    raise ValueError(f"config.data.name={config.data.name!r} is not one of {sorted(TASKS)}")
  # Process 0 fills the shared caches (TFDS data, the trained tokenizer) first; the others then read them.
  task = distributed.main_first(lambda: TASKS[config.data.name](config, workdir),
                                f"building the task (config.data.name={config.data.name!r})")
  if task.truncated_prompts:
    logging.warning("%d prompts were longer than data.max_prompt_length=%d and were left-truncated",
                    task.truncated_prompts, config.data.max_prompt_length)
  return task


def model_config(config, vocab_size: int | None = None) -> M.ModelConfig:
  """The policy's ModelConfig from the config alone (a checkpoint's config.json or the preset): nothing built."""
  m = config.model
  if m.hf_path:
    hf, file = M.hf_io.read_hf_config(m.hf_path)
    return M.ModelConfig.from_hf(hf, source=str(file), param_dtype=m.param_dtype, dtype=m.dtype,
                                 remat=m.remat, attention_chunk=m.attention_chunk,
                                 attention_impl=m.attention_impl)
  extra = {"vocab_size": vocab_size} if vocab_size else {}
  return M.preset(m.preset, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                  attention_chunk=m.attention_chunk, attention_impl=m.attention_impl, **{**dict(m.overrides), **extra})


def build_policy(config, task: Task, mesh) -> M.Transformer:
  m = config.model
  if m.hf_path:
    model, _ = M.load_hf(m.hf_path, dtype=m.param_dtype, compute_dtype=m.dtype, mesh=mesh, remat=m.remat,
                         attention_chunk=m.attention_chunk, attention_impl=m.attention_impl)
    return model
  cfg = M.preset(m.preset, param_dtype=m.param_dtype, dtype=m.dtype, vocab_size=task.tokenizer.vocab_size,
                 eos_token_id=task.tokenizer.eos_id, remat=m.remat, attention_chunk=m.attention_chunk,
                 attention_impl=m.attention_impl,
                 **dict(m.overrides))
  return M.init_sharded(cfg, mesh, seed=config.seed)


def warm_start_key(config, mesh=None) -> str:
  """What determines the warm start's result: the task, tokenizer, model, SFT settings and seed, and the mesh
  it trains on (another layout sums gradients in another order: other rounding, other weights)."""
  c = config.to_dict()
  parts = {"data": {k: c["data"][k] for k in ("name", "task", "max_prompt_length")}, "tokenizer": c["tokenizer"],
           "model": c["model"], "sft": {k: v for k, v in c["sft"].items() if k != "cache"}, "seed": c["seed"],
           "response_length": c["rollout"]["max_response_length"]}
  if mesh is not None:
    parts["mesh"] = {name: int(size) for name, size in dict(mesh.shape).items()}
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def warm_start(config, task: Task, model, mesh, workdir: Path):
  """The supervised warm start (config.sft.steps > 0 and a task with demonstrations).

  With `sft.cache`, the result is kept under `data.dir/warm_start/<key>` and reused by every run with the same
  task, model, SFT settings and seed (the runs of a sweep share it instead of each repeating it).
  """
  s = config.sft
  if not s.steps or task.demonstrations is None:
    return model
  log = print if distributed.is_main() else (lambda *_: None)
  cached = Path(os.path.expanduser(config.data.dir)).absolute() / "warm_start" / warm_start_key(config, mesh)
  if s.cache and cached.is_dir():
    graphdef, state = nnx.split(model)
    log(f"warm start: reused {cached}")
    return nnx.merge(graphdef, checkpoint.restore_tree(cached, state))
  tok = task.tokenizer

  def batches():
    i = 0
    while True:
      demos = task.demonstrations(s.batch_size, config.seed * 100003 + i)
      i += 1
      yield pack([d[0] for d in demos], [d[1] for d in demos], tok.pad_id, config.rollout.max_response_length)

  log(f"warm start: {s.steps} supervised steps on imperfect demonstrations")
  model, loss = train_sft(model, mesh, SFTConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                                                 warmup_steps=s.warmup_steps), batches(),
                          log_every=max(s.steps // 4, 1), log=log)
  writer = hashlib.sha256(str(Path(workdir).absolute()).encode()).hexdigest()[:12]  # the same in every process
  if s.cache and not checkpoint.save_tree(cached, nnx.state(model), writer=writer):
    logging.info("warm start cache %s was written meanwhile by another run", cached)
  return model
