"""Rewards: the DAPO-Math rule-based reward, a registry for your own, parallel scoring with time limits, and
overlong reward shaping."""

from dapo_jax.rewards import math_dapo
from dapo_jax.rewards.executor import RewardExecutor
from dapo_jax.rewards.overlong import OverlongShaping, overlong_penalty
from dapo_jax.rewards.registry import get, names, register

register("math_dapo")(math_dapo.compute_score)


def _math_verify(solution_str, ground_truth, **extra):
  from dapo_jax.rewards.math_verify_reward import compute_score
  return compute_score(solution_str, ground_truth, **extra)


register("math_verify")(_math_verify)

__all__ = ["OverlongShaping", "RewardExecutor", "get", "math_dapo", "names", "overlong_penalty", "register"]
