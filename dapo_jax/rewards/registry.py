"""Named reward functions with one signature: `fn(solution_str, ground_truth, **extra) -> dict` holding at
least "score" (float) and "acc" (bool); "pred" (str) when the function extracts an answer.

    @register("my_reward")
    def my_reward(solution_str, ground_truth, **extra): ...

A reward runs in worker processes (`executor.py`), so it must be a module-level function in an importable
module; `get("package.module:function")` also finds one that was never registered.
"""

from __future__ import annotations

import importlib
from typing import Callable

RewardFn = Callable[..., dict]
_REGISTRY: dict[str, RewardFn] = {}


def register(name: str):
  def wrap(fn: RewardFn) -> RewardFn:
    if name in _REGISTRY and _REGISTRY[name] is not fn:
      raise ValueError(f"reward {name!r} is already registered (to {_REGISTRY[name].__module__})")
    _REGISTRY[name] = fn
    return fn
  return wrap


def get(name: str) -> RewardFn:
  if name in _REGISTRY:
    return _REGISTRY[name]
  if ":" in name:
    module, _, attr = name.partition(":")
    try:
      return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      raise KeyError(f"reward {name!r}: cannot import {attr!r} from {module!r}: {e}") from None
  raise KeyError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)} (or give 'module:function')")


def names() -> list[str]:
  return sorted(_REGISTRY)
