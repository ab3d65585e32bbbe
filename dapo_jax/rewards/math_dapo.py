"""The DAPO-Math reward: the last `Answer:` line, Minerva-normalised, compared as strings.

Behaves as the reference (verl `reward_score/math_dapo.py`, the DAPO authors' `eval/math_dapo.py`): only the
last 300 characters are read; the last case-insensitive `Answer\\s*:\\s*(...)` match is the prediction
(`[INVALID]` without one); prediction and ground truth pass through `normalize_final_answer`; correct iff equal
and not empty.
Score +1.0 / -1.0. Pure string work: nothing from a response is executed or evaluated.
"""

from __future__ import annotations

import re

# (before, after) literal replacements, applied in order.
SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
# Literal substrings deleted everywhere (units, filler words, spacing macros).
REMOVED_EXPRESSIONS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue", "points",
    "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges", "students",
    "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3",
    "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)
_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_FIRST_DOLLAR_SPAN = re.compile(r"(.*?)(\$)(.*?)(\$)(.*)")
_UNWRAP = (re.compile(r"(\\text\{)(.*?)(\})"), re.compile(r"(\\textbf\{)(.*?)(\})"),
           re.compile(r"(\\overline\{)(.*?)(\})"), re.compile(r"(\\boxed\{)(.*)(\})"))
_FRAC = re.compile(r"(frac)([^{])(.)")
_SQRT = re.compile(r"(sqrt)([^{])")
INVALID = "[INVALID]"
WINDOW = 300  # characters read from the end of a response; the longest MATH-500 answer has 159


def normalize_final_answer(answer: str) -> str:
  """The Minerva normaliser (Lewkowycz et al. 2022), as the DAPO reward applies it."""
  answer = answer.split("=")[-1]
  for before, after in SUBSTITUTIONS:
    answer = answer.replace(before, after)
  for expr in REMOVED_EXPRESSIONS:
    answer = answer.replace(expr, "")
  answer = _FIRST_DOLLAR_SPAN.sub("$\\3$", answer)
  for pattern in _UNWRAP:
    answer = pattern.sub("\\2", answer)
  answer = _FRAC.sub("frac{\\2}{\\3}", answer)
  answer = _SQRT.sub("sqrt{\\2}", answer)
  answer = answer.replace("$", "")
  if answer.replace(",", "").isdigit():
    answer = answer.replace(",", "")
  return answer.strip()


def extract_answer(solution: str) -> str:
  matches = _ANSWER.findall(solution)
  return matches[-1] if matches else INVALID


def last_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}`, braces matched; None if there is none or it is unclosed."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  depth = 0
  for i in range(start + len("\\boxed"), len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[start + len("\\boxed{"):i]
  return None


def compute_score(solution_str: str, ground_truth: str, strict_box_verify: bool = False) -> dict:
  """{"score": +1.0 / -1.0, "acc": bool, "pred": str} for one response.

  `strict_box_verify` (off in the DAPO recipe): compare the raw content of the last `\\boxed{}` within the
  last 100 characters to the ground truth, with no normalisation.
  """
  if strict_box_verify:
    boxed = last_boxed(solution_str[-100:])
    pred = boxed if boxed is not None else INVALID
    correct = boxed is not None and boxed == ground_truth
  else:
    pred = normalize_final_answer(extract_answer(solution_str[-WINDOW:]))
    # An answer that normalises to nothing ("Answer: $", "Answer: dollars") is never right, even against a
    # ground truth that normalises to nothing too (the reference scores that pair +1).
    correct = pred != "" and pred == normalize_final_answer(str(ground_truth))
  return {"score": 1.0 if correct else -1.0, "acc": bool(correct), "pred": pred}
