"""DAPO on Qwen2.5-0.5B: the paper's algorithm at a size one accelerator host holds, for quick experiments.

    python -m dapo_jax.main --config=configs/dapo_qwen2_5_0_5b.py --workdir=DIR \
        --config.model.hf_path=/path/to/Qwen2.5-0.5B

DAPO-Math-17k is hard for a 0.5B base model (verl issue #953): dynamic sampling may need many generation
batches, so this config trains on what it kept rather than stopping. Mesh suggestion: 8 x H100, fsdp 8.
"""

from configs import dapo_qwen2_5_32b


def get_config(arg=None):
  c = dapo_qwen2_5_32b.get_config(arg)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.hardware.device_memory_gib = 80.0
  c.model.preset = "qwen2.5-0.5b"
  c.data.max_prompt_length = 1024
  c.rollout.max_response_length = 4096
  c.overlong.buffer = 1024
  c.rollout.gen_batch_size, c.rollout.train_batch_size = 192, 64
  c.actor.mini_batch_size, c.actor.micro_batch_size = 16, 8
  c.actor.max_tokens_per_micro_batch = 16384  # packed: about three 5,120-token rows per device
  c.dynamic_sampling.on_exhausted = "train_on_kept"
  c.reward.workers = 8
  return c
