"""Model configuration: one frozen dataclass for the Qwen2 / Llama 3 / Qwen3 decoder family, presets, and
the translation to and from Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ARCHITECTURES = {
    # model_type -> the transformers class name written into config.json
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas_tpu")


class ConfigError(ValueError):
  """A model config field is missing, malformed or describes something this model does not implement."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Llama 3 frequency-dependent RoPE scaling (rope_type "llama3")."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int

  def __post_init__(self):
    if not self.high_freq_factor > self.low_freq_factor > 0:
      raise ConfigError(f"rope_scaling: need high_freq_factor > low_freq_factor > 0, got {self}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Hyperparameters of a decoder-only transformer.

  `architecture` selects the small differences inside the family: qwen2 has q/k/v biases, qwen3 has
  RMSNorm on q and k per head, llama has neither (and may use Llama 3 RoPE scaling).
  """
  architecture: str = "qwen2"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int = 0  # 0: hidden_size // num_heads
  rope_theta: float = 1_000_000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and logits stay float32
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  # Execution options (not part of config.json): recompute each layer in the backward pass instead of
  # keeping its activations, and attend in query blocks of this many tokens (0: all at once) so attention
  # scores never exist for the whole sequence. Neither changes the numbers.
  remat: bool = False
  attention_chunk: int = 0
  # The kernel of attention without a cache (`transformer.attention_impl`): "auto", "xla", "cudnn" or
  # "pallas_tpu".
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ConfigError(f"architecture={self.architecture!r} is not supported; choose one of {sorted(ARCHITECTURES)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim == 0:
      if self.hidden_size % self.num_heads:
        raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {DTYPES}")
    if self.rope_scaling is not None and self.architecture != "llama":
      raise ConfigError(f"rope_scaling is only implemented for llama, not {self.architecture}")
    if self.attention_chunk < 0:
      raise ConfigError(f"attention_chunk must be >= 0, got {self.attention_chunk}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  @property
  def qkv_bias(self) -> bool:
    return self.architecture == "qwen2"

  @property
  def qk_norm(self) -> bool:
    return self.architecture == "qwen3"

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    d, f, h, k, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
    attn = d * hd * (h + 2 * k) + h * hd * d + (hd * (h + 2 * k) if self.qkv_bias else 0) + (2 * hd if self.qk_norm else 0)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * per_layer + d + head

  # --- Hugging Face config.json -------------------------------------------------------------------------

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
    """Builds a config from a parsed Hugging Face `config.json`; `source` names the file in errors."""

    def need(field):
      if field not in hf:
        raise ConfigError(f"{source}: required field {field!r} is missing")
      return hf[field]

    model_type = need("model_type")
    if model_type not in ARCHITECTURES:
      raise ConfigError(f"{source}: field 'model_type' = {model_type!r} is not supported; "
                        f"supported: {sorted(ARCHITECTURES)}")
    archs = hf.get("architectures") or [ARCHITECTURES[model_type]]
    if list(archs) != [ARCHITECTURES[model_type]]:
      raise ConfigError(f"{source}: field 'architectures' = {archs!r} is not supported for model_type "
                        f"{model_type!r}; expected [{ARCHITECTURES[model_type]!r}]")

    # Fields whose other values change the computation in ways this model does not implement.
    must_be = {"hidden_act": ("silu",), "attention_dropout": (0, 0.0), "use_sliding_window": (False,),
               "mlp_bias": (False,), "pretraining_tp": (1,)}
    if model_type != "qwen2":  # qwen2 always has q/k/v biases; llama/qwen3 with biases also bias o_proj
      must_be["attention_bias"] = (False,)
    for field, allowed in must_be.items():
      if field in hf and hf[field] not in allowed:
        raise ConfigError(f"{source}: field {field!r} = {hf[field]!r} is not supported (supported: {allowed[0]!r})")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
      raise ConfigError(f"{source}: field 'layer_types' = {layer_types!r} is not supported: only full_attention")

    # transformers < 5 writes rope_theta + rope_scaling; >= 5 writes rope_parameters.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    legacy = hf.get("rope_scaling")
    if hf.get("rope_parameters") and isinstance(legacy, dict):
      # transformers reads a scaling type under rope_scaling even beside rope_parameters (YaRN, for one):
      # ignoring it would give other logits than transformers does.
      kind = lambda d: d.get("rope_type", d.get("type", "default"))  # noqa: E731
      if kind(legacy) != kind(rope) or any(rope.get(k, v) != v for k, v in legacy.items()
                                           if k not in ("rope_type", "type")):
        raise ConfigError(f"{source}: field 'rope_scaling' = {legacy!r} disagrees with 'rope_parameters' = "
                          f"{hf['rope_parameters']!r}; write one of them (rope type {kind(legacy)!r} is "
                          f"supported only if it is 'default' or 'llama3')")
    rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = None
    if rope_type == "llama3":
      try:
        scaling = RopeScaling(**{k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                      "original_max_position_embeddings")})
      except KeyError as e:
        raise ConfigError(f"{source}: llama3 rope scaling needs field {e.args[0]!r}") from None
    elif rope_type != "default":
      raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (supported: 'default', 'llama3')")

    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    dtype = dtype if dtype in DTYPES else "float32"
    kwargs = dict(
        architecture=model_type,
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=need("num_attention_heads"),
        num_kv_heads=hf.get("num_key_value_heads") or need("num_attention_heads"),
        head_dim=hf.get("head_dim") or 0,
        rope_theta=rope_theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        param_dtype=dtype,
        dtype=dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )
    kwargs.update(overrides)
    try:
      return cls(**kwargs)
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None

  def to_hf(self) -> dict[str, Any]:
    """The `config.json` that transformers loads into the same model."""
    hf = {
        "architectures": [ARCHITECTURES[self.architecture]],
        "model_type": self.architecture,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": self.param_dtype,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        "use_cache": True,
    }
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope.update(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
    hf["rope_scaling"] = None if self.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"}
    hf["rope_parameters"] = rope
    if self.architecture == "qwen2":
      hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
    else:
      hf.update(attention_bias=False, mlp_bias=False)
    return hf


# --- Presets -----------------------------------------------------------------------------------------------
# Numbers from the published Qwen2.5 config.json files.

def _qwen2_5(**kw) -> ModelConfig:
  return ModelConfig(architecture="qwen2", rope_theta=1_000_000.0, max_position_embeddings=32768,
                     bos_token_id=151643, eos_token_id=151643, **kw)


PRESETS = {
    "tiny": lambda: ModelConfig(architecture="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                                num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=10000.0,
                                tie_word_embeddings=True, max_position_embeddings=2048),
    "qwen2.5-0.5b": lambda: _qwen2_5(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                     num_heads=14, num_kv_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": lambda: _qwen2_5(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                                     num_heads=12, num_kv_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "qwen2.5-7b": lambda: _qwen2_5(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                                   num_heads=28, num_kv_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-6),
    "qwen2.5-32b": lambda: _qwen2_5(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
                                    num_heads=40, num_kv_heads=8, tie_word_embeddings=False, rms_norm_eps=1e-5),
    # The Math model keeps the original 4k context and theta 10k.
    "qwen2.5-math-7b": lambda: ModelConfig(
        architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=4096, bos_token_id=151643, eos_token_id=151643),
}


def preset(name: str, **overrides) -> ModelConfig:
  """A named preset, e.g. `preset("qwen2.5-7b", param_dtype="bfloat16", dtype="bfloat16")`."""
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]().replace(**overrides)
