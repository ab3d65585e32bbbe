"""DAPO on Qwen2.5-Math-7B, as verl's recipe/dapo/test_dapo_7b.sh (at the DAPO snapshot 4f80e4) runs it: the 32B
recipe's algorithm and batches (512 prompts x 16 responses from generation batches of 1536, mini-batches of 32:
16 updates per step; lr 1e-6, 10 warmup steps, weight decay 0.1, clip 0.2 / 0.28, token-mean loss, no KL),
with 2048-token responses, a 512-token overlong buffer and 2048-token prompts (the Math model's 4096-token
context); dual clip 10 as there. Where the script differs from the 32B recipe:

* evaluation samples at temperature 1.0, top-p 1.0 (its `val_kwargs`), every 2 steps and before training,
  and checkpoints every 2 steps (`test_freq=2`, `save_freq=2`). Its AIME file holds 30 problems x 32 copies
  sampled once each (`val_kwargs.n=1`): here k = 32 samples of each of the 30 problems;
* it trains on the DAPO-Math-17k parquet as published, each prompt 100 times (`data.dedup=False`).

The script stops after one epoch of that file (`total_epochs=1`); `total_steps` is the 32B recipe's 1000. It
passes `loss_agg_mode` twice, the second time as `True` (a typo: no such mode); this follows the first,
its `loss_agg_mode="token-mean"`.

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
  c.data.dedup = False
  c.data.max_prompt_length = 2048
  c.rollout.max_response_length = 2048
  c.overlong.buffer = 512
  c.eval.temperature, c.eval.top_p = 1.0, 1.0
  c.eval.every, c.eval.before_train = 2, True
  c.checkpoint.every = 2
  c.rollout.engine.slots = 512  # rows decoding at once (32 prompts x 16)
  c.actor.max_tokens_per_micro_batch = 16384  # packed, per fsdp group: four 4,096-token rows
  c.reward.workers = 8
  return c
