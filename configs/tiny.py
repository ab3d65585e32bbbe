"""The embedded default shrunk to seconds a step: a few DAPO steps for notebooks and smoke runs of launch/.

    python -m dapo_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
    bash launch/local_multiprocess.sh --config=configs/tiny.py --workdir=/tmp/tiny_mp   # 2 processes x 2 devices
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.total_steps = 3
  # The default's warm start at half the batch (~1 min on 2 cores), cached under data.dir and reused by every
  # tiny run after the first: a weaker start (60 steps) solved nothing, so dynamic sampling kept no group and
  # the run stopped at its first step.
  c.sft.steps, c.sft.batch_size, c.sft.warmup_steps, c.sft.cache = 400, 32, 30, True
  c.rollout.gen_batch_size, c.rollout.train_batch_size = 8, 4
  c.actor.mini_batch_size, c.actor.micro_batch_size = 2, 8  # 2 updates a step, 2 micro-batches each
  c.actor.lr, c.actor.warmup_steps = 1e-3, 0
  c.dynamic_sampling.max_num_gen_batches = 4
  c.eval.every, c.eval.num_problems, c.eval.k = 3, 16, 2
  c.checkpoint.every, c.checkpoint.asynchronous = 1, False
  c.reward.workers = 1
  c.log.progress = False
  return c
