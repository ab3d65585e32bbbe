"""Builders shared by the tests and notebooks: small random-initialised Hugging Face models saved locally.

Imports torch and transformers lazily: they are test-only dependencies (requirements-test.txt).
"""

from __future__ import annotations

from pathlib import Path

HF_CLASSES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def tiny_hf_model(architecture: str = "qwen2", *, tie: bool = True, seed: int = 0, **overrides):
  """A random transformers causal LM in float32 whose every parameter (biases and norms too) is random."""
  import torch
  import transformers

  config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[architecture])
  kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=256, rms_norm_eps=1e-6)
  if architecture == "llama":
    kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
  elif architecture == "qwen3":
    kw["head_dim"] = 16
  kw.update(overrides)
  torch.manual_seed(seed)
  model = model_cls(config_cls(**kw, attn_implementation="eager")).float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and "norm" in _name_of(model, p) else 0.0))
  return model


def _name_of(model, param) -> str:
  return next(n for n, p in model.named_parameters() if p is param)


def save_tiny_hf_model(path: str | Path, architecture: str = "qwen2", *, tie: bool = True, seed: int = 0,
                       max_shard_size: str | None = None, **overrides):
  """Saves `tiny_hf_model(...)` as safetensors (sharded when `max_shard_size` is given); returns the model."""
  model = tiny_hf_model(architecture, tie=tie, seed=seed, **overrides)
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(str(path), safe_serialization=True, **kwargs)
  return model


def hf_logits(model, tokens, attention_mask=None, position_ids=None):
  """float32 numpy logits of a transformers model."""
  import numpy as np
  import torch

  with torch.no_grad():
    out = model(input_ids=torch.tensor(np.array(tokens), dtype=torch.long),
                attention_mask=None if attention_mask is None else torch.tensor(np.array(attention_mask)),
                position_ids=None if position_ids is None else torch.tensor(np.array(position_ids),
                                                                              dtype=torch.long))
  return out.logits.float().numpy()
