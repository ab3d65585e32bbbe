"""The embedded default task: multi-digit addition worked digit by digit, in the DAPO prompt and `Answer:` format.

    problem   "What is 47 + 85?"   (wrapped in the DAPO template, then the chat template)
    solution  "7+5=12\n4+8+1=13\nAnswer: 132"

Every problem is generated with its answer, so the rule-based `math_dapo` reward verifies it. Held-out
problems are number pairs never seen in training, but every digit fact they need is: a policy that has
learnt the facts generalises. Demonstrations for the warm start are imperfect on purpose: each digit line is
wrong with probability `error_rate` (and the answer follows the wrong lines), which makes a weak base model
whose correct answer is likely but not certain, the situation RL with a verifiable reward improves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np

from dapo_jax import paths
from dapo_jax.data.prompts import dapo_prompt

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithmeticTask:
  digits: int = 2
  num_train: int = 4000
  num_test: int = 200
  error_rate: float = 0.4
  seed: int = 0

  def __post_init__(self):
    if not 1 <= self.digits <= 6:
      raise ValueError(f"task.digits must be in [1, 6], got {self.digits}")
    if not 0.0 <= self.error_rate < 1.0:
      raise ValueError(f"task.error_rate must be in [0, 1), got {self.error_rate}")
    space = (10 ** self.digits) ** 2
    if self.num_train + self.num_test > space // 2:
      raise ValueError(f"task: {self.num_train} + {self.num_test} problems are too many for {self.digits}-digit "
                       f"pairs ({space} exist)")

  def problems(self) -> dict[str, list[dict]]:
    """Disjoint train / test splits of {"id", "a", "b", "problem", "answer"}, deterministic in the seed."""
    rng = random.Random(self.seed)
    lo, hi = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10 ** self.digits - 1
    seen, pairs = set(), []
    while len(pairs) < self.num_train + self.num_test:
      pair = (rng.randint(lo, hi), rng.randint(lo, hi))
      if pair not in seen:
        seen.add(pair)
        pairs.append(pair)
    rows = [{"id": i, "a": a, "b": b, "problem": f"What is {a} + {b}?", "answer": str(a + b)}
            for i, (a, b) in enumerate(pairs)]
    return {"train": rows[: self.num_train], "test": rows[self.num_train:]}


def worked_solution(a: int, b: int, rng: random.Random | None = None, error_rate: float = 0.0) -> str:
  """The digit-by-digit solution; with `rng`, each line's sum is wrong with probability `error_rate`."""
  da, db = str(a)[::-1], str(b)[::-1]
  lines, digits, carry = [], [], 0
  for i in range(max(len(da), len(db))):
    x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
    total = x + y + carry
    if rng is not None and rng.random() < error_rate:
      total = max(0, total + rng.choice((-2, -1, 1, 2)))
    lines.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
    digits.append(total % 10)
    carry = total // 10
  answer = (str(carry) if carry else "") + "".join(str(d) for d in reversed(digits))
  return "\n".join(lines) + f"\nAnswer: {answer}"


def prompt_messages(problem: str) -> list[dict]:
  return [{"role": "user", "content": dapo_prompt(problem)}]


def tokenizer_corpus(task: ArithmeticTask) -> list[str]:
  """Text the task's SentencePiece model is trained on: rendered prompts and worked solutions."""
  from jinja2 import Template
  template = Template(CHAT_TEMPLATE)
  rng = random.Random(task.seed + 1)
  out = []
  for row in task.problems()["train"][:2000]:
    out.append(template.render(messages=prompt_messages(row["problem"]), add_generation_prompt=True))
    out.append(worked_solution(row["a"], row["b"], rng, task.error_rate))
  return out


def build_tokenizer(task: ArithmeticTask, directory: str | Path, vocab_size: int = 384) -> Path:
  """Trains the task's SentencePiece tokenizer once and caches it (tokenizer.model + tokenizer_config.json).

  Digits, operators and the chat markers are single pieces; pieces may cross spaces, so the fixed DAPO
  template compresses to a few tokens. Returns the directory. Runs sharing the cache that build it at once each
  write a folder of their own and rename it into place: the first stays, and none reads a half-written file.
  """
  import sentencepiece
  directory = Path(directory)
  key = json.dumps({**dataclasses.asdict(task), "vocab_size": vocab_size}, sort_keys=True)

  def built(d: Path) -> bool:
    return (d / "tokenizer.model").is_file() and (d / "task.json").is_file() and (d / "task.json").read_text() == key

  if built(directory):
    return directory
  own = directory.with_name(f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
  own.mkdir(parents=True)
  symbols = list(SPECIAL_TOKENS) + [str(d) for d in range(10)] + ["+", "=", "\n"]
  sentencepiece.SentencePieceTrainer.Train(
      sentence_iterator=iter(tokenizer_corpus(task)), model_prefix=str(own / "tokenizer"),
      vocab_size=vocab_size, model_type="bpe", user_defined_symbols=symbols, split_by_whitespace=False,
      split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, max_sentencepiece_length=64, add_dummy_prefix=False, byte_fallback=False, pad_id=0, unk_id=1,
      bos_id=2, eos_id=3, character_coverage=1.0, num_threads=1, minloglevel=2)
  (own / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<pad>", "bos_token": "<s>"}))
  (own / "task.json").write_text(key)
  if directory.is_dir() and not built(directory):
    shutil.rmtree(directory, ignore_errors=True)  # a copy cut short by a killed run
  paths.rename_into_place(own, directory)
  return directory


def demonstrations(task: ArithmeticTask, count: int, seed: int) -> list[tuple[str, str, str]]:
  """(problem, imperfect worked solution, answer) triples drawn from the train split."""
  rng = random.Random(seed)
  train = task.problems()["train"]
  rows = [train[rng.randrange(len(train))] for _ in range(count)]
  return [(r["problem"], worked_solution(r["a"], r["b"], rng, task.error_rate), r["answer"]) for r in rows]


def answers_are_right(task: ArithmeticTask) -> float:
  """Fraction of demonstrations whose final answer is right: the ceiling a pure imitator reaches."""
  demos = demonstrations(task, 2000, 123)
  return float(np.mean([d[1].endswith(f"Answer: {d[2]}") for d in demos]))
