"""Checkpoint failures in a fresh process, for the tests that read what it prints:
`python -m tests.checkpoint_failures corrupt|full DIR`."""

import resource
import signal
import sys
from pathlib import Path

import jax.numpy as jnp
import jax

from dapo_jax import checkpoint as ckpt_lib

# Many arrays: a failed read or write leaves many of tensorstore's operations in flight.
TREE = {f"w{i}": jnp.full((64, 256), float(i)) for i in range(96)}


def corrupt(directory: Path):
  ck = ckpt_lib.Checkpointer(directory, max_to_keep=3, asynchronous=True)
  for step in (1, 2):
    ck.save(step, TREE, {"data": {"index": step}, "carry": []})
  ck.close()
  for f in (directory / "2" / "state" / "d").iterdir():  # the data files orbax finalised into one folder
    f.write_bytes(f.read_bytes()[:100])
  ck = ckpt_lib.Checkpointer(directory, max_to_keep=3)
  step, _, _ = ck.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), TREE))
  ck.close()
  print(f"restored step {step}", flush=True)


def full(directory: Path):
  ck = ckpt_lib.Checkpointer(directory, max_to_keep=3, asynchronous=True)
  ck.save(1, {"w": jnp.ones(4)}, {"data": {"index": 1}, "carry": []}, wait=True)
  # Files may grow to 4 KiB from here on: the next save's writes fail as on a full disk (EFBIG, not ENOSPC).
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 12, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  ck.save(2, TREE, {"data": {"index": 2}, "carry": []})
  ck.close()


if __name__ == "__main__":
  {"corrupt": corrupt, "full": full}[sys.argv[1]](Path(sys.argv[2]))
