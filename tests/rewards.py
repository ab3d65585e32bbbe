"""Rewards the tests' runs load by name (`reward.name = "tests.rewards:parity_reward"`), in this process or a
fresh one: a module of its own, so that loading it sets up nothing else."""


def parity_reward(solution_str, ground_truth, **extra):
  """A deterministic reward that is right about half the time whatever the policy, so that groups disagree
  and dynamic sampling keeps some even for an untrained policy."""
  acc = sum(map(ord, solution_str)) % 2 == 0
  return {"score": 1.0 if acc else -1.0, "acc": acc, "pred": solution_str[-8:]}
