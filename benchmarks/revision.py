"""Another git revision's `dapo_jax`, importable beside this tree's, and its sampler behind one call: for
timing two versions in one process (this machine's speed drifts too much to compare separate runs).

The static-batch sampler that the rollout engine replaced lives on at `STATIC_SAMPLER_REV`; the long-tail
benchmark times it from there.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
STATIC_SAMPLER_REV = "c749a6e"  # the last revision whose sampler decoded static batches (sampling._generate)


def import_revision(rev: str, workdir: str, name: str = "dapo_base"):
  """The `dapo_jax` package of git revision `rev`, importable as `name`."""
  try:
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "dapo_jax"], check=True, capture_output=True).stdout
  except subprocess.CalledProcessError as e:
    sys.exit(f"git archive {rev} dapo_jax failed: {e.stderr.decode().strip()} (benchmarks need a git checkout with "
             f"its history)")
  subprocess.run(["tar", "-x", "-C", workdir], input=tar, check=True)
  base = pathlib.Path(workdir, name)
  pathlib.Path(workdir, "dapo_jax").rename(base)
  for f in base.rglob("*.py"):
    f.write_text(re.sub(r"\bdapo_jax\b", name, f.read_text()))
  sys.path.insert(0, workdir)
  return importlib.import_module(name)


def generate_fn(package: str):
  """`generate(model, prompts, params, rng, num_samples=G)` of `package` (this tree's or a revision's): the
  engine's one-call form where the package has one, else its static sampler."""
  try:
    return importlib.import_module(f"{package}.engine").generate
  except ModuleNotFoundError:
    return importlib.import_module(f"{package}.sampling").generate
