"""Eight fake CPU devices for every test, set before jax is imported anywhere."""

import os
import tempfile

# The tests' programs are tiny and many, so compiling them is most of the suite's time: XLA's cheaper backend
# passes take about a third off it, and one compilation cache, shared by the test processes and the runs they
# start (sweep points, several processes, the CLIs), compiles each program once. The cache's file lock (on with
# a size limit) keeps concurrent writers apart.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", FAST_COMPILE]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dapo_jax_tests_xla_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import default as default_config  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS / tokenizer cache for the session's training runs."""
  return str(tmp_path_factory.mktemp("dapo_cache"))


def scored_batch(acc_rows, tag: int, width: int = 3, group_size: int = 2):
  """A ScoredBatch of len(acc_rows) rows whose prompt and response tokens are all `tag` (`width` of them) and
  whose groups of `group_size` get ids tag * 100, tag * 100 + 1, ..."""
  from dapo_jax.rollout import ScoredBatch
  n = len(acc_rows)
  acc = np.asarray(acc_rows, np.float32)

  def objects(value):
    out = np.empty(n, object)
    out[:] = [value] * n
    return out
  return ScoredBatch(
      prompt_BxP=np.full((n, width), tag, np.int32), prompt_mask_BxP=np.ones((n, width), bool),
      tokens_BxN=np.full((n, width), tag, np.int32), mask_BxN=np.ones((n, width), bool),
      sampler_logp_BxN=np.full((n, width), -1.0, np.float32), old_logp_BxN=np.zeros((n, width), np.float32),
      old_logp_known_B=np.zeros(n, bool), lengths_B=np.full(n, width, np.int32), truncated_B=np.zeros(n, bool),
      score_B=2 * acc - 1, acc_B=acc, penalty_B=np.zeros(n, np.float32), pred_B=objects(str(tag)),
      has_pred_B=np.ones(n, bool), timeout_B=np.zeros(n, bool), text_B=objects(f"response {tag}"), truth_B=objects(str(tag)),
      group_B=np.repeat(np.arange(n // group_size, dtype=np.int64) + tag * 100, group_size),
      version_BxN=np.zeros((n, width), np.int32))


ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data_dir, **changes):
  c = default_config.get_config()
  c.data.dir = data_dir
  c.data.task.num_train, c.data.task.num_test = 400, 40
  c.total_steps = 3
  c.sft.steps, c.sft.batch_size = 40, 32
  c.sft.cache = True  # one warm start for every test run of this model (data_dir is the session's)
  c.model.overrides.num_layers = 2
  c.rollout.group_size, c.rollout.gen_batch_size, c.rollout.train_batch_size = 4, 8, 4
  c.actor.mini_batch_size, c.actor.micro_batch_size = 2, 8
  c.rollout.engine.slots = 32  # a generation batch of 8 prompts x 4
  c.actor.lr = 1e-3
  c.dynamic_sampling.on_exhausted = "train_on_kept"
  c.dynamic_sampling.max_num_gen_batches = 2
  c.eval.num_problems, c.eval.k, c.eval.every = 8, 2, 2
  c.checkpoint.every = 1
  c.reward.workers = 0
  c.reward.name = "tests.rewards:parity_reward"
  c.log.progress = False
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def config_flags(config, workdir) -> list[str]:
  """The command-line flags that give `config` to dapo_jax.main."""
  flags = [f"--workdir={workdir}"]

  def walk(prefix, node):
    for k, v in node.items():
      if hasattr(v, "items"):
        walk(f"{prefix}{k}.", v)
      else:
        flags.append(f"--config.{prefix}{k}={v}")
  walk("", config)
  return flags


def subprocess_env(devices: int | None = None, **extra) -> dict:
  """The environment of a run a test starts: `devices` fake CPU devices, or none set (the run's
  hardware.cpu_devices decides: one device by default, as a user's first try), and the suite's compilation."""
  flags = FAST_COMPILE if devices is None else f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)


def run_main(config, workdir, **popen):
  """`python -m dapo_jax.main` on `config` in a fresh process (one CPU device, as a user's first try)."""
  env = subprocess_env()
  return subprocess.Popen([sys.executable, "-m", "dapo_jax.main", *config_flags(config, workdir)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def final_params(workdir, step):
  """A checkpoint step's parameters as host arrays, whatever topology wrote it."""
  from orbax import checkpoint as ocp
  path = (Path(workdir) / "checkpoints" / str(step) / "state").absolute()
  ckptr = ocp.StandardCheckpointer()
  # Onto this process's first device, whatever topology wrote it (another process count, for one).
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = ckptr.metadata(path).item_metadata.tree
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
  restored = ckptr.restore(path, target)
  return [np.asarray(x) for x in jax.tree.leaves(restored)]
