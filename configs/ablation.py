"""The paper's ablation ladder (DAPO, Table 1) at toy scale on the embedded task, several seeds each.

    python launch/sweep.py --config=configs/ablation.py --workdir=runs/ablation
    python launch/sweep.py --config=configs/ablation.py:smoke --workdir=/tmp/ablation   # 1 step each (CI)

Each rung adds one technique to the one before; the last is the embedded default's DAPO with 4 updates per
rollout batch (the clip range only acts on updates after the first) at half its learning rate. All rungs start
from the same supervised warm start per seed (cached, `sft.cache`), train the same number of steps and are
compared on held-out avg@4 at the end. No rung has a KL term (DAPO drops it; keeping it for the baseline
would need a reference model and change two things at once). "Soft overlong punishment" replaces overlong
filtering, as in the paper's final recipe. Dynamic sampling costs more generation per step; the table
compares at equal training steps, as the paper does.
"""

from configs import default, tiny

SEEDS = (0, 1, 2)

# AIME 2024 avg@32 of Qwen2.5-32B, DAPO paper Table 1.
REFERENCE = {"naive_grpo": 30, "overlong_filtering": 36, "clip_higher": 38, "soft_overlong_punishment": 41,
             "token_level_loss": 42, "dynamic_sampling_dapo": 50}

_RUNGS = (
    ("naive_grpo", {"actor.clip_high": 0.2, "actor.loss_agg": "seq-mean-token-mean",
                    "overlong.enable": False, "overlong.filter": False, "dynamic_sampling.enable": False}),
    ("overlong_filtering", {"overlong.filter": True}),
    ("clip_higher", {"actor.clip_high": 0.28}),
    ("soft_overlong_punishment", {"overlong.filter": False, "overlong.enable": True}),
    ("token_level_loss", {"actor.loss_agg": "token-mean"}),
    ("dynamic_sampling_dapo", {"dynamic_sampling.enable": True}),
)


def get_config(arg=None):
  """arg "smoke": the tiny config's sizes (seconds a run), for CI."""
  c = tiny.get_config() if arg == "smoke" else default.get_config()
  if arg != "smoke":
    c.total_steps = 80
    c.eval.every = 20
  # Several updates per rollout batch, as the paper (16): with one, the policy that sampled is the one updated,
  # every ratio is 1 and the clip range (clip-higher's rung) never acts.
  c.actor.mini_batch_size = c.rollout.train_batch_size // 4
  c.actor.micro_batch_size = min(c.actor.micro_batch_size, c.actor.mini_batch_size * c.rollout.group_size)
  c.actor.lr = c.actor.lr / 2
  c.sft.cache = True
  return c


def rungs():
  """(name, the full set of overrides) for each rung: the changes accumulate down the ladder."""
  settings, out = {}, []
  for name, change in _RUNGS:
    settings = {**settings, **change}
    out.append((name, dict(settings)))
  return out


def sweep(arg=None):
  seeds = SEEDS[:1] if arg == "smoke" else SEEDS
  # Seed-major: a sweep cut short still holds whole ladders.
  return [{"name": name, "seed": seed, **settings} for seed in seeds for name, settings in rungs()]
