"""DAPO on Qwen2.5-32B, the paper's headline recipe (AIME 2024 avg@32 50; verl's reproduction 52).

    python -m dapo_jax.main --config=configs/dapo_qwen2_5_32b.py --workdir=/mnt/gcs/dapo32b \
        --config.model.hf_path=/path/to/Qwen2.5-32B --config.data.source_dir=/path/to/data

Hyperparameters as the paper and verl's run_dapo_qwen2.5_32b.sh: 512 prompts x 16 responses per step from
generation batches of 1536 prompts, mini-batches of 32 prompts (16 updates per step), lr 1e-6 with 10 warmup
steps, weight decay 0.1, clip 0.2 / 0.28, dual clip 10, token-mean loss, responses up to 20480 tokens with a
4096-token overlong buffer, prompts up to 2048, T = 1.0 and top-p 1.0 for training, no KL; evaluation on the
DAPO AIME 2024 file with 32 samples at top-p 0.7.

Mesh suggestion: a TPU v5p-64 slice (32 chips x 95 GiB): fsdp 8 x tensor 4 (the 40 query / 8 KV heads split
4 ways). Layers are rematerialised, attention runs in 1024-token query blocks and each generation batch is
decoded 8 prompts at a time, which is what makes 22528-token sequences fit (the start-up estimate prints it).
"""

import ml_collections

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.total_steps = 1000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 4
  c.hardware.cpu_devices = 0  # accelerators: the CPU backend is left as JAX makes it
  c.hardware.device_memory_gib = 95.0
  c.data.name = "math"
  c.data.train, c.data.train_split, c.data.eval, c.data.eval_split = "dapo_math17k", "train", "dapo_aime24", "test"
  c.data.dedup = True  # the published parquet repeats each prompt 100 times; False trains on the copies as verl did
  c.data.max_prompt_length = 2048
  c.model.preset = "qwen2.5-32b"
  c.model.overrides = ml_collections.ConfigDict()  # the preset as published
  c.model.hf_path = ""  # set: a Qwen2.5-32B (base) checkpoint directory
  c.model.param_dtype, c.model.dtype = "float32", "bfloat16"
  c.model.remat, c.model.attention_chunk = True, 1024  # as verl's gradient checkpointing; no T^2 scores
  # 256 rows decoding at once, 32 per fsdp group: their 20,480-token budgets fit 95 GiB chips on fsdp 8 x tensor 4.
  c.rollout.engine.slots = 256
  c.sft.steps = 0
  c.rollout.group_size, c.rollout.gen_batch_size, c.rollout.train_batch_size = 16, 1536, 512
  c.rollout.max_response_length = 20480
  c.rollout.temperature, c.rollout.top_p, c.rollout.top_k = 1.0, 1.0, 0
  c.dynamic_sampling.enable, c.dynamic_sampling.metric = True, "acc"
  c.dynamic_sampling.max_num_gen_batches, c.dynamic_sampling.on_exhausted = 10, "raise"
  c.overlong.enable, c.overlong.buffer, c.overlong.factor, c.overlong.filter = True, 4096, 1.0, False
  c.reward.name, c.reward.workers = "math_dapo", 32
  c.actor.lr, c.actor.warmup_steps, c.actor.weight_decay, c.actor.grad_clip = 1e-6, 10, 0.1, 1.0
  c.actor.clip_low, c.actor.clip_high, c.actor.clip_c = 0.2, 0.28, 10.0
  c.actor.loss_agg = "token-mean"
  c.actor.mini_batch_size, c.actor.micro_batch_size = 32, 8
  c.actor.max_tokens_per_micro_batch = 22528  # packed, per fsdp group: the reference's ppo_max_token_len_per_gpu
  c.actor.kl_coef, c.actor.entropy_coef = 0.0, 0.0
  c.eval.every, c.eval.num_problems, c.eval.k, c.eval.temperature, c.eval.top_p = 5, 30, 32, 1.0, 0.7
  c.checkpoint.every, c.checkpoint.keep = 5, 3
  return c
