"""From prompts to a scored batch: sample G responses per prompt with the rollout engine (`engine.py`), decode
them, score them through the reward executor and shape their rewards for length. Training and evaluation
both go through `Rollouts`; training streams (`Rollouts.stream`) so that dynamic sampling sees groups as they
finish.

    rollouts = Rollouts(tokenizer, executor, params, num_samples=8, overlong=overlong)
    batch = rollouts(model, rows, rng)          # a ScoredBatch, rows prompt-major
    batch.reward_B                              # score + overlong penalty

`ScoredBatch` is the one structure between the sampler and the update: dynamic sampling keeps or drops its
groups, and the update's `Batch` is made from it (`train.py`).
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from dapo_jax import distributed
from dapo_jax.rewards import OverlongShaping, RewardExecutor
from dapo_jax.engine import Engine, EngineConfig, EngineStats, GroupResult, Request, Unfinished
from dapo_jax.sampling import SamplingParams
from dapo_jax.tokenizer import Tokenizer

# Prompts are left-padded (their last token is next to the response), responses right-padded.
_LEFT_PADDED = ("prompt_BxP", "prompt_mask_BxP")


def _concat_fields(cls, parts):
  """`cls(...)` of the parts' fields concatenated by rows, 2-D fields padded with zeros to the widest (on the
  left for prompts)."""
  out = {}
  for key in cls._fields:
    arrays = [np.asarray(getattr(p, key)) for p in parts]
    if arrays[0].ndim == 2:
      width = max(a.shape[1] for a in arrays)
      arrays = [np.pad(a, [(0, 0), (width - a.shape[1], 0) if key in _LEFT_PADDED else (0, width - a.shape[1])])
                for a in arrays]
    out[key] = np.concatenate(arrays, axis=0)
  return cls(**out)


def _objects(values: list) -> np.ndarray:
  """A 1-D object array of `values` (np.asarray would make a 2-D array of equal-length lists)."""
  out = np.empty(len(values), object)
  out[:] = values
  return out


class ScoredBatch(NamedTuple):
  """Sampled and scored rows, prompt-major (rows i*G .. i*G+G-1 share group_B[i*G]), on host.

  `sampler_logp_BxN` are the sampler's log-probs of its tokens. `old_logp_BxN` are the behaviour log-probs
  the update's clip is centred on where they are already known (`old_logp_known_B`): groups that dynamic
  sampling carries into a later step get theirs under the weights that sampled them; the others are computed
  before the update."""
  prompt_BxP: np.ndarray  # int32, left-padded
  prompt_mask_BxP: np.ndarray  # bool
  tokens_BxN: np.ndarray  # int32, pad after the stop token
  mask_BxN: np.ndarray  # bool, the response's tokens (the stop token included)
  sampler_logp_BxN: np.ndarray  # float32
  old_logp_BxN: np.ndarray  # float32, valid where old_logp_known_B
  old_logp_known_B: np.ndarray  # bool
  lengths_B: np.ndarray  # int32, tokens in the response
  truncated_B: np.ndarray  # bool, hit the token budget without a stop token
  score_B: np.ndarray  # float32, the reward function's score
  acc_B: np.ndarray  # float32, 1.0 right / 0.0 wrong
  penalty_B: np.ndarray  # float32, overlong penalty (<= 0)
  pred_B: np.ndarray  # object (str): the answer the reward extracted, "" when it gives none
  has_pred_B: np.ndarray  # bool: the reward gave a prediction (majority votes need one)
  timeout_B: np.ndarray  # bool: scoring hit the reward's time limit (scored as wrong, counted)
  text_B: np.ndarray  # object (str): the decoded response
  truth_B: np.ndarray  # object: the ground truth
  group_B: np.ndarray  # int64, the prompt group's id (unique within a run)
  version_BxN: np.ndarray  # int32, the weights that sampled each token: their number of updates (-1: none)

  @property
  def num_rows(self) -> int:
    return int(self.acc_B.shape[0])

  @property
  def reward_B(self) -> np.ndarray:
    """The sequence reward advantages are computed from: score plus overlong penalty."""
    return (self.score_B + self.penalty_B).astype(np.float32)

  @property
  def prompt_len_B(self) -> np.ndarray:
    return self.prompt_mask_BxP.sum(axis=1)

  def rows(self, index) -> "ScoredBatch":
    return ScoredBatch(*(np.asarray(x)[index] for x in self))

  def replace(self, **fields) -> "ScoredBatch":
    n = self.num_rows
    for key, value in fields.items():
      if key not in self._fields or len(value) != n:
        raise ValueError(f"ScoredBatch.replace: {key!r} must be a field given for all {n} rows")
    return self._replace(**{k: np.asarray(v) for k, v in fields.items()})

  @classmethod
  def concat(cls, batches: Sequence["ScoredBatch"]) -> "ScoredBatch":
    """Rows of several batches, prompts padded on the left and responses on the right to the widest."""
    if not batches:
      raise ValueError("ScoredBatch.concat: no batches")
    return _concat_fields(cls, batches)

  def to_record(self) -> dict[str, np.ndarray]:
    """The fields by name, for a checkpoint's record (`from_record` reads it back exactly)."""
    return {k: np.asarray(v) for k, v in self._asdict().items()}

  @classmethod
  def from_record(cls, record: dict[str, Any]) -> "ScoredBatch":
    """A batch from `to_record`'s dict, or from a checkpoint written before some fields existed: unknown
    old log-probs (recomputed with the weights that sampled them, as before), no predictions, group ids
    from the row order."""
    n = len(record["tokens_BxN"])
    defaults = {"old_logp_BxN": lambda: np.zeros(np.shape(record["tokens_BxN"]), np.float32),
                "old_logp_known_B": lambda: np.zeros(n, bool),
                "pred_B": lambda: np.full(n, "", object), "has_pred_B": lambda: np.zeros(n, bool),
                "timeout_B": lambda: np.zeros(n, bool),
                "group_B": lambda: np.arange(n, dtype=np.int64), "version_BxN": lambda: np.full(np.shape(record["tokens_BxN"]), -1, np.int32)}
    missing = [k for k in cls._fields if k not in record and k not in defaults]
    if missing:
      raise ValueError(f"carried batch in the checkpoint record lacks the fields {missing}")
    return cls(**{k: np.asarray(record[k]) if k in record else defaults[k]() for k in cls._fields})


def score_shared(executor: RewardExecutor, texts: list[str], truths: list) -> list[dict]:
  """Each process scores its block of the responses; every process gets all the results, in order."""
  block = distributed.share(len(texts))
  return distributed.gather_list(executor.score(texts[block], truths[block]))


class Rollouts:
  """Samples `num_samples` responses to each task row's prompt with the rollout engine and scores them into
  a `ScoredBatch`.

  `engine`: the engine's slots and pages (`engine.EngineConfig`; they bound the KV cache). `overlong`: the
  soft length penalty (None: no penalty). Every process passes the same rows and gets the same batch; each
  scores its block of the responses. Group i of a call (group id first_group + i) samples with
  fold_in(rng, first_group + i): its responses do not depend on the other rows, the slots or the order."""

  def __init__(self, tokenizer: Tokenizer, executor: RewardExecutor, params: SamplingParams, *,
               num_samples: int, engine: EngineConfig = EngineConfig(), overlong: OverlongShaping | None = None):
    if num_samples <= 0:
      raise ValueError(f"Rollouts: num_samples must be positive, got {num_samples}")
    self.tokenizer, self.executor, self.params = tokenizer, executor, params
    self.num_samples, self.overlong = num_samples, overlong
    self.engine = Engine(params, engine)
    self.unfinished: list[PartialGroup] = []  # what the last stream left (see `stream`)

  def __call__(self, model, rows: list[dict], rng, *, first_group: int = 0, timings: dict | None = None,
               version: int = 0) -> ScoredBatch:
    """`rows` carry `prompt_ids` and `answer`; their groups get ids first_group, first_group + 1, ... The
    batch is in the rows' order; `version` is the weights' (`ScoredBatch.version_BxN`)."""
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    requests = [Request(r["prompt_ids"], self.num_samples, first_group + i, tag=r) for i, r in enumerate(rows)]
    done = {res.request.key_id: res for res in self.engine.stream(model, requests, rng)}
    results = [done[first_group + i] for i in range(len(rows))]
    timings["timing_s/gen"] = timings.get("timing_s/gen", 0.0) + time.perf_counter() - t0
    return self._scored(results, timings, [[np.full(len(t), version, np.int32) for t in r.tokens]
                                            for r in results])

  def stream(self, model, rows: Iterable[dict], rng, *, first_group: int = 0, timings: dict | None = None,
             version: int = 0, carried: Sequence["PartialGroup"] = ()) -> Iterator[ScoredBatch]:
    """Streaming: the groups of `rows` (pulled as the engine has room; a None row is "nothing yet", see
    `Engine.stream`), scored, in the rows' order: each batch holds the groups that complete the finished
    prefix after a decode chunk. The groups of a chunk are scored while the engine decodes the next, and held
    until the groups before them have finished, so a consumer sees the groups in the order sampling whole
    generation batches would (no bias towards short responses).

    `carried`: groups an earlier stream left unfinished (partial rollouts), first in the order: their rows
    continue from the tokens they have, with these weights (`version`), and keep the log-probs and versions
    of the tokens sampled before. Closing the generator stops decoding; what it leaves unfinished, held
    groups included, is `self.unfinished` afterwards (`self.engine.stats` counts it as dropped)."""
    timings = {} if timings is None else timings
    g = self.num_samples
    groups = {order: _Group.of(pg) for order, pg in enumerate(carried)}  # by place in the order, until delivered
    budget = self.params.max_new_tokens

    def requests():
      for order, pg in enumerate(carried):
        for j in np.flatnonzero(~pg.done):
          n = len(pg.tokens[j])
          yield Request(list(pg.row["prompt_ids"]) + pg.tokens[j].tolist(), 1, pg.key_id, budget - n,
                        tag=(order, int(j)), first_sample=int(j), first_token=n)
      order = len(carried)
      i = first_group
      for r in rows:
        if r is None:  # nothing yet (see `Engine.stream`)
          yield None
          continue
        groups[order] = _Group.new(r, i, g)
        yield Request(r["prompt_ids"], g, i, tag=(order, None))
        i, order = i + 1, order + 1

    def complete(results) -> list[int]:
      """Adds the engine's results to their groups; the places of the groups now complete."""
      out = []
      for res in results:
        order, j = res.request.tag
        group = groups[order]
        for k, (t, lp) in enumerate(zip(res.tokens, res.logprobs)):
          group.extend(k if j is None else j, t, lp, version)
          group.finish(k if j is None else j, res.truncated[k])
        if group.done.all():
          out.append(order)
      return out

    held: dict[int, ScoredBatch] = {}
    next_order = 0

    def score(orders: list[int]):
      if orders:
        batch = self._scored([groups[o].result() for o in orders], timings, [groups[o].versions for o in orders])
        for i, o in enumerate(orders):
          held[o] = batch.rows(slice(i * g, (i + 1) * g))

    self.unfinished = []
    chunks = self.engine.stream_chunks(model, requests(), rng)
    started = False
    try:
      # Carried groups that had finished need no decoding: they are scored now, and delivered in their turn.
      score([o for o, pg in enumerate(carried) if pg.done.all()])
      while True:
        ready = []
        while next_order in held:
          ready.append(held.pop(next_order))
          groups.pop(next_order)
          next_order += 1
        if ready:
          yield ScoredBatch.concat(ready)
        t0 = time.perf_counter()
        started = True
        results = next(chunks, None)
        timings["timing_s/gen"] = timings.get("timing_s/gen", 0.0) + time.perf_counter() - t0
        if results is None:
          return
        score(complete(results))
    finally:
      chunks.close()  # the engine's stats are final once the stream is
      if not started:
        self.engine.stats = EngineStats(0, 0, 0, 0, 0, 0)
      stats = self.engine.stats
      self.engine.stats = stats._replace(dropped_groups=stats.dropped_groups + len(held))
      self.unfinished = self._unfinished(groups, self.engine.unfinished() if started else [], version)

  def _unfinished(self, groups: dict[int, "_Group"], left: list[Unfinished], version: int) -> list["PartialGroup"]:
    """The groups not delivered, in order, with the tokens the engine had sampled for their rows."""
    for u in left:
      order, j = u.request.tag
      for k in range(u.request.num_samples):
        row = k if j is None else j
        groups[order].extend(row, u.tokens[k], u.logprobs[k], version)
        if u.done[k]:
          groups[order].finish(row, u.truncated[k])
    return [groups[o].partial() for o in sorted(groups)]

  def _scored(self, results: list[GroupResult], timings: dict, versions: list[list[np.ndarray]]) -> ScoredBatch:
    """The groups' rows scored; `versions`: per group, per row, the weight version of each token."""
    t1 = time.perf_counter()
    g = self.num_samples
    out = self.engine.to_rollout(results)
    tokens, mask = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN).astype(bool)
    texts = [self.tokenizer.decode(tokens[i][mask[i]]) for i in range(len(tokens))]
    truths = [res.request.tag["answer"] for res in results for _ in range(g)]
    scores = score_shared(self.executor, texts, truths)
    lengths = np.asarray(out.lengths_B).astype(np.int32)
    n = len(tokens)
    penalty = self.overlong.penalty(lengths) if self.overlong is not None else np.zeros(n)
    batch = ScoredBatch(
        prompt_BxP=np.asarray(out.prompt_BxP), prompt_mask_BxP=np.asarray(out.prompt_mask_BxP).astype(bool),
        tokens_BxN=tokens, mask_BxN=mask, sampler_logp_BxN=np.asarray(out.logprobs_BxN, np.float32),
        old_logp_BxN=np.zeros(tokens.shape, np.float32), old_logp_known_B=np.zeros(n, bool),
        lengths_B=lengths, truncated_B=np.asarray(out.truncated_B).astype(bool),
        score_B=np.asarray([r["score"] for r in scores], np.float32),
        acc_B=np.asarray([float(bool(r["acc"])) for r in scores], np.float32),
        penalty_B=np.asarray(penalty, np.float32),
        pred_B=_objects([str(r.get("pred", "")) for r in scores]),
        has_pred_B=np.asarray(["pred" in r for r in scores], bool),
        timeout_B=np.asarray([bool(r.get("timeout")) for r in scores], bool),
        text_B=_objects(texts), truth_B=_objects(truths),
        group_B=np.repeat(np.asarray([res.request.key_id for res in results], np.int64), g),
        version_BxN=_versions(versions, tokens.shape))
    timings["timing_s/reward"] = timings.get("timing_s/reward", 0.0) + time.perf_counter() - t1
    return batch


def _versions(versions: list[list[np.ndarray]], shape) -> np.ndarray:
  out = np.full(shape, -1, np.int32)
  for i, v in enumerate(row for group in versions for row in group):
    out[i, :len(v)] = v
  return out


class PartialGroup(NamedTuple):
  """A prompt group a closed stream left unfinished (`Rollouts.unfinished`), to continue in a later stream
  (partial rollouts): its prompt row and group id, and per row the tokens sampled so far with their log-probs
  and weight versions, whether it finished, and whether at its budget."""
  row: dict
  key_id: int
  tokens: list[np.ndarray]
  logprobs: list[np.ndarray]
  versions: list[np.ndarray]
  done: np.ndarray
  truncated: np.ndarray

  def to_record(self) -> dict[str, Any]:
    return {"row": self.row, "key_id": self.key_id, "tokens": list(self.tokens), "logprobs": list(self.logprobs),
            "versions": list(self.versions), "done": self.done, "truncated": self.truncated}

  @classmethod
  def from_record(cls, record: dict[str, Any]) -> "PartialGroup":
    row = dict(record["row"])
    return cls(row, int(record["key_id"]), [np.asarray(t, np.int32) for t in record["tokens"]],
               [np.asarray(x, np.float32) for x in record["logprobs"]],
               [np.asarray(v, np.int32) for v in record["versions"]], np.asarray(record["done"], bool),
               np.asarray(record["truncated"], bool))


class _Group:
  """A group being put together from the engine's results (a carried one continues from its rows' tokens)."""

  def __init__(self, row: dict, key_id: int, tokens, logprobs, versions, done, truncated):
    self.row, self.key_id = row, key_id
    self.tokens, self.logprobs, self.versions = list(tokens), list(logprobs), list(versions)
    self.done, self.truncated = np.array(done, bool), np.array(truncated, bool)

  @classmethod
  def new(cls, row: dict, key_id: int, g: int) -> "_Group":
    return cls(row, key_id, [np.zeros(0, np.int32)] * g, [np.zeros(0, np.float32)] * g,
               [np.zeros(0, np.int32)] * g, np.zeros(g, bool), np.zeros(g, bool))

  @classmethod
  def of(cls, pg: PartialGroup) -> "_Group":
    return cls(pg.row, pg.key_id, pg.tokens, pg.logprobs, pg.versions, pg.done, pg.truncated)

  def extend(self, j: int, tokens, logprobs, version: int):
    self.tokens[j] = np.concatenate([self.tokens[j], np.asarray(tokens, np.int32)])
    self.logprobs[j] = np.concatenate([self.logprobs[j], np.asarray(logprobs, np.float32)])
    self.versions[j] = np.concatenate([self.versions[j], np.full(len(tokens), version, np.int32)])

  def finish(self, j: int, truncated: bool):
    self.done[j], self.truncated[j] = True, bool(truncated)

  def result(self) -> GroupResult:
    return GroupResult(Request(self.row["prompt_ids"], len(self.tokens), self.key_id, tag=self.row), self.tokens,
                       self.logprobs, self.truncated)

  def partial(self) -> PartialGroup:
    return PartialGroup(self.row, self.key_id, self.tokens, self.logprobs, self.versions, self.done, self.truncated)
