"""Where the checkout's files are, for entry points run from any directory."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "default.py")


def make_configs_importable() -> None:
  """Config files import each other as `from configs import default`: with the checkout on the path that
  works whatever the current directory (`--config=/abs/path/to/configs/x.py` from anywhere)."""
  if (ROOT / "configs").is_dir() and str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
