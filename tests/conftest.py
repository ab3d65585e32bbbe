"""Eight fake CPU devices for every test, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS / tokenizer cache for the session's training runs."""
  return str(tmp_path_factory.mktemp("dapo_cache"))


def scored_batch(acc_rows, tag: int, width: int = 3, group_size: int = 2):
  """A ScoredBatch of len(acc_rows) rows whose prompt and response tokens are all `tag` (`width` of them) and
  whose groups of `group_size` get ids tag * 100, tag * 100 + 1, ..."""
  import numpy as np
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
      has_pred_B=np.ones(n, bool), text_B=objects(f"response {tag}"), truth_B=objects(str(tag)),
      group_B=np.repeat(np.arange(n // group_size, dtype=np.int64) + tag * 100, group_size))
