"""The policy: a Qwen2 / Llama 3 / Qwen3 decoder in Flax NNX, its presets, sharded creation and HF I/O."""

from dapo_jax.model.config import ConfigError, ModelConfig, RopeScaling, PRESETS, preset
from dapo_jax.model.hf_io import CheckpointError, load_hf, save_hf
from dapo_jax.model.init import abstract_model, init_sharded, model_shardings
from dapo_jax.model.transformer import KVCache, Transformer, default_positions

__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "ModelConfig", "PRESETS", "RopeScaling", "Transformer",
    "abstract_model", "default_positions", "init_sharded", "load_hf", "model_shardings", "preset", "save_hf",
]
