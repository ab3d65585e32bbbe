"""Config checks that run before anything is built or compiled, and the config -> strategy objects."""

from __future__ import annotations

import json

from dapo_jax import rewards
from dapo_jax.dynamic_sampling import METRICS, ON_EXHAUSTED
from dapo_jax.loss import AGG_MODES
from dapo_jax.train_step import UpdateConfig


class ConfigValidationError(ValueError):
  pass


def _fail(field: str, message: str):
  raise ConfigValidationError(f"config.{field}: {message}")


def gen_batch_prompts(config) -> int:
  """Prompts per generation batch. With dynamic sampling off every group is kept, so a generation batch is
  the training batch (as the reference): sampling rollout.gen_batch_size prompts would throw the rest away."""
  r = config.rollout
  return r.gen_batch_size if config.dynamic_sampling.enable else r.train_batch_size


def validate(config, mesh=None) -> None:
  r, u = config.rollout, config.actor
  for field in ("rollout.group_size", "rollout.gen_batch_size", "rollout.train_batch_size",
                "rollout.max_response_length", "actor.mini_batch_size", "actor.micro_batch_size"):
    value = config
    for part in field.split("."):
      value = value[part]
    if not isinstance(value, int) or value <= 0:
      _fail(field, f"must be a positive integer, got {value!r}")
  if not isinstance(config.total_steps, int) or config.total_steps < 0:
    # 0 is a valid run: the warm start and checkpoint 0, to continue from later.
    _fail("total_steps", f"must be a non-negative integer, got {config.total_steps!r}")
  every = config.checkpoint.every
  if not isinstance(every, int) or every < 0:
    _fail("checkpoint.every", f"must be a non-negative integer (0: only at the end and on a stop), got {every!r}")
  if config.dynamic_sampling.enable and r.group_size < 2:
    _fail("rollout.group_size", "dynamic sampling needs groups of at least 2 responses")
  if r.train_batch_size % u.mini_batch_size:
    _fail("actor.mini_batch_size", f"{u.mini_batch_size} does not divide rollout.train_batch_size="
          f"{r.train_batch_size} (both count prompt groups)")
  mini_rows = u.mini_batch_size * r.group_size
  if mini_rows % u.micro_batch_size:
    _fail("actor.micro_batch_size", f"{u.micro_batch_size} rows do not divide a mini-batch of {mini_rows} rows "
          f"(actor.mini_batch_size x rollout.group_size)")
  if mesh is not None:
    data = mesh.shape["data"] * mesh.shape["fsdp"]
    if u.micro_batch_size % data:
      _fail("actor.micro_batch_size", f"{u.micro_batch_size} rows do not divide over the {data} devices of the "
            f"mesh's data axes (data x fsdp); on this mesh use a multiple of {data} that divides a mini-batch of "
            f"{mini_rows} rows, e.g. --config.actor.micro_batch_size={data}")
    prompts = gen_batch_prompts(config)
    if (prompts * r.group_size) % data:
      field = "rollout.gen_batch_size" if config.dynamic_sampling.enable else \
          "rollout.train_batch_size (the generation batch when dynamic sampling is off)"
      _fail(field, f"{prompts} prompts x {r.group_size} responses do not divide over the {data} devices of the "
            f"mesh's data axes")
  if r.get("gen_chunk_size", 0) < 0:
    _fail("rollout.gen_chunk_size", f"must be >= 0, got {r.gen_chunk_size}")
  if mesh is not None and r.get("gen_chunk_size", 0) and (r.gen_chunk_size * r.group_size) % data:
    _fail("rollout.gen_chunk_size", f"{r.gen_chunk_size} prompts x {r.group_size} responses do not divide over "
          f"the {data} devices of the mesh's data axes")
  if not 0.0 <= u.clip_low < 1.0:
    _fail("actor.clip_low", f"must be in [0, 1), got {u.clip_low}")
  if u.clip_high < 0.0:
    _fail("actor.clip_high", f"must be >= 0, got {u.clip_high}")
  if u.clip_c <= 1.0:
    _fail("actor.clip_c", f"the dual-clip constant must be > 1, got {u.clip_c}")
  if u.loss_agg not in AGG_MODES:
    _fail("actor.loss_agg", f"{u.loss_agg!r} is not one of {AGG_MODES}")
  o = config.overlong
  if o.enable and not 0 < o.buffer < r.max_response_length:
    _fail("overlong.buffer", f"{o.buffer} must be positive and smaller than rollout.max_response_length="
          f"{r.max_response_length}")
  if config.reward.name not in rewards.names() and ":" not in config.reward.name:
    _fail("reward.name", f"unknown reward {config.reward.name!r}; registered: {rewards.names()}")
  if config.dynamic_sampling.metric not in METRICS:
    _fail("dynamic_sampling.metric", f"{config.dynamic_sampling.metric!r} is not one of {METRICS}")
  if config.dynamic_sampling.on_exhausted not in ON_EXHAUSTED:
    _fail("dynamic_sampling.on_exhausted", f"{config.dynamic_sampling.on_exhausted!r} is not one of {ON_EXHAUSTED}")
  if not 0.0 < r.top_p <= 1.0:
    _fail("rollout.top_p", f"must be in (0, 1], got {r.top_p}")
  if r.temperature <= 0.0:
    _fail("rollout.temperature", f"must be > 0 for RL sampling, got {r.temperature}")
  if config.eval.every and (config.eval.k <= 0 or config.eval.num_problems <= 0):
    _fail("eval", "k and num_problems must be positive")
  chunk = config.eval.get("chunk_size", 0)
  if not isinstance(chunk, int) or chunk < 0:
    _fail("eval.chunk_size", f"must be a non-negative integer (0: every problem in one call), got {chunk!r}")
  if mesh is not None and chunk and (chunk * config.eval.k) % data:
    _fail("eval.chunk_size", f"{chunk} problems x {config.eval.k} samples do not divide over the {data} devices "
          f"of the mesh's data axes")


def update_config(config) -> UpdateConfig:
  u, r = config.actor, config.rollout
  return UpdateConfig(
      lr=u.lr, warmup_steps=u.warmup_steps, weight_decay=u.weight_decay, grad_clip=u.grad_clip,
      clip_low=u.clip_low, clip_high=u.clip_high, clip_c=u.clip_c, loss_agg=u.loss_agg,
      norm_len=r.max_response_length, temperature=r.temperature,
      num_mini_batches=r.train_batch_size // u.mini_batch_size,
      num_micro_batches=u.mini_batch_size * r.group_size // u.micro_batch_size,
      kl_coef=u.kl_coef, entropy_coef=u.entropy_coef)


# Fields that may change between a run and its resumption without making it another run.
_RESUMABLE = ("allow_different_config", "total_steps", "log", "checkpoint", "eval")


def comparable(config) -> dict:
  """The config as flat JSON, without the fields a resumed run may change."""
  flat = {}

  def walk(prefix, node):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if hasattr(v, "items"):
        walk(key + ".", v)
      else:
        flat[key] = v if isinstance(v, (int, float, str, bool, type(None))) else json.loads(json.dumps(v, default=str))
  walk("", config)
  return {k: v for k, v in flat.items() if k.split(".")[0] not in _RESUMABLE}
