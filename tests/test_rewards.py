"""The math_dapo reward against a golden table (the reference's behaviour), parallel scoring with time limits,
and overlong shaping in tokens."""

import time

import numpy as np
import pytest

from dapo_jax import rewards
from dapo_jax.rewards import OverlongShaping, RewardExecutor, overlong_penalty
from dapo_jax.rewards.math_dapo import compute_score, normalize_final_answer

# (response, ground truth, acc, pred). The first rows are the reference's published behaviour.
GOLDEN = [
    ("Answer: 540", "540", True, "540"),
    ("Answer: 540.", "540", False, "540."),
    ("Answer: $540$", "540", True, "540"),
    ("Answer: $540$.", "540", True, "540"),
    ("Answer: \\boxed{540}", "540", True, "540"),
    ("Answer: \\boxed{540}.", "540", False, "540."),
    ("answer:540", "540", True, "540"),
    ("ANSWER : 540 ", "540", True, "540"),
    ("Answer: 5,400", "5400", True, "5400"),
    ("Answer: x = 540", "540", True, "540"),
    ("Answer: 540 degrees", "540", True, "540"),
    ("Answer: 540 ways", "540", True, "540"),
    ("Answer: 540 \\text{ cm}", "540", True, "540"),
    ("Answer: 54 0", "540", True, "540"),
    ("Answer: The answer is $540$", "540", True, "540"),
    ("Final Answer: The final answer is 540", "540", False, "Thefinalansweris540"),
    ("The answer is 540", "540", False, "[INVALID]"),
    ("Answer: **540**", "540", False, "**540**"),
    ("Answer: \\(540\\)", "540", False, "\\(540\\)"),
    ("Answer: 0540", "540", False, "0540"),
    ("Answer: 540\n\nAnswer: 12", "12", True, "12"),
    ("Answer: 540\n" + "x" * 300, "540", False, "[INVALID]"),
    ("Answer: \\frac12", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\sqrt2", "\\sqrt{2}", True, "\\sqrt{2}"),
    # Further cases, each worked through the normaliser by hand.
    ("Answer: $\\frac{3}{4}$", "\\frac{3}{4}", True, "\\frac{3}{4}"),
    ("Answer: 1,234,567", "1234567", True, "1234567"),
    ("Answer: 3.5", "3.5", True, "3.5"),
    ("Answer: -7", "-7", True, "-7"),
    ("Answer: 12 dollars", "12", True, "12"),
    ("Answer: 90^\\circ", "90", True, "90"),
    ("Answer: 90^{\\circ}", "90", True, "90"),
    ("Answer: \\text{(A)}", "(A)", True, "(A)"),
    ("Answer: 7 \\text{ units}", "7", True, "7"),
    ("Answer: 42\nThat is all.", "42", True, "42"),
    ("So the answer : 17", "17", True, "17"),
    ("Answer: 10 hours", "10", True, "10"),
    ("Answer: 5\\%", "5", False, "5\\%"),
    ("Answer: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("", "1", False, "[INVALID]"),
    ("Answer:", "1", False, "[INVALID]"),
    ("Answer:\n42", "42", True, "42"),  # \s* crosses the newline
    ("Answer: 1000", "1,000", True, "1000"),  # the ground truth is normalised too
    ("Answer: x=5, y=6", "6", True, "6"),  # only the text after the last '=' counts
    ("Answer: a 5", "5", True, "5"),
    ("Answer: 1/2", "\\frac{1}{2}", False, "1/2"),
    ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", False, "\\dfrac{1}{2}"),
    ("Answer: 4 inches", "4", True, "4"),
    ("Answer: \\$18.90", "18.90", True, "18.90"),
    ("Answer: 204", 204, True, "204"),  # an integer ground truth (the AIME parquet stores strings, users may not)
    ("We get 3.\nAnswer: 3\n", "3", True, "3"),
]


@pytest.mark.parametrize("response,truth,acc,pred", GOLDEN)
def test_math_dapo_golden(response, truth, acc, pred):
  out = compute_score(response, truth)
  assert (out["acc"], out["pred"]) == (acc, pred)
  assert out["score"] == (1.0 if acc else -1.0)


def test_only_the_last_300_characters_count():
  tail = "Answer: 540"
  assert compute_score("y" * (300 - len(tail)) + tail, "540") == {"score": 1.0, "acc": True, "pred": "540"}
  # An earlier, wrong answer before the window is not read either.
  assert compute_score("Answer: 7\n" + "y" * (300 - len(tail)) + tail, "7")["pred"] == "540"
  # 300 characters from "A" on: the line is read, the padding after the number is part of it.
  assert compute_score("Answer: 540" + "z" * 289, "540")["pred"] == "540" + "z" * 289
  # 301: the window starts at "nswer:", so there is no answer at all.
  assert compute_score("Answer: 540" + "z" * 290, "540") == {"score": -1.0, "acc": False, "pred": "[INVALID]"}


def test_strict_box_mode():
  def strict(text, truth="540"):
    return compute_score(text, truth, strict_box_verify=True)

  assert strict("so \\boxed{540}") == {"score": 1.0, "acc": True, "pred": "540"}
  assert strict("so \\boxed{540.}") == {"score": -1.0, "acc": False, "pred": "540."}  # no normalisation
  assert strict("\\boxed{1} then \\boxed{540}")["pred"] == "540"  # the last box
  assert strict("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")["acc"]  # braces matched, not the first "}"
  assert strict("\\boxed{$540$}")["pred"] == "$540$"
  assert strict("Answer: 540")["pred"] == "[INVALID]"  # the Answer line is not read in this mode
  assert strict("no box") == {"score": -1.0, "acc": False, "pred": "[INVALID]"}
  assert strict("\\boxed{540")["pred"] == "[INVALID]"  # unclosed
  # Only the last 100 characters are searched.
  assert strict("\\boxed{540}" + "z" * 89)["acc"]
  assert strict("\\boxed{540}" + "z" * 90)["pred"] == "[INVALID]"


def test_normalizer_pieces():
  assert normalize_final_answer("\\frac12") == "\\frac{1}{2}"
  assert normalize_final_answer("\\sqrt2") == "\\sqrt{2}"
  assert normalize_final_answer("\\textbf{7}") == "7"
  assert normalize_final_answer("\\overline{12}") == "12"
  assert normalize_final_answer("\\fracabc") == "\\frac{a}{b}c"
  assert normalize_final_answer("\\sqrtab") == "\\sqrt{a}b"
  assert normalize_final_answer("\\frac{12}{5}") == "\\frac{12}{5}"
  assert normalize_final_answer("x = 1 = 2") == "2"
  assert normalize_final_answer("$1$ or $2$") == "1"  # the first $...$ span replaces the whole answer
  assert normalize_final_answer("1,2") == "12" and normalize_final_answer("(1,2)") == "(1,2)"  # digits only
  # Spaces go first, then \\text{and} becomes a comma, and a comma between digits goes: a list reads as a number.
  assert normalize_final_answer("3 \\text{ and } 4") == "34"
  # One pass, greedy to the last "}": the outer box goes, the inner one stays (as the reference).
  assert normalize_final_answer("\\boxed{\\boxed{5}}") == "\\boxed{5}"
  assert normalize_final_answer("\\boxed{1}+\\boxed{2}") == "1}+\\boxed{2"
  assert normalize_final_answer("  5  ") == "5" and normalize_final_answer("") == ""


def test_registry_and_custom_rewards():
  assert "math_dapo" in rewards.names()
  assert rewards.get("math_dapo") is compute_score
  assert rewards.get("dapo_jax.rewards.math_dapo:compute_score") is compute_score
  with pytest.raises(KeyError, match="unknown reward 'nope'"):
    rewards.get("nope")
  with pytest.raises(ValueError, match="already registered"):
    rewards.register("math_dapo")(lambda s, g: {})


def slow_reward(solution_str, ground_truth, **extra):
  """A reward that hangs on one input, as a pathological string could."""
  if solution_str == "hang":
    time.sleep(60)
  return compute_score(solution_str, ground_truth)


def swallowing_reward(solution_str, ground_truth, **extra):
  """Catches every Exception around slow work, as math-verify's own error handling does."""
  try:
    if solution_str == "hang":
      time.sleep(60)
  except Exception:
    return {"score": -1.0, "acc": False, "pred": "[swallowed]"}
  return compute_score(solution_str, ground_truth)


def deaf_reward(solution_str, ground_truth, **extra):
  """Hangs with SIGALRM blocked, as C code that never returns to the interpreter would."""
  import signal
  if solution_str == "evil":
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    time.sleep(60)
  return compute_score(solution_str, ground_truth)


_FIRST_CALL = []


def lazy_import_reward(solution_str, ground_truth, **extra):
  """Its first call takes 1.5 s (a lazy import, as math-verify's sympy)."""
  if not _FIRST_CALL:
    _FIRST_CALL.append(True)
    time.sleep(1.5)
  return compute_score(solution_str, ground_truth)


def failing_reward(solution_str, ground_truth, **extra):
  if solution_str == "bad":
    raise ZeroDivisionError("a bug in the reward")
  return compute_score(solution_str, ground_truth)


def crashing_reward(solution_str, ground_truth, **extra):
  """Dies on one input, as a worker the kernel's OOM killer took would."""
  import os
  if solution_str == "crash":
    os._exit(3)
  return compute_score(solution_str, ground_truth)


def nan_reward(solution_str, ground_truth, **extra):
  return {"score": float("nan"), "acc": False}


def napping_reward(solution_str, ground_truth, **extra):
  time.sleep(0.5)
  return compute_score(solution_str, ground_truth)


def test_executor_matches_serial_and_keeps_order():
  responses = [r for r, *_ in GOLDEN] * 3
  truths = [t for _, t, *_ in GOLDEN] * 3
  with RewardExecutor("math_dapo", workers=2, timeout_s=5.0) as ex:
    parallel = ex.score(responses, truths)
    assert ex.score(responses[:3], truths[:3]) == parallel[:3]  # the workers live on between batches
  assert parallel == [compute_score(r, t) for r, t in zip(responses, truths)]


@pytest.mark.parametrize("name", ["slow_reward", "swallowing_reward"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_hanging_item_times_out_alone_and_is_counted(name, workers):
  responses = ["Answer: 1", "hang", "Answer: 3", "Answer: 4"]
  with RewardExecutor(f"tests.test_rewards:{name}", workers=workers, timeout_s=0.5, kill_after_s=5.0) as ex:
    ex.score(["Answer: 0"], ["0"])  # workers started
    t = time.monotonic()
    out = ex.score(responses, ["1", "2", "3", "5"])
    assert time.monotonic() - t < 0.5 + 1.5
  assert [o["acc"] for o in out] == [True, False, True, False]
  assert out[1] == {"score": -1.0, "acc": False, "pred": "[TIMEOUT]", "timeout": True}
  assert ex.timeouts == 1 and ex.killed == 0 and out[3]["pred"] == "4"


def test_a_worker_deaf_to_its_alarm_is_killed_and_replaced():
  with RewardExecutor("tests.test_rewards:deaf_reward", workers=2, timeout_s=0.2, kill_after_s=1.0) as ex:
    ex.score(["Answer: 0"], ["0"])
    t = time.monotonic()
    out = ex.score(["Answer: 1", "evil", "Answer: 3", "Answer: 4", "Answer: 5"], ["1", "2", "3", "4", "5"])
    assert time.monotonic() - t < 0.2 + 1.0 + 1.5
    assert [o["pred"] for o in out] == ["1", "[TIMEOUT]", "3", "4", "5"]
    assert ex.killed == 1 and ex.timeouts == 1
    pids = [w.process.pid for w in ex._workers]
    assert len(set(pids)) == 2 and all(w.process.is_alive() for w in ex._workers)
    assert [o["acc"] for o in ex.score(["Answer: 6"] * 4, ["6"] * 4)] == [True] * 4  # the replacement works


def test_a_worker_that_dies_is_replaced_and_its_item_scored_as_a_failure():
  with RewardExecutor("tests.test_rewards:crashing_reward", workers=2, timeout_s=1.0) as ex:
    out = ex.score(["Answer: 1", "crash", "Answer: 3"], ["1", "2", "3"])
    assert [o["pred"] for o in out] == ["1", "[TIMEOUT]", "3"] and ex.killed == 1
    assert ex.score(["Answer: 4"] * 3, ["4"] * 3)[2]["acc"]


def test_a_non_finite_score_is_an_error():
  with pytest.raises(ValueError, match="returned a non-finite score nan"):
    RewardExecutor("tests.test_rewards:nan_reward", workers=0).score(["x"], ["1"])
  with RewardExecutor("tests.test_rewards:nan_reward", workers=1) as ex:
    with pytest.raises(RuntimeError, match="(?s)failed on item 0 of the batch.*non-finite score"):
      ex.score(["x"], ["1"])


@pytest.mark.parametrize("workers", [1, 0])
def test_a_slow_first_import_does_not_run_under_an_items_alarm(workers):
  _FIRST_CALL.clear()
  with RewardExecutor("tests.test_rewards:lazy_import_reward", workers=workers, timeout_s=0.5) as ex:
    out = ex.score(["Answer: 1", "Answer: 2"], ["1", "2"])
  assert [o["acc"] for o in out] == [True, True] and ex.timeouts == 0


def test_a_reward_that_raises_fails_loudly_naming_the_item():
  with RewardExecutor("tests.test_rewards:failing_reward", workers=2) as ex:
    with pytest.raises(RuntimeError, match=r"(?s)failed on item 2 of the batch.*ZeroDivisionError: a bug"):
      ex.score(["Answer: 1", "Answer: 2", "bad"], ["1", "2", "3"])
    assert ex.score(["Answer: 1"], ["1"])[0]["acc"]  # usable afterwards
  with pytest.raises(ZeroDivisionError):
    RewardExecutor("tests.test_rewards:failing_reward", workers=0).score(["bad"], ["1"])


def test_ctrl_c_in_the_terminal_does_not_kill_the_workers_mid_item():
  # Ctrl-C signals the whole process group; the training loop handles it, the workers must carry on.
  import os
  import signal
  import threading
  with RewardExecutor("tests.test_rewards:napping_reward", workers=2, timeout_s=5.0, kill_after_s=2.0) as ex:
    ex.score(["Answer: 0"] * 2, ["0"] * 2)  # starts the workers
    pids = sorted(w.process.pid for w in ex._workers)
    out = []
    scorer = threading.Thread(target=lambda: out.extend(ex.score(["Answer: 1", "Answer: 2"], ["1", "3"])))
    scorer.start()
    time.sleep(0.2)  # both workers are inside an item
    for pid in pids:
      os.kill(pid, signal.SIGINT)
    scorer.join(30)
    assert [o["pred"] for o in out] == ["1", "2"] and [o["acc"] for o in out] == [True, False]
    assert ex.timeouts == 0 and ex.killed == 0
    assert sorted(w.process.pid for w in ex._workers) == pids


@pytest.mark.parametrize("workers", [0, 2])
def test_math_verify_on_hostile_answers_returns_within_its_limit(workers):
  hostile = ["Answer: $10^{10^{10}}$", "Answer: $\\sqrt{2}^{10^{100}}$", "Answer: $(10^9)!$"]
  with RewardExecutor("math_verify", workers=workers, timeout_s=1.0, kill_after_s=2.0) as ex:
    ex.score(["Answer: 1"] * max(workers, 1), ["1"] * max(workers, 1))
    t = time.monotonic()
    out = ex.score(hostile + ["Answer: $\\frac{1}{2}$"], ["1", "2", "3", "0.5"])
    took = time.monotonic() - t
  bound = 1.0 + 2.0 + 1.0 if workers else 3 * 1.0 + 1.0
  assert took < bound * (2 if workers else 1), took
  assert [o["acc"] for o in out] == [False, False, False, True]
  assert ex.timeouts == sum(o.get("timeout", False) for o in out) >= 1


def test_executor_in_process_mode_and_errors():
  ex = RewardExecutor("math_dapo", workers=0)
  assert ex.score(["Answer: 2", "Answer: 3"], ["2", "2"]) == [
      {"score": 1.0, "acc": True, "pred": "2"}, {"score": -1.0, "acc": False, "pred": "3"}]
  assert ex.score([], []) == []
  with pytest.raises(ValueError, match="2 solutions but 1 ground truths"):
    ex.score(["a", "b"], ["1"])
  with pytest.raises(KeyError, match="unknown reward 'no_such_reward'"):
    RewardExecutor("no_such_reward")
  for field, kwargs in [("workers", {"workers": -1}), ("timeout_s", {"timeout_s": 0}),
                        ("kill_after_s", {"kill_after_s": -1.0})]:
    with pytest.raises(ValueError, match=f"RewardExecutor.{field}"):
      RewardExecutor("math_dapo", **kwargs)


def test_overlong_penalty_reference_vectors():
  got = overlong_penalty([16384, 16385, 18432, 20480, 100], max_len=20480, buffer=4096, factor=1.0)
  np.testing.assert_allclose(got, [0.0, -1 / 4096, -0.5, -1.0, 0.0], atol=1e-12)
  shaping = OverlongShaping(max_len=20480, buffer=4096, factor=0.5)
  np.testing.assert_allclose(shaping.penalty([20480]), [-0.5])
  np.testing.assert_array_equal(OverlongShaping(max_len=100, buffer=10, enable=False).penalty([100]), [0.0])
  np.testing.assert_array_equal(OverlongShaping(max_len=100, buffer=10, filter=True).loss_mask([True, False]),
                                [0.0, 1.0])
  np.testing.assert_array_equal(OverlongShaping(max_len=100, buffer=10).loss_mask([True, False]), [1.0, 1.0])
  with pytest.raises(ValueError, match=r"overlong\.buffer: 100 must be positive and smaller than "
                                       r"rollout\.max_response_length=100"):
    OverlongShaping(max_len=100, buffer=100)
  with pytest.raises(ValueError, match=r"overlong\.buffer: 0 must be positive"):
    OverlongShaping(max_len=100, buffer=0)
  assert OverlongShaping(max_len=100, buffer=100, enable=False).penalty([150]).tolist() == [0.0]  # not checked
  with pytest.raises(ValueError, match=r"overlong\.factor: must be >= 0, got -1"):
    OverlongShaping(max_len=100, buffer=10, factor=-1)
  with pytest.raises(ValueError, match=r"rollout\.max_response_length: must be a positive integer, got 0"):
    OverlongShaping(max_len=0, buffer=10)
