"""Group-relative advantages (GRPO outcome normalisation, as DAPO uses it).

    A_i = (R_i - mean_group(R)) / (std_group(R) + eps)

with the unbiased (N-1) standard deviation and eps 1e-6, as the reference (torch.std). R includes the overlong
penalty. `norm_by_std=False` gives Dr. GRPO (no division). Rows are prompt-major: rows i*G .. i*G+G-1 are
prompt i's group. A group of one has mean 0 and std 1, as the reference defines it.
"""

from __future__ import annotations

import numpy as np


def group_advantages(rewards_B, group_size: int, *, norm_by_std: bool = True, eps: float = 1e-6) -> np.ndarray:
  rewards_B = np.asarray(rewards_B, np.float64)
  if group_size <= 0 or rewards_B.ndim != 1 or rewards_B.shape[0] % group_size:
    raise ValueError(f"group_advantages: {rewards_B.shape[0]} rewards do not form groups of {group_size}")
  r_GxN = rewards_B.reshape(-1, group_size)
  if group_size == 1:
    mean_G, std_G = np.zeros(r_GxN.shape[0]), np.ones(r_GxN.shape[0])
  else:
    mean_G, std_G = r_GxN.mean(axis=1), r_GxN.std(axis=1, ddof=1)
  centred = r_GxN - mean_G[:, None]
  adv = centred / (std_G[:, None] + eps) if norm_by_std else centred
  return adv.reshape(-1).astype(np.float32)
