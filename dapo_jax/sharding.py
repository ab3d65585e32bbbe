"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters are born with logical names (`nnx.with_partitioning` in the model). Nothing else in the project
names a mesh axis for a tensor: everything goes through `RULES` (or a table a config passes instead).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    # activations and caches
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
)

_active_rules: contextvars.ContextVar[tuple] = contextvars.ContextVar("dapo_jax_rules", default=RULES)


@contextlib.contextmanager
def use_rules(rules: Iterable[tuple[str, Any]]):
  """Makes `rules` the table used by `constrain` while tracing inside the block."""
  token = _active_rules.set(tuple((k, v) for k, v in rules))
  try:
    yield
  finally:
    _active_rules.reset(token)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh. One axis may be -1: it takes the devices the others leave.

  `make_mesh({"fsdp": -1})` puts every device on fsdp; `make_mesh({"data": 2, "tensor": 4})` on 8 devices.
  """
  shape = dict(shape or {"fsdp": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axis {sorted(unknown)}; axes are {MESH_AXES}")
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {shape}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices do not divide by the fixed axes {shape}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 3)


def split_meshes(train_axes: Mapping[str, int], rollout_axes: Mapping[str, int] | None = None,
                 rollout_devices: int = 0, devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Mesh]:
  """(train mesh, rollout mesh). With `rollout_devices` 0 both are one mesh of every device (`train_axes`);
  otherwise the first rollout_devices / processes local devices of every process sample (a mesh of
  `rollout_axes`) and the rest train, so each process holds its part of both and every transfer between
  them stays within a process."""
  devices = list(devices if devices is not None else jax.devices())
  if not rollout_devices:
    mesh = make_mesh(train_axes, devices)
    return mesh, mesh
  processes = sorted({d.process_index for d in devices})
  local = {p: sorted((d for d in devices if d.process_index == p), key=lambda d: d.id) for p in processes}
  per, rest = divmod(rollout_devices, len(processes))
  fewest = min(len(v) for v in local.values())
  if rest or not 0 < per < fewest:
    raise ValueError(f"mesh.rollout_devices={rollout_devices}: must be a multiple of the {len(processes)} processes "
                     f"that leaves each process at least one of its {fewest} devices to train on")
  rollout = [d for p in processes for d in local[p][:per]]
  train = [d for p in processes for d in local[p][per:]]
  return make_mesh(train_axes, train), make_mesh(rollout_axes or {"data": -1}, rollout)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
                    rules: Iterable[tuple[str, Any]] | None = None) -> P:
  """The PartitionSpec the rules give for a tensor with these logical axis names.

  A mesh axis is dropped for a dimension it does not divide (2 KV heads on a 4-way tensor axis stay
  replicated) and when an earlier dimension already uses it, so every rule table is valid for every model.
  """
  table = dict(rules if rules is not None else _active_rules.get())
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
    target = table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    size = 1
    for axis in axes:
      n = mesh.shape[axis]
      if axis in used or n == 1:
        continue
      if shape is not None and shape[i] % (size * n):
        continue
      kept.append(axis)
      size *= n
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def batch_shards(mesh: Mesh) -> int:
  """How many ways the rules split a batch's rows on this mesh (the data-parallel device groups)."""
  axes = dict(_active_rules.get()).get("batch") or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape], dtype=np.int64))


def state_shardings(state: Any, mesh: Mesh, rules: Iterable[tuple[str, Any]] | None = None) -> Any:
  """NamedShardings for an (abstract) nnx.State, mirroring its tree: one per Variable, from its logical names."""

  def one(v):
    names = v.get_metadata().get("out_sharding") or (None,) * len(v.shape)
    return v.replace(NamedSharding(mesh, logical_to_spec(names, v.shape, mesh, rules)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def named(mesh: Mesh, *names: str | None, shape: Sequence[int] | None = None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op when traced without a mesh (`jax.set_mesh`).
  Inside `shard_map` the manual axes are left out: `x` is already one shard along them."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  manual = set(mesh.manual_axes)
  if math.prod(n for a, n in mesh.shape.items() if a not in manual) == 1:
    return x
  rules = [(k, _without(v, manual)) for k, v in _active_rules.get()] if manual else None
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def _without(target, axes: set[str]):
  kept = tuple(a for a in ((target,) if isinstance(target, str) else tuple(target or ())) if a not in axes)
  return kept or None


def row_local_axes(mesh: Mesh, rows: int, state: Any) -> tuple[str, ...]:
  """The mesh axes of size > 1 when the mesh only splits rows: each such axis shards the batch and none of
  `state`'s arrays, and their product divides `rows`. Otherwise ().

  On such a mesh every device holds whole parameters and its own rows, and work on rows needs no
  communication: the sampler decodes each shard in its own loop (`shard_map`). Meshes that also shard the
  parameters are left to the SPMD partitioner: with two auto axes beside a manual one (data 2 x fsdp 2 x
  tensor 2), jaxlib 0.10.2's partitioner aborts on the decode step's gathers."""
  used = set()
  for leaf in jax.tree.leaves(state):
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    for entry in spec or ():
      used.update((entry,) if isinstance(entry, str) else tuple(entry or ()))
  kept, size = [], 1
  for axis in _without(dict(_active_rules.get()).get("batch"), set()) or ():
    n = mesh.shape.get(axis, 1)
    if n == 1 or axis in used or rows % (size * n):
      continue
    kept.append(axis)
    size *= n
  if any(n > 1 and axis not in kept for axis, n in mesh.shape.items()):
    return ()
  return tuple(kept)
