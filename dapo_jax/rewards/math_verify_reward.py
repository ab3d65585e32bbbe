"""An equivalence checker for LaTeX answers (MATH-500 and similar), built on Hugging Face's `math-verify`
(sympy underneath): `\\frac{1}{2}`, `0.5` and `1/2` agree, as do `(3, \\pi/2)` and
`\\left( 3, \\frac{\\pi}{2} \\right)`.

The answer is read from the response's `Answer:` line when there is one (the DAPO format), else from the
last LaTeX / boxed expression. Time limits come from the `RewardExecutor` that runs it (math-verify's own
signal-based limits are switched off so the two do not fight over SIGALRM).
"""

from __future__ import annotations

import logging

from dapo_jax.rewards.math_dapo import INVALID, WINDOW, extract_answer

logging.getLogger("math_verify").setLevel(logging.ERROR)


def compute_score(solution_str: str, ground_truth: str, **extra) -> dict:
  from math_verify import parse, verify
  tail = solution_str[-WINDOW:]
  answer_line = extract_answer(tail)
  if answer_line != INVALID:
    line = answer_line.strip()
    target = line if "$" in line else f"${line}$"  # math-verify reads LaTeX only between delimiters
  else:
    target = tail
  gold = parse(f"${ground_truth}$", parsing_timeout=None)
  pred = parse(target, parsing_timeout=None)
  correct = bool(gold and pred and verify(gold, pred, timeout_seconds=None))
  shown = str(pred[-1]) if pred else INVALID
  return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": shown}
