"""Rows packed into token-budget micro-batches for the update, instead of each padded to the whole budget.

A row is its real prompt tokens then its response up to its last loss token (tokens in a gap of the loss
mask stay in the row, unscored, as the padded update reads them); a row with no loss token (overlong-filtered,
or padding) adds nothing to the loss, so it is left out. Rows are packed, best fit in
decreasing length, into buffer rows of `L` tokens (the longest row rounded up to `_ROUND`, at most the padded
width): each packed row is a segment (1, 2, ... in its buffer row; 0 is padding) whose positions restart at 0,
and attention never crosses segments (`transformer.attend_segments`). A micro-batch is `R` buffer rows, `Rb =
budget // L` for each of the `data` device groups it is split over, so no device holds more than
`actor.max_tokens_per_micro_batch` tokens. A mini-batch takes as many micro-batches as its rows need; the
count `K` is rounded up to a power of two (few programs), and the update skips micro-batches with no row.

The update reads the batch as [M, K, R, L]: M mini-batches of K micro-batches. Every per-token field is
stored at the position whose logits score the token (the one before it), so the update needs no shift; the
totals a loss is normalised by (`loss.py`) come per mini-batch from the whole mini-batch, as in the padded
update, so the gradient is the same however the rows were packed.

    plan = Packer(max_tokens=4096, data=2, num_mini_batches=1).plan(prompt_mask_BxP, mask_BxN)
    packed = plan.pack(batch)             # a PackedBatch of host arrays
    logp_BxN = plan.rows(packed_logp)     # back to the padded rows
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, NamedTuple

import numpy as np

_ROUND = 64  # buffer-row lengths are multiples of this (capped at the padded width): few programs


class PackedBatch(NamedTuple):
  """The update's batch, packed; host or device arrays [M, K, R, L] and per-mini-batch totals [M]."""
  tokens_RxL: Any  # int32, the rows' tokens
  segment_RxL: Any  # int32, 1, 2, ... the packed row a token belongs to; 0 padding
  position_RxL: Any  # int32, the token's position in its own row
  target_RxL: Any  # int32, the response token these logits score (0 where none)
  mask_RxL: Any  # float32, the loss mask of that token
  old_logp_RxL: Any  # float32
  adv_RxL: Any  # float32, the row's advantage
  seq_tokens_RxL: Any  # float32, loss tokens in the row (the seq-mean-token-mean mode)
  num_tokens_M: Any  # float32, loss tokens in the mini-batch
  num_seqs_M: Any  # float32, rows with a loss token in the mini-batch
  norm_len_M: Any  # float32, the padded response width (seq-mean-token-sum-norm's default constant)
  ref_logp_RxL: Any = None
  is_weight_RxL: Any = None  # float32, the rollout correction's importance weights

  @property
  def old_logp(self):
    return self.old_logp_RxL

  @property
  def loss_mask(self):
    return self.mask_RxL

  def with_old_logp(self, x) -> "PackedBatch":
    return self._replace(old_logp_RxL=x)

  def with_ref_logp(self, x) -> "PackedBatch":
    return self._replace(ref_logp_RxL=x)


# Fields laid out per token; the rest are per mini-batch.
TOKEN_FIELDS = tuple(f for f in PackedBatch._fields if f.endswith("_RxL"))


@dataclasses.dataclass(frozen=True)
class Packer:
  """Plans the packing of a batch: `max_tokens` per device group and micro-batch, split over `data` groups."""
  max_tokens: int
  data: int = 1
  num_mini_batches: int = 1

  def __post_init__(self):
    if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
      raise ValueError(f"max_tokens_per_micro_batch: must be a positive integer, got {self.max_tokens!r}")
    if self.data <= 0 or self.num_mini_batches <= 0:
      raise ValueError(f"Packer: data={self.data} and num_mini_batches={self.num_mini_batches} must be positive")

  def plan(self, prompt_mask_BxP, mask_BxN) -> "PackPlan":
    prompt_mask_BxP = np.asarray(prompt_mask_BxP) > 0
    mask_BxN = np.asarray(mask_BxN, np.float32)
    b, p = prompt_mask_BxP.shape
    n_width = mask_BxN.shape[1]
    m = self.num_mini_batches
    if b % m:
      raise ValueError(f"update: batch of {b} rows does not split into {m} mini-batches")
    has_BxN = mask_BxN > 0
    plen_B = prompt_mask_BxP.sum(axis=1)
    # Up to the last loss token: the tokens after it are scored by nothing.
    n_B = np.where(has_BxN.any(axis=1), n_width - np.argmax(has_BxN[:, ::-1], axis=1), 0)
    length_B = np.where(n_B > 0, plen_B + n_B, 0)
    longest = int(length_B.max(initial=0))
    if longest > self.max_tokens:
      row = int(np.argmax(length_B))
      raise ValueError(f"actor.max_tokens_per_micro_batch: row {row} holds {longest} tokens ({int(plen_B[row])} of "
                       f"prompt, {int(n_B[row])} of response), more than the {self.max_tokens} a micro-batch may "
                       f"hold on one device group; raise it to at least {longest}")
    width = min(-(-max(longest, 1) // _ROUND) * _ROUND, p + n_width, self.max_tokens)
    per_device = self.max_tokens // width
    r = self.data * per_device
    rows_m = b // m

    # Best fit, longest first (ties in row order): deterministic, and within a few percent of optimal when
    # rows are many and short against the buffer row.
    place = np.zeros((b, 3), np.int64)  # (buffer row index within the mini-batch, offset, segment id)
    bins_m = []
    for mini in range(m):
      rows = np.arange(mini * rows_m, (mini + 1) * rows_m)
      rows = rows[length_B[rows] > 0]
      order = rows[np.argsort(-length_B[rows], kind="stable")]
      free: list[tuple[int, int]] = []  # (tokens left, buffer row), sorted
      used: list[int] = []  # tokens used, by buffer row
      count: list[int] = []
      for row in order:
        ell = int(length_B[row])
        i = bisect.bisect_left(free, (ell, -1))
        if i < len(free):
          _, j = free.pop(i)
        else:
          j = len(used)
          used.append(0)
          count.append(0)
        place[row] = (j, used[j], count[j] + 1)
        used[j] += ell
        count[j] += 1
        if width - used[j] > 0:
          bisect.insort(free, (width - used[j], j))
      bins_m.append(len(used))
    need = max(1, -(-max(bins_m) // r))
    k = 1 << (need - 1).bit_length()
    return PackPlan(shape=(m, k, r, width), length_B=length_B, plen_B=plen_B, n_B=n_B, place_Bx3=place,
                    prompt_width=p, response_width=n_width, mask_BxN=mask_BxN, micro_batches_M=np.asarray(
                        [-(-x // r) for x in bins_m], np.int64))


@dataclasses.dataclass(frozen=True, eq=False)
class PackPlan:
  """Where each row of a batch goes in the packed layout; maps per-token arrays both ways."""
  shape: tuple[int, int, int, int]  # (M, K, R, L)
  length_B: np.ndarray
  plen_B: np.ndarray
  n_B: np.ndarray
  place_Bx3: np.ndarray
  prompt_width: int
  response_width: int
  mask_BxN: np.ndarray
  micro_batches_M: np.ndarray  # micro-batches holding rows, per mini-batch

  def __post_init__(self):
    m, k, r, width = self.shape
    b = self.length_B.shape[0]
    rows_m = b // m
    live = np.flatnonzero(self.length_B > 0)
    mini = live // rows_m
    j = self.place_Bx3[live, 0]
    base = ((mini * k + j // r) * r + j % r) * width + self.place_Bx3[live, 1]
    ell = self.length_B[live]
    # Every token of every live row: where it goes, and which column of [prompt | response] it comes from.
    starts = np.repeat(np.cumsum(ell) - ell, ell)
    within = np.arange(int(ell.sum())) - starts
    plen = np.repeat(self.plen_B[live], ell)
    col = np.where(within < plen, self.prompt_width - plen + within, self.prompt_width + within - plen)
    object.__setattr__(self, "_in_dst", np.repeat(base, ell) + within)
    object.__setattr__(self, "_in_src", np.repeat(live, ell) * (self.prompt_width + self.response_width) + col)
    object.__setattr__(self, "_position", within.astype(np.int32))
    object.__setattr__(self, "_segment", np.repeat(self.place_Bx3[live, 2], ell).astype(np.int32))
    # Each response token j of a row is scored at the position before it: plen - 1 + j.
    n = self.n_B[live]
    j_resp = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    object.__setattr__(self, "_resp_dst", np.repeat(base + self.plen_B[live] - 1, n) + j_resp)
    object.__setattr__(self, "_resp_src", np.repeat(live, n) * self.response_width + j_resp)

  @property
  def tokens(self) -> int:
    """Real tokens packed (prompts and responses up to their last loss token)."""
    return int(self.length_B.sum())

  def token_field(self, x_BxN, dtype=np.float32) -> np.ndarray:
    """A per-response-token array [B, N] in the packed layout [M, K, R, L], at the scoring positions."""
    out = np.zeros(int(np.prod(self.shape)), dtype)
    out[self._resp_dst] = np.asarray(x_BxN).reshape(-1)[self._resp_src]
    return out.reshape(self.shape)

  def rows(self, x_MxKxRxL) -> np.ndarray:
    """The inverse of `token_field`: [B, N], zero where nothing was packed."""
    x = np.asarray(x_MxKxRxL).reshape(-1)
    out = np.zeros(self.length_B.shape[0] * self.response_width, x.dtype)
    out[self._resp_src] = x[self._resp_dst]
    return out.reshape(self.length_B.shape[0], self.response_width)

  def pack(self, batch) -> PackedBatch:
    """A `train_step.Batch` (host arrays, rows prompt-major) packed."""
    size = int(np.prod(self.shape))
    full_BxT = np.concatenate([np.asarray(batch.prompt_BxP, np.int32), np.asarray(batch.tokens_BxN, np.int32)], 1)
    tokens = np.zeros(size, np.int32)
    tokens[self._in_dst] = full_BxT.reshape(-1)[self._in_src]
    segment = np.zeros(size, np.int32)
    segment[self._in_dst] = self._segment
    position = np.zeros(size, np.int32)
    position[self._in_dst] = self._position
    mask_BxN = np.asarray(batch.mask_BxN, np.float32)
    b, n = mask_BxN.shape
    m = self.shape[0]
    seq_tokens_B = mask_BxN.sum(axis=1)
    per_mini = lambda x: x.reshape(m, -1).sum(axis=1).astype(np.float32)  # noqa: E731
    return PackedBatch(
        tokens_RxL=tokens.reshape(self.shape), segment_RxL=segment.reshape(self.shape),
        position_RxL=position.reshape(self.shape),
        target_RxL=self.token_field(batch.tokens_BxN, np.int32), mask_RxL=self.token_field(mask_BxN),
        old_logp_RxL=self.token_field(batch.old_logp_BxN),
        adv_RxL=self.token_field(np.broadcast_to(np.asarray(batch.adv_B, np.float32)[:, None], (b, n))),
        seq_tokens_RxL=self.token_field(np.broadcast_to(seq_tokens_B[:, None], (b, n))),
        num_tokens_M=per_mini(seq_tokens_B), num_seqs_M=per_mini((seq_tokens_B > 0).astype(np.float32)),
        norm_len_M=np.full(m, n, np.float32),
        ref_logp_RxL=None if batch.ref_logp_BxN is None else self.token_field(batch.ref_logp_BxN),
        is_weight_RxL=None if getattr(batch, "is_weight_BxN", None) is None else self.token_field(batch.is_weight_BxN))
