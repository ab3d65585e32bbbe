"""The shape of the code: no import cycle among dapo_jax's modules, and nothing imports an entry point (the
CLIs `main`, `evaluate`, `export` are run, never imported: what they do lives in library modules)."""

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"dapo_jax.main", "dapo_jax.evaluate", "dapo_jax.export"}


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, package: str) -> set[str]:
  """Every dapo_jax module a source imports, at the top or inside a function ("from dapo_jax import x" counts
  x when x is a module)."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
      found.add(base)
      found |= {f"{base}.{a.name}" for a in node.names}
  modules = {_module_name(p) for p in (ROOT / "dapo_jax").rglob("*.py")}
  return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
  graph = {}
  for path in (ROOT / "dapo_jax").rglob("*.py"):
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    graph[name] = _imports(path.read_text(), package) - {name}
  return graph


def test_no_import_cycle_among_the_library_modules():
  graph = _graph()
  # A package's __init__ re-exporting its submodules is not a cycle of the code's design; drop those edges.
  edges = {m: {d for d in deps if not (d.startswith(m + ".") and (ROOT / m.replace(".", "/")).is_dir())}
           for m, deps in graph.items()}
  state, cycle = {}, []

  def visit(m, path):
    state[m] = "open"
    for d in sorted(edges.get(m, ())):
      if state.get(d) == "open":
        cycle.append(path[path.index(d):] + [d])
      elif d not in state:
        visit(d, path + [d])
    state[m] = "done"

  for m in sorted(edges):
    if m not in state:
      visit(m, [m])
  assert not cycle, f"import cycles: {cycle}"


def test_nothing_imports_an_entry_point():
  sources = [p for d in ("dapo_jax", "tests", "benchmarks", "launch", "configs") for p in (ROOT / d).rglob("*.py")]
  offenders = []
  for path in sources:
    package = _module_name(path).rsplit(".", 1)[0]
    if _imports(path.read_text(), package) & ENTRY_POINTS:
      offenders.append(str(path.relative_to(ROOT)))
  for nb in (ROOT / "notebooks").glob("*.ipynb"):
    code = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
    if _imports(code, "notebooks") & ENTRY_POINTS:
      offenders.append(str(nb.relative_to(ROOT)))
  assert not offenders, f"these import an entry point (move what they need into a library module): {offenders}"
