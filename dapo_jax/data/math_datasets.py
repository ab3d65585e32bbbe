"""Real math data through TFDS (array_record; read without TensorFlow): the DAPO authors' verl parquet files
(DAPO-Math-17k, their AIME 2024 file) and the JSON Lines sets in `shared/data` (GSM8K, AIME 2024 / 2025,
AMC 2023, MATH-500).

Every row becomes {index, data_source, problem, prompt (chat messages as JSON), answer}. Raw problems are
wrapped in the DAPO template exactly; parquet rows already carry their templated messages. A malformed row
(not JSON, not UTF-8, a missing field, an empty problem or answer: a row an empty response would match)
fails with its file and line (JSON Lines) or row number (parquet); with `skip_bad_rows` such rows are
skipped and counted instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from dapo_jax.data.prompts import dapo_prompt
from dapo_jax.data.tfds_builders import prepare


class DataError(ValueError):
  pass


class _BadRows:
  """Bad rows of one file: raised at once, or (`skip`) counted and reported when the file is read."""

  def __init__(self, path: Path, skip: bool):
    self.path, self.skip, self.where = path, skip, []

  def __call__(self, where: str, message: str):
    if not self.skip:
      raise DataError(f"{self.path}{where}: {message} (data.skip_bad_rows=True skips such rows)")
    self.where.append(f"{self.path}{where}: {message}")

  def report(self, kept: int):
    if self.where:
      logging.warning("%s: skipped %d bad rows (data.skip_bad_rows), kept %d; the first: %s", self.path,
                      len(self.where), kept, self.where[0])
    if not kept:
      raise DataError(f"{self.path}: no usable rows" + (f" ({len(self.where)} bad)" if self.where else
                                                        " (the file is empty)"))


# name -> (format, {split: relative path}, problem field, answer field, data_source)
SOURCES = {
    "gsm8k": ("jsonl", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}, "question", "answer", "gsm8k"),
    "aime24": ("jsonl", {"test": "aime24/test.jsonl"}, "problem", "answer", "aime24"),
    "aime25": ("jsonl", {"test": "aime25/test.jsonl"}, "problem", "answer", "aime25"),
    "amc2023": ("jsonl", {"test": "amc2023/test.jsonl"}, "problem", "answer", "amc2023"),
    "math500": ("jsonl", {"test": "math500/test.jsonl"}, "problem", "answer", "math500"),
    # The DAPO authors' files: in a `dapo/` folder (as in ../shared/data) or at the top of source_dir (as verl's
    # prepare_dapo_data.sh downloads them, side by side).
    "dapo_aime24": ("parquet", {"test": ("dapo/aime-2024.parquet", "aime-2024.parquet")}, None, None, "math_dapo"),
    "dapo_math17k": ("parquet", {"train": ("dapo/dapo-math-17k.parquet", "dapo-math-17k.parquet")}, None, None,
                     "math_dapo"),
}


def source_path(name: str, split: str, source_dir: str | os.PathLike) -> Path:
  """The file of a source's split: the first of its candidate locations under `source_dir` that exists."""
  rel = SOURCES[name][1][split]
  candidates = [Path(source_dir) / r for r in ((rel,) if isinstance(rel, str) else rel)]
  for path in candidates:
    if path.is_file():
      return path
  present = sorted(n for n, (_, splits, *_) in SOURCES.items() if any(
      (Path(source_dir) / r).is_file() for rel in splits.values() for r in ((rel,) if isinstance(rel, str) else rel)))
  raise DataError(f"{' or '.join(map(str, candidates))}: missing (dataset {name!r}, split {split!r}); set "
                  f"--config.data.source_dir to the directory that holds it, or pick a data set found there "
                  f"(--config.data.train / --config.data.eval): {', '.join(present) or 'none'}")


def gsm8k_answer(solution: str) -> str:
  """The final number of a GSM8K worked solution ("... #### 1,234" -> "1234")."""
  if "####" not in solution:
    raise ValueError("no '####' final-answer marker")
  return solution.split("####")[-1].strip().replace(",", "")


def _messages(problem: str) -> str:
  return json.dumps([{"role": "user", "content": dapo_prompt(problem)}])


def read_jsonl(path: Path, problem_field: str, answer_field: str, data_source: str, *,
               skip_bad_rows: bool = False) -> list[dict]:
  rows, bad = [], _BadRows(path, skip_bad_rows)
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      where = f":{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        bad(where, f"not valid UTF-8 (byte {e.start} of the line: {raw[e.start:e.start + 1]!r})")
        continue
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        bad(where, f"not valid JSON: {e.msg}")
        continue
      missing = [field for field in (problem_field, answer_field)
                 if not isinstance(obj, dict) or not isinstance(obj.get(field), (str, int, float))]
      if missing:
        bad(where, f"field {missing[0]!r} is missing or not a string")
        continue
      answer = str(obj[answer_field])
      if data_source == "gsm8k":
        try:
          answer = gsm8k_answer(answer)
        except ValueError as e:
          bad(where, f"field {answer_field!r}: {e}")
          continue
      problem = str(obj[problem_field])
      empty = [name for name, value in ((problem_field, problem), (answer_field, answer)) if not value.strip()]
      if empty:
        bad(where, f"field {empty[0]!r} is empty")
        continue
      rows.append({"index": len(rows), "data_source": data_source, "problem": problem,
                   "prompt": _messages(problem), "answer": answer})
  bad.report(len(rows))
  return rows


def read_verl_parquet(path: Path, *, dedup: bool = True, skip_bad_rows: bool = False) -> list[dict]:
  """Rows of a verl RL parquet (data_source, prompt, ability, reward_model.ground_truth, extra_info)."""
  import pyarrow.parquet as pq
  try:
    table = pq.read_table(path)
  except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for unreadable files
    raise DataError(f"{path}: not a readable parquet file: {e}") from None
  missing = {"data_source", "prompt", "reward_model"} - set(table.column_names)
  if missing:
    raise DataError(f"{path}: missing column(s) {sorted(missing)}; a verl RL parquet has data_source, prompt, "
                    f"ability, reward_model, extra_info")
  rows, seen, duplicates, bad = [], set(), 0, _BadRows(path, skip_bad_rows)
  for i, row in enumerate(table.to_pylist()):
    prompt, reward = row["prompt"], row["reward_model"]
    where = f": row {i}"
    if not isinstance(prompt, (list, np.ndarray)) or not all(isinstance(m, dict) and "content" in m
                                                             for m in prompt):
      bad(where, "column 'prompt' must be a list of chat messages")
      continue
    if not isinstance(reward, dict) or reward.get("ground_truth") is None:
      bad(where, "column 'reward_model' has no 'ground_truth'")
      continue
    if not str(reward["ground_truth"]).strip():
      bad(where, "column 'reward_model': 'ground_truth' is empty")
      continue
    if not any(str(m["content"] or "").strip() for m in prompt):
      bad(where, "column 'prompt': the messages are empty")
      continue
    messages = [{"role": m.get("role", "user"), "content": m["content"]} for m in prompt]
    key = json.dumps(messages)
    if dedup and key in seen:
      duplicates += 1
      continue
    seen.add(key)
    extra = row.get("extra_info") or {}
    rows.append({"index": len(rows), "data_source": str(row["data_source"]),
                 "problem": str(extra.get("raw_problem") or ""), "prompt": key,
                 "answer": str(reward["ground_truth"])})
  if duplicates:
    logging.info("%s: dropped %d duplicate prompts, kept %d", path, duplicates, len(rows))
  bad.report(len(rows))
  return rows


def read_source(name: str, split: str, source_dir: str | os.PathLike, *, dedup: bool = True,
                skip_bad_rows: bool = False) -> list[dict]:
  if name not in SOURCES:
    raise DataError(f"unknown dataset {name!r}; known: {sorted(SOURCES)}")
  fmt, files, pf, af, ds = SOURCES[name]
  if split not in files:
    raise DataError(f"dataset {name!r} has no split {split!r}; it has {sorted(files)}")
  path = source_path(name, split, source_dir)
  if fmt == "jsonl":
    return read_jsonl(path, pf, af, ds, skip_bad_rows=skip_bad_rows)
  return read_verl_parquet(path, dedup=dedup, skip_bad_rows=skip_bad_rows)


@dataclasses.dataclass
class MathConfig(tfds.core.BuilderConfig):
  source: str = "gsm8k"
  source_dir: str = ""
  dedup: bool = True
  skip_bad_rows: bool = False


class DapoMath(tfds.core.GeneratorBasedBuilder):
  """One builder config per source data set (see `SOURCES`)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        description="Math problems with answers in DAPO format.",
        features=tfds.features.FeaturesDict({
            "index": np.int64, "data_source": tfds.features.Text(), "problem": tfds.features.Text(),
            "prompt": tfds.features.Text(), "answer": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {split: self._generate_examples(read_source(c.source, split, c.source_dir, dedup=c.dedup,
                                                       skip_bad_rows=c.skip_bad_rows))
            for split in SOURCES[c.source][1]}

  def _generate_examples(self, rows):
    for row in rows:
      yield row["index"], row


def source_fingerprint(name: str, source_dir: str | os.PathLike) -> str:
  """A digest of the bytes of a source's files: the prepared data is keyed by it, so edited files or another
  `source_dir` holding other files are prepared afresh, never served from a stale copy."""
  digest = hashlib.sha256()
  for split in sorted(SOURCES[name][1]):
    path = source_path(name, split, source_dir)
    digest.update(f"{split}:".encode())
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        digest.update(block)
  return digest.hexdigest()[:16]


def math_builder(name: str, source_dir: str, data_dir: str, *, dedup: bool = True,
                 skip_bad_rows: bool = False) -> DapoMath:
  """The prepared TFDS builder for a source data set (built once into `data_dir` for each content of the
  source files: see `source_fingerprint`). A process that lacks the source files (a worker of a multi-host
  run whose data.dir is shared but whose source_dir is not) uses the copy prepared there from the same
  source_dir, as recorded in `data_dir/sources.json`."""
  if name not in SOURCES:
    raise DataError(f"unknown dataset {name!r}; known: {sorted(SOURCES)}")
  source_dir = str(Path(source_dir).absolute())
  suffix = ("" if dedup else "_copies") + ("_skipbad" if skip_bad_rows else "")
  record = Path(data_dir) / "sources.json"
  key = f"{name}{suffix} {source_dir}"
  known = json.loads(record.read_text()) if record.is_file() else {}
  try:
    fingerprint = source_fingerprint(name, source_dir)
  except DataError:
    if key not in known:
      raise
    fingerprint = known[key]
    logging.info("%s: source files not here; using the copy prepared from them (%s)", source_dir, fingerprint)
  config = MathConfig(name=f"{name}{suffix}_{fingerprint}", source=name, source_dir=source_dir, dedup=dedup,
                      skip_bad_rows=skip_bad_rows)
  tfds.display_progress_bar(False)
  builder = prepare(lambda: DapoMath(config=config, data_dir=data_dir, file_format="array_record"))
  if known.get(key) != fingerprint:
    known[key] = fingerprint
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    os.replace(tmp, record)  # atomic: a reader sees the old or the new record, never half of one
  return builder


def read_builder_split(builder, split: str) -> list[dict]:
  sources = builder.as_data_source()
  if split not in sources:
    raise DataError(f"dataset {builder.builder_config.source!r} has no split {split!r}; it has {sorted(sources)}")
  source = sources[split]
  rows = []
  for i in range(len(source)):
    r = source[i]
    rows.append({k: (v.decode() if isinstance(v, bytes) else int(v) if isinstance(v, np.integer) else v)
                 for k, v in r.items()})
  rows.sort(key=lambda r: r["index"])
  for r in rows:
    r["messages"] = json.loads(r["prompt"])
  return rows
