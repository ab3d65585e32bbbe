"""Creating a policy directly sharded on a mesh."""

from __future__ import annotations

from typing import Any, Iterable

import jax
from flax import nnx
from jax.sharding import Mesh

from dapo_jax import sharding
from dapo_jax.model.config import ModelConfig
from dapo_jax.model.transformer import Transformer


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract state) of a model: shapes, dtypes and logical names, no memory."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def model_shardings(cfg: ModelConfig, mesh: Mesh, rules: Iterable[tuple[str, Any]] | None = None):
  graphdef, abs_state = abstract_model(cfg)
  return graphdef, abs_state, sharding.state_shardings(abs_state, mesh, rules)


def init_sharded(cfg: ModelConfig, mesh: Mesh, *, seed: int = 0,
                 rules: Iterable[tuple[str, Any]] | None = None) -> Transformer:
  """A randomly initialised model whose parameters are created on their shards inside one jit:
  no device ever holds an unsharded copy."""
  graphdef, _, shardings = model_shardings(cfg, mesh, rules)

  def init():
    return nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
