"""Supervised warm start: next-token cross-entropy on response tokens of (prompt, response) pairs.

The embedded default uses it to turn a random policy into a weak "base model" from imperfect
demonstrations before DAPO; it is the same jitted-step shape as the DAPO update.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dapo_jax import distributed, sharding
from dapo_jax.model.transformer import Transformer
from dapo_jax.sampling import pad_prompts


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
  steps: int = 300
  batch_size: int = 64
  lr: float = 3e-3
  warmup_steps: int = 30
  weight_decay: float = 0.0
  grad_clip: float = 1.0

  def __post_init__(self):
    if self.steps < 0 or self.batch_size <= 0 or self.lr <= 0:
      raise ValueError(f"sft: need steps >= 0, batch_size > 0, lr > 0; got {self}")


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, response_len: int):
  """(prompt_BxP, prompt_mask_BxP, response_BxN, response_mask_BxN): prompts left-padded, responses right."""
  prompt, pmask = pad_prompts(prompts, pad_id)
  resp = np.full((len(responses), response_len), pad_id, np.int32)
  rmask = np.zeros((len(responses), response_len), bool)
  for i, r in enumerate(responses):
    r = list(r)[:response_len]
    resp[i, :len(r)] = r
    rmask[i, :len(r)] = True
  return prompt, pmask, resp, rmask


def _loss(model: Transformer, prompt, pmask, resp, rmask):
  p = prompt.shape[1]
  full = jnp.concatenate([prompt, resp], axis=1)
  mask = jnp.concatenate([pmask, rmask], axis=1)
  logits = model(full, attn_mask_BxT=mask)[:, p - 1:-1]
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), resp[..., None], -1)[..., 0]
  m = rmask.astype(jnp.float32)
  return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def train_sft(model: Transformer, mesh: Mesh, cfg: SFTConfig, batches, *, log_every: int = 0, log=print):
  """Runs `cfg.steps` steps over `batches` (an iterator of `pack(...)` tuples); returns the trained model."""
  graphdef, params = nnx.split(model)
  schedule = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                   optax.adamw(lambda c: jnp.where(c < cfg.warmup_steps, schedule(c), cfg.lr),
                               weight_decay=cfg.weight_decay))
  shardings = sharding.state_shardings(jax.eval_shape(lambda x: x, params), mesh)
  opt = jax.jit(tx.init)(params)

  def step(params, opt, batch):
    loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), *batch))(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  step = jax.jit(step, donate_argnums=(0, 1), out_shardings=(shardings, None, None))
  batch_spec = lambda x: NamedSharding(mesh, sharding.logical_to_spec(("batch", None), x.shape, mesh))  # noqa: E731
  loss = None
  for i in range(cfg.steps):
    batch = tuple(distributed.to_global(x, batch_spec(x)) for x in next(batches))
    params, opt, loss = step(params, opt, batch)
    if log_every and (i + 1) % log_every == 0:
      log(f"sft step {i + 1}/{cfg.steps}: loss {float(loss):.4f}")
  return nnx.merge(graphdef, params), (None if loss is None else float(loss))
