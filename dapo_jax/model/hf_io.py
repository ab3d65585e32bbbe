"""Hugging Face checkpoints in and out: `config.json` plus safetensors (one file or an indexed set of shards).

Loading places every tensor straight onto its target sharding: each device's shard is read from the file
as a slice (`safe_open(...).get_slice`), so no host ever holds a whole 32B model. Only safetensors are read:
a pickle `.bin` checkpoint can execute code when loaded and is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dapo_jax import sharding
from dapo_jax.model.config import ConfigError, ModelConfig
from dapo_jax.model.init import model_shardings
from dapo_jax.model.transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


class CheckpointError(ValueError):
  """A checkpoint is missing, partial, malformed or does not match its config."""


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Our tensor = transpose(reshape(hf_tensor, flatten(splits)), perm). `splits[d]` is how HF dimension d
  splits into ours, e.g. q_proj's [H*hd, D] is ((H, hd), (D,))."""
  hf_name: str
  splits: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(s) for s in self.splits)

  def to_ours(self, hf: np.ndarray) -> np.ndarray:
    return hf.reshape([n for s in self.splits for n in s]).transpose(self.perm)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    return ours.transpose(np.argsort(self.perm)).reshape(self.hf_shape)

  def read(self, tensor_slice, index: tuple[slice, ...]) -> np.ndarray:
    """Reads only what our shard `index` needs from a lazy safetensors slice."""
    flat = [n for s in self.splits for n in s]
    r_index = [slice(None)] * len(flat)
    for ours_dim, r_dim in enumerate(self.perm):
      r_index[r_dim] = index[ours_dim]
    hf_index, post, r = [], [], 0
    for sizes in self.splits:
      subs = [r_index[r + j].indices(sizes[j]) for j in range(len(sizes))]
      r += len(sizes)
      rest = math.prod(sizes[1:])
      if all(s[2] == 1 for s in subs) and all(s[:2] == (0, sizes[j + 1]) for j, s in enumerate(subs[1:])):
        # Only the leading sub-dimension is cut: a contiguous range of the HF dimension.
        hf_index.append(slice(subs[0][0] * rest, subs[0][1] * rest))
        post.extend([slice(None)] * len(sizes))
      else:
        hf_index.append(slice(None))
        post.extend(slice(*s) for s in subs)
    block = tensor_slice[tuple(hf_index)]
    shape = []
    for sizes, hs in zip(self.splits, hf_index):
      lead = (hs.indices(math.prod(sizes))[1] - hs.indices(math.prod(sizes))[0]) // math.prod(sizes[1:])
      shape.extend([lead, *sizes[1:]])
    return block.reshape(shape)[tuple(post)].transpose(self.perm)


def _layouts(cfg: ModelConfig) -> dict[tuple, _Layout]:
  """Our state path -> HF tensor name and layout."""
  d, f, h, k, hd, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.vocab_size)
  out = {("embedding",): _Layout("model.embed_tokens.weight", ((v,), (d,)), (0, 1)),
         ("final_norm", "scale"): _Layout("model.norm.weight", ((d,),), (0,))}
  if not cfg.tie_word_embeddings:
    out[("lm_head",)] = _Layout("lm_head.weight", ((v,), (d,)), (1, 0))
  for i in range(cfg.num_layers):
    p, a = f"model.layers.{i}.", ("layers", i, "attn")
    out[("layers", i, "attn_norm", "scale")] = _Layout(p + "input_layernorm.weight", ((d,),), (0,))
    out[("layers", i, "mlp_norm", "scale")] = _Layout(p + "post_attention_layernorm.weight", ((d,),), (0,))
    out[a + ("q_kernel",)] = _Layout(p + "self_attn.q_proj.weight", ((h, hd), (d,)), (2, 0, 1))
    out[a + ("k_kernel",)] = _Layout(p + "self_attn.k_proj.weight", ((k, hd), (d,)), (2, 0, 1))
    out[a + ("v_kernel",)] = _Layout(p + "self_attn.v_proj.weight", ((k, hd), (d,)), (2, 0, 1))
    out[a + ("o_kernel",)] = _Layout(p + "self_attn.o_proj.weight", ((d,), (h, hd)), (1, 2, 0))
    if cfg.qkv_bias:
      out[a + ("q_bias",)] = _Layout(p + "self_attn.q_proj.bias", ((h, hd),), (0, 1))
      out[a + ("k_bias",)] = _Layout(p + "self_attn.k_proj.bias", ((k, hd),), (0, 1))
      out[a + ("v_bias",)] = _Layout(p + "self_attn.v_proj.bias", ((k, hd),), (0, 1))
    if cfg.qk_norm:
      out[a + ("q_norm", "scale")] = _Layout(p + "self_attn.q_norm.weight", ((hd,),), (0,))
      out[a + ("k_norm", "scale")] = _Layout(p + "self_attn.k_norm.weight", ((hd,),), (0,))
    m = ("layers", i, "mlp")
    out[m + ("gate_kernel",)] = _Layout(p + "mlp.gate_proj.weight", ((f,), (d,)), (1, 0))
    out[m + ("up_kernel",)] = _Layout(p + "mlp.up_proj.weight", ((f,), (d,)), (1, 0))
    out[m + ("down_kernel",)] = _Layout(p + "mlp.down_proj.weight", ((d,), (f,)), (1, 0))
  return out


def read_hf_config(path: str | os.PathLike) -> tuple[dict, Path]:
  path = Path(path).expanduser()
  file = path / "config.json"
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a checkpoint directory")
  if not file.is_file():
    raise CheckpointError(f"{file}: missing; a Hugging Face checkpoint directory needs config.json")
  try:
    return json.loads(file.read_text()), file
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None


def _weight_map(path: Path) -> dict[str, Path]:
  """Tensor name -> the safetensors file that holds it."""
  index, single = path / INDEX_FILE, path / SINGLE_FILE
  if index.is_file() and single.is_file():
    # Loaders disagree on which wins (transformers takes the single file, vLLM the index): two exports in one
    # directory, and whichever we picked, something else would read the other weights.
    newer = max((index, single), key=lambda f: f.stat().st_mtime).name
    raise CheckpointError(f"{path}: holds both {SINGLE_FILE} and {INDEX_FILE} (two exports into one directory? "
                          f"{newer} is the newer); loaders differ on which to read, so delete the stale one")
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index (need a 'weight_map' object): {e}") from None
    files = {name: path / file for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
      if not file.is_file():
        raise CheckpointError(f"{index}: lists shard {file.name}, which is missing from {path}")
    return files
  if single.is_file():
    with _open(single) as f:
      return {name: single for name in f.keys()}
  pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
  if pickles:
    raise CheckpointError(
        f"{path}: holds only pickle checkpoint(s) {pickles}; dapo_jax reads safetensors only, because "
        f"unpickling a downloaded file can run arbitrary code. Convert once, in an environment you trust: "
        f"python -c \"from transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors', safe_serialization=True)\"")
  raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def _open(file: Path):
  try:
    return safe_open(str(file), framework="numpy")
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_hf(path: str | os.PathLike, *, dtype: str = "float32", compute_dtype: str | None = None,
            mesh: Mesh | None = None, rules: Iterable[tuple[str, Any]] | None = None, **options,
            ) -> tuple[Transformer, ModelConfig]:
  """Loads a Hugging Face Qwen2 / Llama / Qwen3 checkpoint directory into a sharded model.

  Parameters are stored in `dtype`; matmuls run in `compute_dtype` (default: `dtype`). With no mesh,
  every device goes on the fsdp axis. `options` are execution options of ModelConfig (remat,
  attention_chunk).
  """
  path = Path(path).expanduser()
  hf_cfg, cfg_file = read_hf_config(path)
  try:
    cfg = ModelConfig.from_hf(hf_cfg, source=str(cfg_file), param_dtype=dtype, dtype=compute_dtype or dtype,
                              **options)
  except ConfigError as e:
    raise CheckpointError(str(e)) from None
  mesh = mesh if mesh is not None else sharding.make_mesh()
  graphdef, abs_state, shardings = model_shardings(cfg, mesh, rules)
  layouts = _layouts(cfg)
  files = _weight_map(path)

  expected = {lay.hf_name for lay in layouts.values()}
  present = set(files)
  if cfg.tie_word_embeddings:
    present.discard("lm_head.weight")  # some exporters write the tied copy too
  missing = sorted(expected - present)
  if missing:
    raise CheckpointError(f"{path}: checkpoint is missing {len(missing)} tensor(s) the config needs, "
                          f"e.g. {missing[:5]}")
  unexpected = sorted(n for n in present - expected if not n.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise CheckpointError(f"{path}: checkpoint has tensor(s) this {cfg.architecture} config does not use, "
                          f"e.g. {unexpected[:5]}; does config.json match the weights?")

  flat_shardings = dict(nnx.to_flat_state(shardings))
  loaded = []
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(_open(f)) for f in sorted(set(files[n] for n in expected))}
    held = {f: set(h.keys()) for f, h in handles.items()}
    # Check every tensor before allocating anything, and report all mismatches at once.
    problems = []
    for path_parts, var in nnx.to_flat_state(abs_state):
      lay = layouts[path_parts]
      if lay.hf_name not in held[files[lay.hf_name]]:
        problems.append(f"{files[lay.hf_name]}: has no tensor {lay.hf_name}, which {INDEX_FILE} places there")
        continue
      tensor = handles[files[lay.hf_name]].get_slice(lay.hf_name)
      shape, hf_dtype = tuple(tensor.get_shape()), tensor.get_dtype()
      if shape != lay.hf_shape:
        problems.append(f"{files[lay.hf_name]}: tensor {lay.hf_name} has shape {list(shape)}, but {cfg_file} "
                        f"implies {list(lay.hf_shape)}")
      elif hf_dtype not in _NP_DTYPES:
        problems.append(f"{files[lay.hf_name]}: tensor {lay.hf_name} has dtype {hf_dtype}; "
                        f"supported: {sorted(_NP_DTYPES)}")
    if problems:
      more = f"\n(and {len(problems) - 5} more)" if len(problems) > 5 else ""
      raise CheckpointError("\n".join(problems[:5]) + more)

    for path_parts, var in nnx.to_flat_state(abs_state):
      lay = layouts[path_parts]
      file = files[lay.hf_name]
      tensor = handles[file].get_slice(lay.hf_name)
      cache: dict[Any, np.ndarray] = {}

      def read(index, lay=lay, tensor=tensor, target=np.dtype(var.dtype), cache=cache, file=file,
               shape=var.shape):
        # Devices holding the same shard (replication) read it once.
        key = tuple(s.indices(n) for s, n in zip(index, shape))
        if key not in cache:
          try:
            part = np.ascontiguousarray(lay.read(tensor, tuple(index)).astype(target))
          except SafetensorError as e:
            raise CheckpointError(f"{file}: reading {lay.hf_name} failed (truncated file?): {e}") from None
          bad = int(np.size(part) - np.count_nonzero(np.isfinite(part)))
          if bad:
            raise CheckpointError(f"{file}: tensor {lay.hf_name} holds {bad} non-finite values (NaN or inf) in "
                                  f"its slice {list(key)}; a checkpoint saved from a diverged run?")
          cache[key] = part
        return cache[key]

      value = jax.make_array_from_callback(var.shape, flat_shardings[path_parts].get_value(), read)
      loaded.append((path_parts, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded)), cfg


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def save_hf(model: Transformer, path: str | os.PathLike, *, dtype: str | None = None,
            max_shard_bytes: int = 5 * 2**30) -> Path:
  """Writes `config.json` and safetensors (sharded with an index past `max_shard_bytes`) that
  transformers' `AutoModelForCausalLM.from_pretrained` loads into the same model.

  Every process must call it (parameters are gathered collectively); process 0 writes.
  """
  cfg: ModelConfig = model.cfg
  dtype = dtype or cfg.param_dtype
  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  path = Path(path)
  writer = jax.process_index() == 0
  if writer:
    path.mkdir(parents=True, exist_ok=True)
  layouts = _layouts(cfg)
  variables = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))

  shards: list[list] = [[]]
  size = 0
  for parts, var in variables:
    nbytes = math.prod(var.shape) * np_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((parts, var))
    size += nbytes
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  if writer:
    # A directory exported to before keeps none of that export's weight files: a stale index or single file
    # beside the new one would make loaders pick different weights.
    stale = [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]
    for f in stale:
      if f.name not in names and f.is_file():
        f.unlink()
  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    tensors = {}
    for parts, var in shard:
      lay = layouts[parts]
      tensors[lay.hf_name] = np.ascontiguousarray(lay.to_hf(_to_host(var[...])).astype(np_dtype))
      weight_map[lay.hf_name] = name
      total += tensors[lay.hf_name].nbytes
    if writer:
      save_file(tensors, str(path / name), metadata={"format": "pt"})
      # safetensors writes 0600; an export is for others too (a shared vLLM server), as the umask allows.
      os.chmod(path / name, 0o666 & ~_umask())
  if writer:
    if len(shards) > 1:
      (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    hf = cfg.to_hf()
    hf["torch_dtype"] = dtype
    (path / "config.json").write_text(json.dumps(hf, indent=2))
  return path
