"""The config -> the strategy objects (each a frozen dataclass that checks its own fields when built), and
the checks that need more than one field or the mesh; all run before anything is built or compiled."""

from __future__ import annotations

import dataclasses
import json

from dapo_jax import rewards
from dapo_jax import sharding
from dapo_jax.dynamic_sampling import DynamicSampling
from dapo_jax.engine import EngineConfig
from dapo_jax.rewards import OverlongShaping
from dapo_jax.sampling import SamplingParams
from dapo_jax.rollout_correction import RolloutCorrection
from dapo_jax.train_step import UpdateConfig


class ConfigValidationError(ValueError):
  pass


def _fail(field: str, message: str):
  raise ConfigValidationError(f"config.{field}: {message}")


def _built(make, fields: dict[str, str] | None = None):
  """`make()`, its ValueError raised as a ConfigValidationError naming the config field: the dataclasses'
  messages start with their own field name, which `fields` maps to the config's."""
  try:
    return make()
  except ValueError as e:
    message = str(e)
    for own, field in (fields or {}).items():
      if message.startswith(own):
        message = field + message[len(own):]
        break
    raise ConfigValidationError(f"config.{message}") from None


_UPDATE_FIELDS = {"lr": "actor.lr", "warmup_steps": "actor.warmup_steps", "weight_decay": "actor.weight_decay",
                  "grad_clip": "actor.grad_clip", "clip_low": "actor.clip_low", "clip_high": "actor.clip_high",
                  "clip_c": "actor.clip_c", "loss_agg": "actor.loss_agg", "kl_coef": "actor.kl_coef",
                  "temperature": "rollout.temperature", "num_mini_batches": "actor.mini_batch_size",
                  "num_micro_batches": "actor.micro_batch_size",
                  "max_tokens_per_micro_batch": "actor.max_tokens_per_micro_batch"}


def mesh_axes(config, part: str = "") -> dict[str, int]:
  """The training mesh's axes (`mesh.data/fsdp/tensor`), or the sampler's (part="rollout": `mesh.rollout`)."""
  node = config.mesh if not part else config.mesh.get(part, None) or {"data": -1}
  return {a: int(node[a]) for a in sharding.MESH_AXES if a in node}


def meshes(config):
  """(train mesh, rollout mesh): one mesh unless `mesh.rollout_devices` gives the sampler devices of its own."""
  try:
    return sharding.split_meshes(mesh_axes(config), mesh_axes(config, "rollout"),
                                 int(config.mesh.get("rollout_devices", 0)))
  except ValueError as e:
    raise ConfigValidationError(f"config.{e}" if str(e).startswith("mesh.") else f"config.mesh: {e}") from None


def dynamic_sampling(config) -> DynamicSampling:
  r = config.rollout
  return _built(lambda: DynamicSampling(**dict(config.dynamic_sampling), train_batch_size=r.train_batch_size,
                                        gen_batch_size=r.gen_batch_size))


def engine_config(config) -> EngineConfig:
  """The rollout engine's slots and pages (`rollout.engine`; a run config written before it existed gets the
  defaults)."""
  fields = dict(config.rollout.get("engine", None) or {})
  known = [f.name for f in dataclasses.fields(EngineConfig)]
  unknown = sorted(set(fields) - set(known))
  if unknown:
    _fail(f"rollout.engine.{unknown[0]}", f"no such field; rollout.engine has {known}")
  return _built(lambda: EngineConfig(**fields))


def gen_batch_prompts(config) -> int:
  """Prompts per generation batch (`DynamicSampling.gen_batch_prompts`)."""
  return dynamic_sampling(config).gen_batch_prompts


def overlong(config) -> OverlongShaping:
  return _built(lambda: OverlongShaping.from_config(config))


def rollout_correction(config) -> RolloutCorrection:
  """`rollout_correction.*` (configs from before it existed: off)."""
  fields = dict(config.get("rollout_correction", {}))
  names = {f: f"rollout_correction.{f}" for f in fields}
  try:
    return _built(lambda: RolloutCorrection(**fields), {"RolloutCorrection.__init__": "rollout_correction", **names})
  except TypeError as e:
    raise ConfigValidationError(f"config.rollout_correction: {e}") from None


def sampling_params(config, tokenizer=None, *, evaluation: bool = False) -> SamplingParams:
  """Training's (rollout.*) or evaluation's (eval.*) sampling; the tokenizer gives the stop and pad ids."""
  r, e = config.rollout, config.eval
  section = e if evaluation else r
  name = "eval" if evaluation else "rollout"
  ids = {"stop_ids": tokenizer.stop_ids, "pad_id": tokenizer.pad_id} if tokenizer is not None else {}
  top_k = 0 if evaluation else r.top_k
  return _built(lambda: SamplingParams(max_new_tokens=r.max_response_length, temperature=section.temperature,
                                       top_p=section.top_p, top_k=top_k, **ids),
                {"SamplingParams.max_new_tokens": "rollout.max_response_length",
                 "SamplingParams.": f"{name}."})


def update_config(config) -> UpdateConfig:
  u, r = config.actor, config.rollout
  return _built(lambda: UpdateConfig(
      lr=u.lr, warmup_steps=u.warmup_steps, weight_decay=u.weight_decay, grad_clip=u.grad_clip,
      clip_low=u.clip_low, clip_high=u.clip_high, clip_c=u.clip_c, loss_agg=u.loss_agg,
      norm_len=r.max_response_length, temperature=r.temperature,
      num_mini_batches=r.train_batch_size // u.mini_batch_size,
      num_micro_batches=u.mini_batch_size * r.group_size // u.micro_batch_size,
      kl_coef=u.kl_coef, entropy_coef=u.entropy_coef,
      max_tokens_per_micro_batch=u.max_tokens_per_micro_batch if packed(config) else 0), _UPDATE_FIELDS)


def packed(config) -> bool:
  """The update packs rows into token-budget micro-batches (`actor.packed`; configs from before it pad)."""
  return bool(config.actor.get("packed", False))


def reward_executor(config) -> rewards.RewardExecutor:
  """The reward's executor (`reward.*`); its workers start on first use."""
  w = config.reward
  return _built(lambda: rewards.RewardExecutor(w.name, workers=w.workers, timeout_s=w.timeout_s,
                                               kill_after_s=w.get("kill_after_s", 5.0)),
                {"RewardExecutor.": "reward."})


def _positive_int(config, field: str, *, zero_ok: bool = False, note: str = ""):
  value = config
  for part in field.split("."):
    value = value.get(part, 0) if zero_ok else value[part]  # optional fields: configs from before they existed
  if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero_ok else 1):
    _fail(field, f"must be a {'non-negative' if zero_ok else 'positive'} integer{note}, got {value!r}")
  return value


def validate(config, mesh=None, rollout_mesh=None) -> None:
  """Builds every strategy (each checks its own fields) and checks what ties fields together or to the meshes
  (the sampler's is the training mesh unless given)."""
  r, u = config.rollout, config.actor
  for field in ("rollout.group_size", "rollout.gen_batch_size", "rollout.train_batch_size",
                "rollout.max_response_length", "actor.mini_batch_size", "actor.micro_batch_size"):
    _positive_int(config, field)
  # 0 steps is a valid run: the warm start and checkpoint 0, to continue from later.
  _positive_int(config, "total_steps", zero_ok=True)
  _positive_int(config, "checkpoint.every", zero_ok=True, note=" (0: only at the end and on a stop)")
  engine_config(config)
  _positive_int(config, "eval.every", zero_ok=True, note=" (0: no evaluation during training)")
  _positive_int(config, "log.samples_per_step", zero_ok=True, note=" (responses written to samples.jsonl)")
  # keep=0 would delete every checkpoint, and the rerun would start over.
  _positive_int(config, "checkpoint.keep", note=" (the newest checkpoints kept)")
  _positive_int(config, "data.max_prompt_length")
  _positive_int(config, "reward.workers", zero_ok=True, note=" (0: score in this process)")
  staleness = _positive_int(config, "rollout.max_staleness", zero_ok=True, note=" (0: synchronous)")
  if staleness and config.reward.workers == 0:
    _fail("reward.workers", "0 scores on the main thread (under its alarm), but with rollout.max_staleness > 0 "
          "responses are scored on the sampler's thread; use --config.reward.workers=1 or more")
  _positive_int(config, "mesh.rollout_devices", zero_ok=True, note=" (0: sample on the training devices)")
  if r.get("partial_rollouts", False) and not (r.get("streaming", False) and config.dynamic_sampling.enable):
    _fail("rollout.partial_rollouts", "continues the groups a streaming step leaves unfinished: it needs "
          "rollout.streaming=True and dynamic_sampling.enable=True")
  if not config.reward.timeout_s > 0:
    _fail("reward.timeout_s", f"must be > 0 seconds (the per-item scoring limit), got {config.reward.timeout_s}")
  if not config.reward.get("kill_after_s", 5.0) > 0:
    _fail("reward.kill_after_s", f"must be > 0 seconds (after the limit, a stuck worker is killed), got "
          f"{config.reward.kill_after_s}, e.g. 5.0")
  ds = dynamic_sampling(config)
  if ds.enable and r.group_size < 2:
    _fail("rollout.group_size", "dynamic sampling needs groups of at least 2 responses")
  if r.train_batch_size % u.mini_batch_size:
    _fail("actor.mini_batch_size", f"{u.mini_batch_size} does not divide rollout.train_batch_size="
          f"{r.train_batch_size} (both count prompt groups)")
  mini_rows = u.mini_batch_size * r.group_size
  if packed(config):
    _positive_int(config, "actor.max_tokens_per_micro_batch", note=" (tokens per micro-batch and device group)")
    longest = config.data.max_prompt_length + r.max_response_length
    if u.max_tokens_per_micro_batch < longest:
      _fail("actor.max_tokens_per_micro_batch", f"{u.max_tokens_per_micro_batch} tokens cannot hold a row of "
            f"data.max_prompt_length + rollout.max_response_length = {longest} tokens; use at least {longest}")
  elif mini_rows % u.micro_batch_size:
    _fail("actor.micro_batch_size", f"{u.micro_batch_size} rows do not divide a mini-batch of {mini_rows} rows "
          f"(actor.mini_batch_size x rollout.group_size)")
  overlong(config)
  rollout_correction(config)
  update_config(config)
  sampling_params(config)
  if r.temperature <= 0.0:
    _fail("rollout.temperature", f"must be > 0 for RL sampling, got {r.temperature}")
  if config.eval.every or config.eval.get("before_train", False):
    sampling_params(config, evaluation=True)
    if config.eval.k <= 0 or config.eval.num_problems <= 0:
      _fail("eval", f"k and num_problems must be positive, got k={config.eval.k}, "
            f"num_problems={config.eval.num_problems}")
  if config.data.name == "math":
    _validate_math_data(config.data)
  if config.reward.name not in rewards.names() and ":" not in config.reward.name:
    _fail("reward.name", f"unknown reward {config.reward.name!r}; registered: {rewards.names()}")
  if mesh is not None:
    _validate_mesh(config, ds, mesh, mesh if rollout_mesh is None else rollout_mesh)


def _validate_math_data(d) -> None:
  from dapo_jax.data.math_datasets import SOURCES  # imports TFDS: only for real data
  for name_field, split_field in (("train", "train_split"), ("eval", "eval_split")):
    name, split = d[name_field], d[split_field]
    if name not in SOURCES:
      _fail(f"data.{name_field}", f"unknown data set {name!r}; known: {sorted(SOURCES)}")
    splits = sorted(SOURCES[name][1])
    if split not in splits:
      _fail(f"data.{split_field}", f"data set {name!r} has no split {split!r}; it has {splits}, e.g. "
            f"--config.data.{split_field}={splits[0]}")


def _validate_mesh(config, ds: DynamicSampling, mesh, rollout_mesh) -> None:
  r, u = config.rollout, config.actor
  data = mesh.shape["data"] * mesh.shape["fsdp"]
  mini_rows = u.mini_batch_size * r.group_size
  if not packed(config) and u.micro_batch_size % data:
    fits = [m for m in range(data, mini_rows + 1, data) if mini_rows % m == 0]
    advice = (f"e.g. --config.actor.micro_batch_size={fits[0]}" if fits else
              f"no micro-batch size does: make actor.mini_batch_size x rollout.group_size a multiple of {data}")
    _fail("actor.micro_batch_size", f"{u.micro_batch_size} rows do not divide over the {data} devices of the "
          f"mesh's data axes (data x fsdp); on this mesh use a multiple of {data} that divides a mini-batch of "
          f"{mini_rows} rows, {advice}")
  if (ds.gen_batch_prompts * r.group_size) % data:
    field = "rollout.gen_batch_size" if ds.enable else \
        "rollout.train_batch_size (the generation batch when dynamic sampling is off)"
    _fail(field, f"{ds.gen_batch_prompts} prompts x {r.group_size} responses do not divide over the {data} "
          f"devices of the mesh's data axes")
  slots = engine_config(config).slots
  data = rollout_mesh.shape["data"] * rollout_mesh.shape["fsdp"]
  if slots % data:
    where = "the rollout mesh's" if rollout_mesh is not mesh else "the mesh's"
    _fail("rollout.engine.slots", f"{slots} decode slots do not divide over the {data} devices of {where} data "
          f"axes; e.g. --config.rollout.engine.slots={-(-slots // data) * data}")


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
