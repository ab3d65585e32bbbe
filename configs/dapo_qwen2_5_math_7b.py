"""DAPO on Qwen2.5-Math-7B (verl's test_dapo_7b recipe: the 32B recipe's algorithm and batch settings, 512 prompts
x 16 responses from generation batches of 1536 with 16 updates per step, but 2048-token responses with a
512-token overlong buffer; prompts up to 2048, filling the Math model's 4096-token context).

    python -m dapo_jax.main --config=configs/dapo_qwen2_5_math_7b.py --workdir=DIR \
        --config.model.hf_path=/path/to/Qwen2.5-Math-7B

Mesh suggestion: 8 x H100 80 GiB on one host, fsdp 8.
"""

from configs import dapo_qwen2_5_32b


def get_config(arg=None):
  c = dapo_qwen2_5_32b.get_config(arg)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.hardware.device_memory_gib = 80.0
  c.model.preset = "qwen2.5-math-7b"
  c.data.max_prompt_length = 2048
  c.rollout.max_response_length = 2048
  c.overlong.buffer = 512
  c.rollout.gen_chunk_size = 32  # prompts (x 16) per sampler call
  c.reward.workers = 8
  return c
