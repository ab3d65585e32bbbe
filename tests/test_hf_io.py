"""Hugging Face checkpoints: what we write transformers reads back exactly; bad checkpoints fail loudly."""

import json
import os
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dapo_jax import model as M
from dapo_jax import sharding
from dapo_jax.testing import hf_logits, save_tiny_hf_model

ONE = sharding.make_mesh(devices=jax.devices()[:1])


@pytest.mark.parametrize("arch,tie,shard_bytes", [("qwen2", True, 2**40), ("qwen2", False, 60_000),
                                                 ("llama", False, 2**40), ("qwen3", False, 2**40)])
def test_saved_checkpoint_loads_in_transformers_with_same_logits(tmp_path, arch, tie, shard_bytes):
  import transformers
  cfg = M.preset("tiny", architecture=arch, tie_word_embeddings=tie,
                 rope_scaling=M.RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=64) if arch == "llama" else None)
  model = M.init_sharded(cfg, sharding.make_mesh({"fsdp": 4, "tensor": 2}), seed=1)
  M.save_hf(model, tmp_path, max_shard_bytes=shard_bytes)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").float()
  names = sorted(k for k in hf.state_dict() if not (tie and k == "lm_head.weight"))
  if shard_bytes < 2**40:
    _check_shards(tmp_path, shard_bytes, names, total=4 * cfg.num_params())
  else:
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert sorted(_tensor_sizes(tmp_path / "model.safetensors")) == names
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 70)).astype(np.int32)
  np.testing.assert_allclose(hf_logits(hf, tokens), np.asarray(model(jnp.asarray(tokens))), atol=1e-4, rtol=0)
  again, cfg2 = M.load_hf(tmp_path, mesh=ONE)
  assert cfg2 == cfg
  np.testing.assert_allclose(np.asarray(again(jnp.asarray(tokens))), np.asarray(model(jnp.asarray(tokens))),
                             atol=1e-5, rtol=0)  # one device vs a 4x2 mesh: summation order differs


def _tensor_sizes(file):
  """{tensor name: element count} of a safetensors file."""
  from safetensors import safe_open
  with safe_open(str(file), "np") as f:
    return {k: int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()}


def _check_shards(path, max_bytes, names, total):
  """A sharded float32 export: an index naming every tensor once, files model-i-of-n that are exactly the
  index's, each within max_bytes unless it holds one tensor alone, and total_size the bytes of all tensors."""
  index = json.loads((path / "model.safetensors.index.json").read_text())
  files = sorted(p.name for p in path.glob("model-*.safetensors"))
  n = len(files)
  assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  assert sorted(set(index["weight_map"].values())) == files and sorted(index["weight_map"]) == names
  assert not (path / "model.safetensors").exists()
  assert index["metadata"]["total_size"] == total
  for file in files:
    sizes = _tensor_sizes(path / file)
    assert sorted(sizes) == sorted(k for k, f in index["weight_map"].items() if f == file)
    assert 4 * sum(sizes.values()) <= max_bytes or len(sizes) == 1, (file, sizes)


def test_bfloat16_save(tmp_path):
  from safetensors import safe_open
  model = M.init_sharded(M.preset("tiny"), ONE)
  M.save_hf(model, tmp_path, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  back, _ = M.load_hf(tmp_path, dtype="float32", mesh=ONE)
  # Each weight is its float32 value rounded to the nearest bfloat16, and read back exactly.
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(back))):
    want = np.asarray(jnp.asarray(a.get_value()).astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(b.get_value()), want, err_msg=str(path))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("good")
  save_tiny_hf_model(path, "qwen2", tie=False, max_shard_size="40KB")
  return path


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(M.CheckpointError, match="not a checkpoint directory"):
    M.load_hf(tmp_path / "nope")
  with pytest.raises(M.CheckpointError, match="config.json: missing"):
    M.load_hf(tmp_path)


def test_malformed_config_names_file_and_line(good_checkpoint, tmp_path):
  path = _copy(good_checkpoint, tmp_path / "c")
  (path / "config.json").write_text('{\n  "model_type": "qwen2",\n  oops\n}')
  with pytest.raises(M.CheckpointError, match=r"config.json: not valid JSON \(line 3"):
    M.load_hf(path)


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "gpt2", "field 'model_type' = 'gpt2' is not supported"),
    ("hidden_act", "gelu", "field 'hidden_act' = 'gelu' is not supported"),
    ("use_sliding_window", True, "field 'use_sliding_window'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope type 'yarn'"),
    ("num_attention_heads", 3, "num_heads=3 is not a multiple"),
    # transformers applies a YaRN under rope_scaling even beside rope_parameters: loading it without would
    # give other logits.
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
     r"field 'rope_scaling' = .*'yarn'.* disagrees with 'rope_parameters'"),
])
def test_unsupported_config_field_is_named(good_checkpoint, tmp_path, field, value, match):
  path = _copy(good_checkpoint, tmp_path / "c")
  hf = json.loads((path / "config.json").read_text())
  hf[field] = value
  (path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(M.CheckpointError, match=match) as e:
    M.load_hf(path)
  assert "config.json" in str(e.value)


def test_missing_tensor_is_named(good_checkpoint, tmp_path):
  path = _copy(good_checkpoint, tmp_path / "c")
  index = json.loads((path / "model.safetensors.index.json").read_text())
  del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(M.CheckpointError, match=r"missing 1 tensor\(s\).*model.layers.1.mlp.up_proj.weight"):
    M.load_hf(path)


def test_missing_shard_file_is_named(good_checkpoint, tmp_path):
  path = _copy(good_checkpoint, tmp_path / "c")
  victim = sorted(path.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(M.CheckpointError, match=f"lists shard {victim.name}, which is missing"):
    M.load_hf(path)


def test_wrong_shape_is_named(good_checkpoint, tmp_path):
  path = _copy(good_checkpoint, tmp_path / "c")
  hf = json.loads((path / "config.json").read_text())
  hf["intermediate_size"] = 100
  (path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(M.CheckpointError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \[96, 64\], "
                                              r"but .*config.json implies \[100, 64\]") as e:
    M.load_hf(path)
  assert "model.layers.1.mlp.down_proj.weight has shape [64, 96]" in str(e.value)
  assert "(and 1 more)" in str(e.value)  # 6 mismatched tensors: 5 listed


def test_non_finite_weights_are_refused_naming_the_tensor(good_checkpoint, tmp_path):
  from safetensors.numpy import load_file, save_file
  path = _copy(good_checkpoint, tmp_path / "c")
  index = json.loads((path / "model.safetensors.index.json").read_text())
  name = "model.layers.1.self_attn.k_proj.weight"
  shard = path / index["weight_map"][name]
  tensors = load_file(shard)
  tensors[name] = tensors[name].copy()
  tensors[name][3, 5] = np.nan
  save_file(tensors, shard, metadata={"format": "pt"})
  with pytest.raises(M.CheckpointError, match=rf"{shard.name}: tensor {name} holds 1 non-finite values"):
    M.load_hf(path)


def test_truncated_shard_is_detected(good_checkpoint, tmp_path):
  path = _copy(good_checkpoint, tmp_path / "c")
  victim = sorted(path.glob("model-*.safetensors"))[0]
  data = victim.read_bytes()
  victim.write_bytes(data[: len(data) // 2])
  with pytest.raises(M.CheckpointError, match=victim.name):
    M.load_hf(path)


def test_extra_tensor_is_refused(tmp_path):
  from safetensors.numpy import load_file, save_file
  save_tiny_hf_model(tmp_path, "qwen2", tie=False)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(M.CheckpointError, match="does not use, e.g. \\['model.layers.2.mlp.up_proj.weight'\\]"):
    M.load_hf(tmp_path)


def test_pickle_checkpoint_is_refused_with_conversion_advice(good_checkpoint, tmp_path):
  path = tmp_path / "c"
  path.mkdir()
  shutil.copy(good_checkpoint / "config.json", path / "config.json")
  (path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(M.CheckpointError, match="pickle checkpoint.*safe_serialization=True"):
    M.load_hf(path)


def test_exporting_twice_into_one_directory_leaves_only_the_new_weights(tmp_path):
  """A float32 export past the shard size, then a one-file export, into one directory (and back): each loads
  as itself, in dapo_jax and in transformers, with no stale index or shards left to pick up."""
  import transformers
  cfg = M.preset("tiny", tie_word_embeddings=False)
  old, new = M.init_sharded(cfg, ONE, seed=1), M.init_sharded(cfg, ONE, seed=2)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12)).astype(np.int32)
  for first, second, shard_bytes in ((old, new, (60_000, 2**40)), (new, old, (2**40, 60_000))):
    M.save_hf(first, tmp_path, max_shard_bytes=shard_bytes[0])
    M.save_hf(second, tmp_path, max_shard_bytes=shard_bytes[1])
    want = np.asarray(second(jnp.asarray(tokens)))
    np.testing.assert_allclose(np.asarray(M.load_hf(tmp_path, mesh=ONE)[0](jnp.asarray(tokens))), want, atol=1e-5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").float()
    np.testing.assert_allclose(hf_logits(hf, tokens), want, atol=1e-4)
  # The last export is the sharded one: its files and index alone, no single file.
  _check_shards(tmp_path, 60_000, sorted(hf.state_dict()), total=4 * cfg.num_params())
  umask = os.umask(0)
  os.umask(umask)
  assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("*.safetensors")} == {0o666 & ~umask}
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["config.json", "model.safetensors.index.json", *(p.name for p in tmp_path.glob("model-*.safetensors"))])


def test_a_directory_with_both_weight_layouts_is_refused(good_checkpoint, tmp_path):
  path = _copy(good_checkpoint, tmp_path / "c")
  M.save_hf(M.init_sharded(M.load_hf(path, mesh=ONE)[1], ONE), tmp_path / "other")
  shutil.copy(tmp_path / "other" / "model.safetensors", path / "model.safetensors")
  with pytest.raises(M.CheckpointError, match=r"holds both model.safetensors and model.safetensors.index.json "
                                              r".*model.safetensors is the newer"):
    M.load_hf(path)


def test_a_tensor_missing_from_the_shard_the_index_names_is_named(good_checkpoint, tmp_path):
  path = _copy(good_checkpoint, tmp_path / "c")
  index = json.loads((path / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  name = next(n for n, f in index["weight_map"].items() if f == shards[0])
  index["weight_map"][name] = shards[1]
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(M.CheckpointError, match=f"{shards[1]}: has no tensor {name}, which "
                                              f"model.safetensors.index.json places there"):
    M.load_hf(path)


def test_home_directory_paths_are_expanded(good_checkpoint, monkeypatch):
  monkeypatch.setenv("HOME", str(good_checkpoint.parent))
  home, cfg = M.load_hf(f"~/{good_checkpoint.name}", mesh=ONE)
  direct, direct_cfg = M.load_hf(good_checkpoint, mesh=ONE)
  assert cfg == direct_cfg
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(home)), nnx.to_flat_state(nnx.state(direct))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
