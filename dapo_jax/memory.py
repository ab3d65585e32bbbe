"""A per-device memory estimate for a config, printed at start-up; a config that cannot fit is refused
before anything is compiled.

Counts: parameters, AdamW moments and the float32 gradient accumulator (sharded over fsdp x tensor), and with
a KL term the frozen reference policy's parameters; the
update step's activations for one micro-batch (no rematerialisation: what a layer's backward needs, the
materialised attention scores, the logits); the rollout engine's page pool (every slot's whole token budget,
and the pages of the prompts it holds) and its prefill. Training and sampling do not overlap, so the peak is
the state plus the larger of the two.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dapo_jax import config_lib
from dapo_jax.model.config import ModelConfig

GIB = 2**30


@dataclasses.dataclass
class MemoryEstimate:
  params: float
  optimizer: float
  gradients: float
  activations: float
  kv_cache: float
  device_gib: float
  reference: float = 0.0  # the KL term's frozen reference policy
  sampler_params: float = 0.0  # the off-policy sampler's copies of the weights
  overlap: bool = False  # sampling and training at once on these devices

  @property
  def peak(self) -> float:
    work = self.activations + self.kv_cache if self.overlap else max(self.activations, self.kv_cache)
    return self.params + self.reference + self.optimizer + self.gradients + self.sampler_params + work

  @property
  def fits(self) -> bool:
    return self.peak <= 0.9 * self.device_gib * GIB

  def table(self) -> str:
    rows = [("parameters", self.params), ("reference policy (KL term)", self.reference),
            ("optimizer (AdamW moments)", self.optimizer), ("gradients (float32)", self.gradients),
            ("sampler's weights (off-policy)", self.sampler_params),
            ("activations (one micro-batch)", self.activations), ("KV pages (rollout engine)", self.kv_cache)]
    rows = [(name, value) for name, value in rows if value] + [
        ("peak" + (" (sampling beside training)" if self.overlap else ""), self.peak)]
    out = [f"{name:34s} {value / GIB:9.2f} GiB" for name, value in rows]
    out.append(f"{'device memory':34s} {self.device_gib:9.2f} GiB ({'fits' if self.fits else 'DOES NOT FIT'})")
    return "\n".join(out)


def estimate(cfg: ModelConfig, *, mesh_shape: dict, micro_batch_rows: int, slots: int, prompt_len: int,
             response_len: int, device_gib: float, group_size: int = 1, page_size: int = 16,
             prefill_batch: int = 0, prompt_tokens: int = 0, pages_split: bool = True,
             reference: bool = False, micro_batch_tokens: int = 0) -> MemoryEstimate:
  """The rollout engine (`engine._Run._start`): each slot's generated keys and values for the whole budget
  (split over the data axes with the slots), its prompt pages (`prompt_tokens`, 0: room for 2 x slots / G
  prompts and a prefill batch; per device group that decodes its own slots when `pages_split`, a mesh that
  only splits rows, else on every device), and one prefill's keys, values and logits."""
  data = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  tensor = mesh_shape.get("tensor", 1)
  shards = mesh_shape.get("fsdp", 1) * tensor
  n = cfg.num_params()
  pbytes = jnp.dtype(cfg.param_dtype).itemsize
  cbytes = jnp.dtype(cfg.dtype).itemsize
  params = n * pbytes / shards
  optimizer = 2 * n * pbytes / shards
  gradients = n * 4 / shards
  t = prompt_len + response_len
  # Packed (`micro_batch_tokens` per device group), a micro-batch holds that many tokens in rows of at most
  # the padded width; padded, its rows are split over the data axes.
  rows = micro_batch_tokens / t if micro_batch_tokens else max(micro_batch_rows / data, 1)
  d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  heads = cfg.num_heads / min(tensor, cfg.num_heads)
  block = cfg.attention_chunk if cfg.attention_chunk and t % cfg.attention_chunk == 0 else t
  scores = 2 * heads * block * t * 4  # scores and probabilities in float32, one query block at a time
  per_layer = t * (10 * d + 3 * f / tensor) * cbytes + scores
  logits = 3 * t * cfg.vocab_size / tensor * 4
  if cfg.remat:  # each layer keeps its input; one layer's working set is live while it is recomputed
    layers = l * t * d * cbytes + per_layer
  else:
    layers = l * per_layer
  activations = rows * (layers + logits)
  kv_heads = cfg.num_kv_heads / min(tensor, cfg.num_kv_heads)
  token_bytes = 2 * l * kv_heads * cfg.head_dim * cbytes
  slot_shards = data if slots % data == 0 else 1
  local = max(int(slots / (data if pages_split else 1)), 1)  # the slots whose prompts a device holds
  prefill = prefill_batch or -(-local // group_size)
  width = -(-prompt_len // page_size) * page_size
  prompt_tokens = prompt_tokens or (2 * -(-local // group_size) + prefill) * width
  generated = slots / slot_shards * response_len * token_bytes
  kv_cache = (generated + (prompt_tokens + page_size) * token_bytes
              + prefill * (width * token_bytes + 4 * cfg.vocab_size / tensor))
  return MemoryEstimate(params, optimizer, gradients, activations, kv_cache, device_gib,
                        reference=params if reference else 0.0)


def device_memory_gib(device=None) -> float | None:
  """The memory an accelerator reports it can give JAX (`bytes_limit`), in GiB; None on CPU or when not
  reported."""
  if device is None:
    import jax
    device = jax.local_devices()[0]
  if device.platform == "cpu":
    return None
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001 -- a backend without memory stats: fall back on the config's figure
    return None
  return limit / GIB if limit else None


def device_gib_for(config, device=None) -> float:
  """The smaller of hardware.device_memory_gib and what the device reports: a config written for a 95 GiB
  chip is checked against the 32 GiB chip it runs on."""
  reported = device_memory_gib(device)
  configured = config.hardware.device_memory_gib
  return configured if reported is None else min(configured, reported)


def estimates_for_config(config, model_cfg: ModelConfig, mesh_shape: dict, rollout_mesh_shape: dict | None = None,
                         device_gib: float | None = None) -> dict[str, MemoryEstimate]:
  """Each device group's estimate: {"training devices": ..., "sampling devices": ...} when `rollout_mesh_shape`
  (`mesh.rollout_devices` > 0) gives the sampler devices of its own, else {"all devices": ...}."""
  k = int(config.rollout.get("max_staleness", 0))
  if rollout_mesh_shape is None:
    est = estimate_for_config(config, model_cfg, mesh_shape, device_gib)
    if k:
      est = dataclasses.replace(est, sampler_params=(k + 1) * est.params, overlap=True)
    return {"all devices": est}
  train = estimate_for_config(config, model_cfg, mesh_shape, device_gib)
  sample = estimate_for_config(config, model_cfg, rollout_mesh_shape, device_gib)
  return {"training devices": dataclasses.replace(train, kv_cache=0.0),
          "sampling devices": dataclasses.replace(sample, params=0.0, reference=0.0, optimizer=0.0, gradients=0.0,
                                                  activations=0.0, sampler_params=(k + 1) * sample.params)}


def estimate_for_config(config, model_cfg: ModelConfig, mesh_shape: dict,
                        device_gib: float | None = None) -> MemoryEstimate:
  """A synchronous run on one mesh of `mesh_shape`."""
  r = config.rollout
  engine = config_lib.engine_config(config)
  # Prompt pages split with the slots only where no parameter is split over the data axes
  # (sharding.row_local_axes: each device then decodes its own slots).
  split = mesh_shape.get("fsdp", 1) == 1 and mesh_shape.get("tensor", 1) == 1
  return estimate(model_cfg, mesh_shape=mesh_shape, micro_batch_rows=config.actor.micro_batch_size,
                  slots=engine.slots, prompt_len=config.data.max_prompt_length,
                  response_len=r.max_response_length,
                  device_gib=config.hardware.device_memory_gib if device_gib is None else device_gib,
                  group_size=r.group_size, page_size=engine.page_size, prefill_batch=engine.prefill_batch,
                  prompt_tokens=engine.prompt_tokens, pages_split=split, reference=config.actor.kl_coef > 0,
                  micro_batch_tokens=config_lib.update_config(config).max_tokens_per_micro_batch)
