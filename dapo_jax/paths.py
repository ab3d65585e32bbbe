"""Where the checkout's files are, for entry points run from any directory; caches written whole."""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "default.py")


def make_configs_importable() -> None:
  """Config files import each other as `from configs import default`: with the checkout on the path that
  works whatever the current directory (`--config=/abs/path/to/configs/x.py` from anywhere)."""
  if (ROOT / "configs").is_dir() and str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def rename_into_place(own: Path, target: Path) -> bool:
  """Renames the folder `own`, written whole by one writer, to `target`: a cache that runs sharing it may build
  at once. When another writer's folder is already there (a non-empty directory is never replaced), removes
  `own` and returns False."""
  try:
    own.rename(target)
  except OSError:
    if not target.is_dir():
      raise
    shutil.rmtree(own, ignore_errors=True)
    return False
  return True
