"""TFDS builders (array_record; reading needs no TensorFlow: `builder.as_data_source()`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from dapo_jax.data.synthetic import ArithmeticTask


@dataclasses.dataclass
class ArithmeticConfig(tfds.core.BuilderConfig):
  digits: int = 2
  num_train: int = 4000
  num_test: int = 200
  task_seed: int = 0


class DapoArithmetic(tfds.core.GeneratorBasedBuilder):
  """The embedded default task's problems (see `dapo_jax.data.synthetic`), train and test splits."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [ArithmeticConfig(name="default")]

  def _info(self):
    return self.dataset_info_from_configs(
        description="Multi-digit addition problems with their answers, in DAPO format.",
        features=tfds.features.FeaturesDict({
            "id": np.int64, "a": np.int64, "b": np.int64, "problem": tfds.features.Text(),
            "answer": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    task = ArithmeticTask(digits=c.digits, num_train=c.num_train, num_test=c.num_test, seed=c.task_seed)
    splits = task.problems()
    return {name: self._generate_examples(rows) for name, rows in splits.items()}

  def _generate_examples(self, rows):
    for row in rows:
      yield row["id"], row


def prepare(make_builder):
  """`make_builder()`, prepared; what TFDS says meanwhile ("Downloading and preparing dataset ...", its
  custom-config warning) only with --verbosity=1 or more. Runs that share a data dir may prepare the same
  data set at once: TFDS writes each into a folder of its own, the first renamed into place wins, and the others
  read the winner's."""
  import contextlib
  import io
  from absl import logging

  def prepared():
    builder = make_builder()
    try:
      builder.download_and_prepare()
    except FileExistsError:  # another run's copy landed first (TFDS removed this one's)
      builder = make_builder()
      builder.download_and_prepare()
    return builder

  if logging.get_verbosity() >= 1:
    return prepared()
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      return prepared()
  finally:
    logging.set_verbosity(level)


def arithmetic_builder(task: ArithmeticTask, data_dir: str) -> DapoArithmetic:
  """The builder for this task (one builder config per task), prepared in `data_dir` on first use."""
  name = f"d{task.digits}_n{task.num_train}_t{task.num_test}_s{task.seed}"
  config = ArithmeticConfig(name=name, digits=task.digits, num_train=task.num_train, num_test=task.num_test,
                            task_seed=task.seed)
  tfds.display_progress_bar(False)
  return prepare(lambda: DapoArithmetic(config=config, data_dir=data_dir, file_format="array_record"))


def _decode(row) -> dict:
  return {k: (v.decode() if isinstance(v, bytes) else int(v) if isinstance(v, np.integer) else v)
          for k, v in row.items()}


def read_split(builder, split: str) -> list[dict]:
  """All rows of a split as plain dicts, in id order (array_record files are written shuffled)."""
  source = builder.as_data_source()[split]
  rows = [_decode(source[i]) for i in range(len(source))]
  return sorted(rows, key=lambda r: r["id"])
