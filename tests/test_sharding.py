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
  # "batch" -> ("data", "fsdp"): the data axis has size 1 here and is left out.
  assert sharding.logical_to_spec(("batch", "length"), (8, 5), mesh) == P("fsdp", None)
  assert sharding.logical_to_spec(("embed", None), (64, 3), mesh) == P("fsdp", None)  # None: replicated
  assert sharding.logical_to_spec(("batch", "length"), None, mesh) == P("fsdp", None)  # no shape: no check
  with pytest.raises(KeyError, match="no rule"):
    sharding.logical_to_spec(("nonsense",), (4,), mesh)


def test_rules_split_one_dimension_over_several_axes_and_never_reuse_an_axis():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)
  # 2 rows: data divides them, data x fsdp (4) does not, so fsdp is dropped and data kept.
  assert sharding.logical_to_spec(("batch", "length"), (2, 5), mesh) == P("data", None)
  assert sharding.logical_to_spec(("batch", "length"), (3, 5), mesh) == P(None, None)
  # Both dimensions ask for fsdp: the first gets it, the second stays replicated.
  rules = [("vocab", "fsdp"), ("embed", "fsdp")]
  assert sharding.logical_to_spec(("vocab", "embed"), (256, 64), mesh, rules) == P("fsdp", None)
  assert sharding.logical_to_spec(("embed", "vocab"), (64, 256), mesh, rules) == P("fsdp", None)
  with sharding.use_rules([("batch", "tensor"), ("length", "data")]):
    assert sharding.logical_to_spec(("batch", "length"), (8, 4), mesh) == P("tensor", "data")
  assert sharding.logical_to_spec(("batch", "length"), (8, 4), mesh) == P(("data", "fsdp"), None)


# The tiny preset with 8 query heads and 4 KV heads (head_dim stays the preset's 16): embedding [256, 64],
# q [64, 8, 16], k/v [64, 4, 16], o [8, 16, 64], q bias [8, 16], k/v bias [4, 16], gate/up [64, 128],
# down [128, 64], norms [64]; lm_head [64, 256] when untied. Expected layouts written out from RULES:
# vocab, q_heads, kv_heads, mlp -> tensor; embed -> fsdp; head_dim, norm -> replicated; an axis of size 1 or
# one that does not divide the dimension is left out.
_FSDP8 = {  # fsdp 8, tensor 1
    "embedding": P(None, "fsdp"), "final_norm.scale": P(None), "lm_head": P("fsdp", None),
    "attn_norm.scale": P(None), "mlp_norm.scale": P(None),
    "attn.q_kernel": P("fsdp", None, None), "attn.k_kernel": P("fsdp", None, None),
    "attn.v_kernel": P("fsdp", None, None), "attn.o_kernel": P(None, None, "fsdp"),
    "attn.q_bias": P(None, None), "attn.k_bias": P(None, None), "attn.v_bias": P(None, None),
    "mlp.gate_kernel": P("fsdp", None), "mlp.up_kernel": P("fsdp", None), "mlp.down_kernel": P(None, "fsdp"),
}
_FSDP_TENSOR = {  # fsdp 2 and tensor 2 or 4: every sharded dimension divides
    "embedding": P("tensor", "fsdp"), "final_norm.scale": P(None), "lm_head": P("fsdp", "tensor"),
    "attn_norm.scale": P(None), "mlp_norm.scale": P(None),
    "attn.q_kernel": P("fsdp", "tensor", None), "attn.k_kernel": P("fsdp", "tensor", None),
    "attn.v_kernel": P("fsdp", "tensor", None), "attn.o_kernel": P("tensor", None, "fsdp"),
    "attn.q_bias": P("tensor", None), "attn.k_bias": P("tensor", None), "attn.v_bias": P("tensor", None),
    "mlp.gate_kernel": P("fsdp", "tensor"), "mlp.up_kernel": P("fsdp", "tensor"),
    "mlp.down_kernel": P("tensor", "fsdp"),
}
_TENSOR8 = {  # tensor 8: 4 KV heads do not split 8 ways, so k/v and their biases are replicated
    "embedding": P("tensor", None), "final_norm.scale": P(None), "lm_head": P(None, "tensor"),
    "attn_norm.scale": P(None), "mlp_norm.scale": P(None),
    "attn.q_kernel": P(None, "tensor", None), "attn.k_kernel": P(None, None, None),
    "attn.v_kernel": P(None, None, None), "attn.o_kernel": P("tensor", None, None),
    "attn.q_bias": P("tensor", None), "attn.k_bias": P(None, None), "attn.v_bias": P(None, None),
    "mlp.gate_kernel": P(None, "tensor"), "mlp.up_kernel": P(None, "tensor"), "mlp.down_kernel": P("tensor", None),
}
_LAYER_PARAMS = ("attn_norm.scale", "mlp_norm.scale", "attn.q_kernel", "attn.k_kernel", "attn.v_kernel",
                 "attn.o_kernel", "attn.q_bias", "attn.k_bias", "attn.v_bias", "mlp.gate_kernel", "mlp.up_kernel",
                 "mlp.down_kernel")


@pytest.mark.parametrize("mesh_shape,tie,table", [
    ({"fsdp": 8}, True, _FSDP8), ({"data": 2, "fsdp": 2, "tensor": 2}, True, _FSDP_TENSOR),
    ({"tensor": 4, "fsdp": 2}, False, _FSDP_TENSOR), ({"tensor": 8}, False, _TENSOR8), ({"fsdp": 8}, False, _FSDP8)])
def test_each_parameter_has_the_sharding_the_rules_give(mesh_shape, tie, table):
  mesh = sharding.make_mesh(mesh_shape)
  cfg = M.preset("tiny", num_heads=8, num_kv_heads=4, tie_word_embeddings=tie)
  model = M.init_sharded(cfg, mesh)
  want = {"embedding": table["embedding"], "final_norm.scale": table["final_norm.scale"]}
  if not tie:
    want["lm_head"] = table["lm_head"]
  for layer in range(cfg.num_layers):
    want.update({f"layers.{layer}.{name}": table[name] for name in _LAYER_PARAMS})
  got = {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
  assert sorted(got) == sorted(want)  # every parameter, and no other
  for name, value in got.items():
    assert value.sharding.mesh == mesh and value.sharding.spec == want[name], (name, value.sharding.spec)
    # Each device holds exactly its slice: the shape divided along the sharded dimensions, nothing more.
    slice_shape = tuple(d // _split_factor(entry, mesh) for d, entry in zip(value.shape, want[name]))
    assert {s.data.shape for s in value.addressable_shards} == {slice_shape}, name
    assert len(value.addressable_shards) == 8, name


def _split_factor(entry, mesh):
  n = 1
  for axis in (entry if isinstance(entry, tuple) else (entry,)):
    if axis is not None:
      n *= mesh.shape[axis]
  return n


@pytest.mark.parametrize("mesh_shape,logits_spec", [
    ({"fsdp": 8}, P("fsdp", None, None)), ({"data": 2, "fsdp": 2, "tensor": 2}, P(("data", "fsdp"), None, "tensor")),
    ({"data": 4, "tensor": 2}, P("data", None, "tensor"))])
def test_sharded_forward_equals_one_device(mesh_shape, logits_spec):
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
  # Logits leave as ("batch", "length", "act_vocab") say: rows over data x fsdp, the vocabulary over tensor.
  assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, logits_spec), 3), out.sharding
  assert batch.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(logits_spec[0], None)), 2)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_sharded_load_equals_one_device_load(tmp_path):
  from dapo_jax.testing import save_tiny_hf_model
  save_tiny_hf_model(tmp_path, "qwen2", tie=False, num_attention_heads=8, num_key_value_heads=4)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  many, _ = M.load_hf(tmp_path, mesh=mesh)
  one, _ = M.load_hf(tmp_path, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
  # The loaded parameters have the layouts of a model created on that mesh (see _FSDP_TENSOR).
  assert many.layers[1].attn.k_kernel.get_value().sharding.spec == P("fsdp", "tensor", None)
  assert many.embedding.get_value().sharding.spec == P("tensor", "fsdp")
  assert many.lm_head.get_value().sharding.spec == P("fsdp", "tensor")
  assert many.layers[0].mlp.down_kernel.get_value().sharding.spec == P("tensor", "fsdp")
  assert many.final_norm.scale.get_value().sharding.spec == P(None)
  flat_many, flat_one = nnx.to_flat_state(nnx.state(many)), nnx.to_flat_state(nnx.state(one))
  assert [p for p, _ in flat_many] == [p for p, _ in flat_one]
  for (path, a), (_, b) in zip(flat_many, flat_one):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
