"""Property tests (hypothesis): the math_dapo reward on generated responses, the reward executor on hostile
answers, and dynamic sampling's group accumulator against a plain-Python model of what it must keep, train,
carry and report."""

import json
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dapo_jax.checkpoint import _decode, _encode
from dapo_jax.dynamic_sampling import DynamicSampling, DynamicSamplingExhausted, GroupAccumulator, keep_groups
from dapo_jax.rewards.math_dapo import compute_score
from tests.conftest import scored_batch

# Reproducible runs (the same examples every time), nothing written to a database, no time limit per example.
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# --- math_dapo ---------------------------------------------------------------------------------------------

_INT = st.integers(-10**30, 10**30)
_DIGITS = st.text(alphabet="0123456789", min_size=1, max_size=2000)  # up to far past the 300-character window
_WORD = st.text(max_size=12)  # any unicode, newlines and control characters included
_PIECES = st.sampled_from([
    "{", "}", "{{", "}}", "$", "$$", "\\$", "\\", "\\frac", "\\dfrac", "\\sqrt", "\\boxed{", "\\text{", "\\textbf{",
    "\\overline{", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\!", "\\;", "\\ ", ",", ".", "=", " ", "\n", "-", "^",
    "Answer:", "answer :", "ANSWER", "a ", "an ", "units", "degrees", "\\text{and}", "mbox", "(", ")", "%"])


def _latex(inner):
  """LaTeX-ish wrappers around generated pieces: balanced, nested, or cut off."""
  return st.one_of(
      st.tuples(inner, inner).map(lambda ab: f"\\frac{{{ab[0]}}}{{{ab[1]}}}"),
      st.tuples(inner, inner).map(lambda ab: f"\\frac{ab[0]}{ab[1]}"),
      inner.map(lambda a: f"\\sqrt{{{a}}}"), inner.map(lambda a: f"\\sqrt{a}"),
      inner.map(lambda a: f"\\boxed{{{a}}}"), inner.map(lambda a: f"{{{a}}}"), inner.map(lambda a: f"${a}$"),
      inner.map(lambda a: f"\\text{{{a}}}"), inner.map(lambda a: "{" + a), inner.map(lambda a: a + "}"),
      st.lists(inner, max_size=4).map("".join))


_ATOM = st.one_of(_PIECES, _WORD, _INT.map(str), st.text(alphabet="0123456789", max_size=40))
_EXPR = st.recursive(_ATOM, _latex, max_leaves=12)
_RESPONSE = st.one_of(
    st.text(max_size=400),
    _EXPR,
    st.tuples(st.text(max_size=300), _EXPR).map(lambda p: f"{p[0]}Answer: {p[1]}"),
    st.tuples(_EXPR, _EXPR).map(lambda p: f"{p[0]}\nAnswer: {p[1]}"),
    _DIGITS.map(lambda d: f"Answer: {d}"),
    st.tuples(_DIGITS, _EXPR).map(lambda p: f"Answer: \\boxed{{{p[0]}}}{p[1]}"),
    st.lists(st.one_of(_PIECES, _EXPR), max_size=30).map("".join),
)
_TRUTH = st.one_of(_EXPR, _INT.map(str), _DIGITS, st.text(max_size=20), _INT)


def _check_result(out):
  assert set(out) == {"score", "acc", "pred"}
  assert type(out["acc"]) is bool and isinstance(out["pred"], str)
  assert type(out["score"]) is float and out["score"] in (1.0, -1.0) and (out["score"] == 1.0) == out["acc"]


@FUZZ
@given(_RESPONSE, _TRUTH)
@example("Answer: \\boxed{", "1")
@example("Answer: $", "$")
@example("Answer: \\frac", "\\frac")
@example("Answer: " + "9" * 5000, "9" * 5000)
@example("\\boxed{" * 200, "1")
def test_math_dapo_never_raises_and_scores_plus_or_minus_one(response, truth):
  for strict in (False, True):
    out = compute_score(response, truth, strict_box_verify=strict)
    _check_result(out)
  if len(response) >= 300:  # only the last 300 characters are read: anything before them changes nothing
    for strict in (False, True):
      assert compute_score("Answer: 1\n\\boxed{1}" * 30 + response[-300:], truth, strict) == \
          compute_score(response, truth, strict)


def _honest(n: int, style: str) -> str:
  return {"plain": f"{n}", "dollars": f"${n}$", "dollars_dot": f"${n}$.", "boxed": f"\\boxed{{{n}}}",
          "equation": f"x = {n}", "commas": f"{n:,}", "unit": f"{n} units"}[style]


_STYLES = st.sampled_from(["plain", "dollars", "dollars_dot", "boxed", "equation", "commas", "unit"])
# Reasoning before the answer line: any text whose last line does not itself end in "Answer:" (the pattern's
# \s* would then run across the newline and take the whole next line, "Answer: n", as the answer).
_REASONING = st.text(max_size=250).filter(lambda t: not re.search(r"(?i)answer\s*:\s*$", t))


@FUZZ
@given(_INT, _STYLES, _REASONING)
@example(0, "plain", "")
@example(-1, "plain", "")
@example(999, "commas", "")
@example(10**30, "boxed", "Answer: 3\n")
def test_an_honest_answer_is_right_and_an_off_by_one_answer_wrong(n, style, reasoning):
  if style == "commas" and n < 0:
    style = "plain"  # "-1,234" is not all digits once the commas go: the normaliser leaves it alone
  response = f"{reasoning}\nAnswer: {_honest(n, style)}"
  assert compute_score(response, str(n)) == {"score": 1.0, "acc": True, "pred": str(n)}
  assert compute_score(response, n) == {"score": 1.0, "acc": True, "pred": str(n)}  # an int ground truth
  wrong = compute_score(response, str(n + 1))
  assert wrong == {"score": -1.0, "acc": False, "pred": str(n)}
  # The window: the answer line padded to exactly 300 characters is read; one more and "A" falls out of it.
  line = f"Answer: {_honest(n, style)}"
  assert compute_score(f"{reasoning}\n{line}{' ' * (300 - len(line))}", str(n))["acc"]
  assert compute_score(f"{reasoning}\n{line}{' ' * (301 - len(line))}", str(n))["pred"] == "[INVALID]"
  # The strict mode reads the last \boxed{} alone, raw.
  boxed = f"{reasoning}\n\\boxed{{{n}}}"
  assert compute_score(boxed, str(n), strict_box_verify=True) == {"score": 1.0, "acc": True, "pred": str(n)}
  assert not compute_score(boxed, str(n + 1), strict_box_verify=True)["acc"]


# --- the reward executor on hostile answers -----------------------------------------------------------------

_BIG = st.integers(10, 10**120).map(str)
_TOWER = st.lists(_BIG, min_size=2, max_size=5).map(lambda xs: "^{".join(xs) + "}" * (len(xs) - 1))
_HOSTILE = st.one_of(
    _TOWER,                                                               # 10^{10^{10}} and higher
    _TOWER.map(lambda t: f"\\sqrt{{2}}^{{{t}}}"),
    st.tuples(st.integers(10**6, 10**12), st.sampled_from(["!", "!!"])).map(lambda p: f"({p[0]}){p[1]}"),
    st.tuples(_TOWER, st.integers(1, 30)).map(lambda p: "{" * p[1] + p[0]),  # unbalanced braces
    st.tuples(_TOWER, st.integers(1, 30)).map(lambda p: p[0] + "}" * p[1]),
    st.tuples(_BIG, _BIG).map(lambda p: f"\\frac{{{p[0]}^{{{p[1]}}}}}{{{p[1]}!}}"),
)
_LIMIT_S, _KILL_AFTER_S = 0.5, 1.0


@pytest.fixture(scope="module")
def verifier():
  from dapo_jax.rewards import RewardExecutor
  with RewardExecutor("math_verify", workers=2, timeout_s=_LIMIT_S, kill_after_s=_KILL_AFTER_S) as ex:
    ex.score(["Answer: 1"] * 2, ["1"] * 2)  # both workers up
    yield ex


@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_HOSTILE, min_size=1, max_size=3), st.lists(st.integers(-10**6, 10**6), min_size=1, max_size=3))
def test_hostile_answers_return_within_their_limit_and_honest_ones_score_right(verifier, hostile, honest):
  import time
  responses = [f"Answer: ${h}$" for h in hostile] + [f"So it is \\boxed{{{n}}}.\nAnswer: ${n}$" for n in honest]
  truths = ["7"] * len(hostile) + [str(n) for n in honest]
  order = np.random.default_rng(len(hostile) * 7 + len(honest)).permutation(len(responses))
  t = time.monotonic()
  out = verifier.score([responses[i] for i in order], [truths[i] for i in order])
  took = time.monotonic() - t
  # Two workers: at worst every hostile item runs to its kill, half of them on each worker, plus the honest ones.
  bound = -(-len(hostile) // 2) * (_LIMIT_S + _KILL_AFTER_S) + 2.0 + 0.5 * len(honest)
  assert took < bound, (took, bound)
  by_item = {int(i): o for i, o in zip(order, out)}
  assert [by_item[len(hostile) + j]["acc"] for j in range(len(honest))] == [True] * len(honest)
  assert not any(by_item[j]["acc"] for j in range(len(hostile)))


# --- dynamic sampling --------------------------------------------------------------------------------------


def _reference_step(carried, stream, s: DynamicSampling, group_size: int):
  """What one training step must do, written plainly. `carried`: [(group id, accs)] carried in; `stream`: the
  generation batches, each [(group id, accs)], consumed from the front. Returns the outcome and the trained and
  surplus groups."""
  kept = list(carried)
  batches = sampled = 0
  while len(kept) < s.train_batch_size:
    if not stream:
      return "starved", None
    batch = stream.pop(0)
    batches += 1
    sampled += len(batch)
    kept += [g for g in batch if not s.enable or group_size == 1 or len(set(g[1])) > 1]
    if len(kept) >= s.train_batch_size:
      break
    if s.max_num_gen_batches and batches >= s.max_num_gen_batches:
      if s.on_exhausted == "raise" or not kept:
        return "raise", None
      break  # train_on_kept
  trained, surplus = kept[:s.train_batch_size], kept[s.train_batch_size:]
  metrics = {
      "train/num_gen_batches": float(batches),
      "train/kept_group_fraction": (len(kept) - len(carried)) / sampled if sampled else math.nan,
      "train/rollouts_per_trained_sample": sampled * group_size / max(len(trained) * group_size, 1),
      "train/num_trained_groups": float(len(trained)),
      "train/carried_in_groups": float(len(carried)),
      "train/surplus_groups": float(len(surplus)),
      "train/surplus_discarded_groups": float(0 if s.carry_over else len(surplus)),
  }
  return "trained", (trained, surplus, metrics)


@st.composite
def _gen_batch(draw, group_size: int):
  groups = draw(st.integers(1, 5))
  # Mostly all-equal groups (as a too-easy or too-hard data set gives), some mixed.
  mixed = st.lists(st.sampled_from([0, 1]), min_size=group_size, max_size=group_size)
  same = st.sampled_from([0, 1]).map(lambda a: [a] * group_size)
  return [draw(st.one_of(same, mixed)) for _ in range(groups)], draw(st.integers(1, 4))


def _assert_batches_equal(a, b):
  assert a._fields == b._fields
  for name, x, y in zip(a._fields, a, b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, name
    assert np.array_equal(x, y), name


@FUZZ
@given(group_size=st.integers(2, 4), train_batch_size=st.integers(1, 6), max_num_gen_batches=st.integers(0, 4),
       on_exhausted=st.sampled_from(["raise", "train_on_kept"]), carry_over=st.booleans(),
       enable=st.sampled_from([True, True, True, False]), metric=st.sampled_from(["acc", "score", "seq_reward"]),
       data=st.data())
def test_group_accumulator_against_a_plain_reference(group_size, train_batch_size, max_num_gen_batches,
                                                     on_exhausted, carry_over, enable, metric, data):
  s = DynamicSampling(train_batch_size=train_batch_size, max_num_gen_batches=max_num_gen_batches,
                      on_exhausted=on_exhausted, carry_over=carry_over, enable=enable, metric=metric)
  acc = GroupAccumulator(s, group_size)
  carried = []  # the reference's carried groups: [(group id, accs)]
  widths = {}  # group id -> the token width of the batch it was sampled in
  tag = 0
  for step in range(3):
    fed = []  # this step's generation batches, as the reference sees them
    outcome = None
    while not acc.ready:
      if len(fed) == 12:  # no limit and nothing kept yet: stop feeding, the step is not over
        outcome = "starved"
        break
      accs, width = data.draw(_gen_batch(group_size), label=f"step {step} batch {len(fed)}")
      tag += 1
      batch = scored_batch([a for g in accs for a in g], tag, width=width, group_size=group_size)
      ids = [tag * 100 + i for i in range(len(accs))]
      widths.update((i, width) for i in ids)
      fed.append(list(zip(ids, map(tuple, accs))))
      try:
        kept_now = acc.add(batch)
      except DynamicSamplingExhausted as e:
        outcome = "raise"
        assert f"after {len(fed)} generation batches (max_num_gen_batches={max_num_gen_batches})" in str(e)
        break
      assert kept_now == sum(1 for g in accs if not enable or len(set(g)) > 1)
    want, result = _reference_step(carried, list(fed), s, group_size)
    if outcome is not None:
      assert want == outcome
      if outcome == "starved":
        assert not acc.ready
        with pytest.raises(RuntimeError, match="before the batch is full"):
          acc.take()
      return
    assert want == "trained"
    trained, surplus, want_metrics = result
    assert acc.num_gen_batches == len(fed) == want_metrics["train/num_gen_batches"]
    batch, metrics = acc.take()

    # The kept groups, whole and in order, carried ones first, at most train_batch_size of them.
    assert batch.group_B.tolist() == [gid for gid, _ in trained for _ in range(group_size)]
    assert batch.acc_B.tolist() == [float(a) for _, accs in trained for a in accs]
    assert batch.num_rows == len(trained) * group_size <= train_batch_size * group_size
    # Each row's tokens are its own batch's (tag), right-padded with zeros to the widest; prompts left-padded.
    width = batch.tokens_BxN.shape[1]
    for row, gid in enumerate(batch.group_B):
      w = widths[int(gid)]
      assert batch.tokens_BxN[row].tolist() == [gid // 100] * w + [0] * (width - w)
      assert batch.mask_BxN[row].tolist() == [True] * w + [False] * (width - w)
      assert batch.prompt_BxP[row].tolist() == [0] * (width - w) + [gid // 100] * w
    for key, value in want_metrics.items():
      assert metrics[key] == value or (math.isnan(value) and math.isnan(metrics[key])), (key, metrics[key], value)

    carried = surplus if carry_over else []
    if carried:
      # Checkpointed between steps, the accumulator comes back with exactly the carried rows.
      assert acc.carried.group_B.tolist() == [gid for gid, _ in carried for _ in range(group_size)]
      state = _decode(json.loads(json.dumps(_encode(acc.state()))))  # as the checkpoint's record stores it
      restored = GroupAccumulator(s, group_size)
      restored.restore(state)
      _assert_batches_equal(restored.carried, acc.carried)
      assert restored.ready == acc.ready == (len(carried) >= train_batch_size)
      if data.draw(st.booleans(), label="continue from the restored accumulator"):
        acc = restored
    else:
      assert acc.carried is None and acc.state() == {"carry": []}
      assert not acc.ready


# keep_groups: a group is kept iff its values are not all equal (and a group of one always).
_VALUES = st.sampled_from([0.0, 1.0, -1.0, 0.1, -1.1, 0.7, -1.0 - 1 / 4096, -1.5, 0.3, -2.0])


@FUZZ
@given(st.integers(1, 8), st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=1), min_size=1, max_size=6))
def test_keep_groups_on_accuracies(group_size, rows):
  groups = [(r * group_size)[:group_size] for r in rows]
  got = keep_groups(np.asarray([a for g in groups for a in g], np.float32), group_size)
  assert got.dtype == bool and got.tolist() == [group_size == 1 or len(set(g)) > 1 for g in groups]


@FUZZ
@given(st.integers(2, 8), st.lists(st.one_of(_VALUES.map(lambda v: [v]), st.lists(_VALUES, min_size=1)),
                                   min_size=1, max_size=6))
@example(3, [[0.1]])
def test_keep_groups_on_rewards(group_size, rows):
  groups = [(r * group_size)[:group_size] for r in rows]
  got = keep_groups(np.asarray([a for g in groups for a in g], np.float64), group_size)
  assert got.tolist() == [len(set(g)) > 1 for g in groups]

