"""Off-policy against synchronous on the embedded default: the learning curves of `rollout.max_staleness`.

    python launch/sweep.py --config=configs/off_policy.py --workdir=runs/off_policy

Two host devices either way. `synchronous` samples and trains on both, one after the other (the default run).
`staleness_1` samples step t + 1's batch on one device with step t's weights while step t trains on the other
(`mesh.rollout_devices=1`), with the token-level importance weights of the rollout correction on the gap
between the sampler's log-probs and the trainer's (`rollout_corr/*` measure it).
"""

from configs import default


def get_config(arg=None):
  return default.get_config(arg)


def sweep(arg=None):
  del arg
  return [{"name": "synchronous"},
          {"name": "staleness_1", "rollout.max_staleness": 1, "mesh.rollout_devices": 1,
           "rollout_correction.rollout_is": "token"}]
