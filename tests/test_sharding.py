"""Parameters land where the rules say, on 8 fake devices, and sharding never changes the numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dapo_jax import model as M
from dapo_jax import sharding


def test_make_mesh_shapes_and_errors():
  assert jax.device_count() == 8
  assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert dict(sharding.make_mesh({"data": 2, "tensor": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.make_mesh(devices=jax.devices()[:1]).size == 1
  with pytest.raises(ValueError, match="need 16 devices"):
    sharding.make_mesh({"data": 4, "tensor": 4})
  with pytest.raises(ValueError, match="unknown axis"):
    sharding.make_mesh({"model": 8})
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh({"data": -1, "fsdp": -1})


def test_rules_drop_axes_that_do_not_divide():
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 8, 16), mesh) == P("fsdp", "tensor", None)
  # 2 KV heads cannot be split 4 ways: replicated rather than an invalid layout.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P("fsdp", None, None)
  assert sharding.logical_to_spec(("batch", "length"), (8, 5), mesh) == P("fsdp", None)
  with pytest.raises(KeyError, match="no rule"):
    sharding.logical_to_spec(("nonsense",), (4,), mesh)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"tensor": 4, "fsdp": 2}])
def test_each_parameter_has_the_sharding_the_rules_give(mesh_shape):
  mesh = sharding.make_mesh(mesh_shape)
  cfg = M.preset("tiny", num_heads=8, num_kv_heads=4)
  model = M.init_sharded(cfg, mesh)
  state = nnx.state(model)
  checked = 0
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata()["out_sharding"]
    want = sharding.logical_to_spec(names, var.shape, mesh)
    got = var.get_value().sharding
    assert got.mesh == mesh and got.spec == want, (path, got.spec, want)
    # Each device holds exactly its slice, nothing more.
    shard_elems = {s.data.size for s in var.get_value().addressable_shards}
    assert shard_elems == {int(np.prod(var.shape)) // _split_factor(want, mesh)}, path
    checked += 1
  assert checked == len(jax.tree.leaves(state))
  if mesh.shape["tensor"] > 1:
    assert state["layers"][0]["attn"]["q_kernel"].get_value().sharding.spec == P("fsdp", "tensor", None) or \
        mesh.shape["fsdp"] == 1


def _split_factor(spec, mesh):
  n = 1
  for entry in spec:
    for axis in (entry if isinstance(entry, tuple) else (entry,)):
      if axis is not None:
        n *= mesh.shape[axis]
  return n


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 4, "tensor": 2}])
def test_sharded_forward_equals_one_device(mesh_shape):
  cfg = M.preset("tiny", num_heads=8, num_kv_heads=4)
  one = M.init_sharded(cfg, sharding.make_mesh(devices=jax.devices()[:1]), seed=7)
  mesh = sharding.make_mesh(mesh_shape)
  many = M.init_sharded(cfg, mesh, seed=7)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 12)).astype(np.int32)
  ref = np.asarray(jax.jit(lambda m, t: m(t))(one, jnp.asarray(tokens)))
  batch = jax.device_put(tokens, sharding.named(mesh, "batch", "length", shape=tokens.shape))
  graphdef, state = nnx.split(many)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, batch)
  assert out.sharding.spec[0] in (("data", "fsdp"), "fsdp", "data")
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_sharded_load_equals_one_device_load(tmp_path):
  from dapo_jax.testing import save_tiny_hf_model
  save_tiny_hf_model(tmp_path, "qwen2", tie=False, num_attention_heads=8, num_key_value_heads=4)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  many, _ = M.load_hf(tmp_path, mesh=mesh)
  one, _ = M.load_hf(tmp_path, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
  k = many.layers[1].attn.k_kernel.get_value()
  assert k.sharding.spec == P("fsdp", "tensor", None)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(many)), nnx.to_flat_state(nnx.state(one))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
