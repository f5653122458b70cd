"""No import cycles inside `stackwise_jax/`.

The graph has one node per module (a package is its `__init__.py`) and an edge for every import of
a `stackwise_jax` module, at module level or inside a function (a lazy import still runs the other
module's top level, so it can close a cycle as well as a top-level one can). `import a.b.c` and
`from a.b import c` (with `c` a submodule) are imports of `a.b.c`, `from a.b import name` of `a.b`.

An import of `a.b.c` also runs the `__init__` of each package above it, and that is an edge too,
except for the packages that hold the importing module: those are already running or done when the
module runs (Python imports a parent before its child), so an edge to them would be a cycle of how
Python loads packages, not of the code's design. Hence every module's import of `stackwise_jax.x`
does not point at `stackwise_jax/__init__.py` (which imports the public API, and so nearly
everything), while `config` importing `stackwise_jax.data.tokenizer` does point at
`data/__init__.py` (which imports the pipeline).
"""
import ast
import pathlib
import sys

PACKAGE = "stackwise_jax"


def modules(root: pathlib.Path) -> dict:
  """Dotted module name → its source file, for every module of the package under `root`."""
  found = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    found[".".join(parts)] = path
  return found


def _packages_of(name: str) -> list:
  """`a.b.c` → [`a`, `a.b`]."""
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported(name: str, path: pathlib.Path, known: dict) -> set:
  """The package's modules that module `name` (at `path`) imports, anywhere in its source."""
  is_package = path.name == "__init__.py"
  targets = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:   # relative: from the module's own package, or its parents
        anchor = name.split(".")[:len(name.split(".")) - node.level + is_package]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        submodule = f"{base}.{alias.name}"
        targets.add(submodule if submodule in known else base)
  own = set(_packages_of(name)) | ({name} if is_package else set())
  edges = set()
  for target in targets:
    if target.split(".")[0] != PACKAGE:
      continue
    while target not in known:   # `import a.b.name` of something not a module: a.b
      target = target.rsplit(".", 1)[0]
    edges.update(p for p in _packages_of(target) + [target] if p not in own)
  edges.discard(name)
  return edges


def import_graph(root: pathlib.Path) -> dict:
  """Module → the package's modules it imports."""
  known = modules(root)
  return {name: imported(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict):
  """One cycle as a list of modules (its first module repeated at the end), or None."""
  state = {}   # absent: not visited; 1: on the current path; 2: done, no cycle through it

  def visit(node, path):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt, path)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node, [])
      if cycle:
        return cycle
  return None


REPO = pathlib.Path(__file__).resolve().parents[1]


def test_import_graph_sees_lazy_and_package_imports():
  graph = import_graph(REPO)
  assert "stackwise_jax.data.prepared" in graph["stackwise_jax.cli"]   # inside a function
  assert "stackwise_jax.progressive.trainer" in graph["stackwise_jax.progressive"]
  # Importing data.tokenizer from outside data/ runs data/__init__.py; from inside, it does not.
  assert "stackwise_jax.data" in graph["stackwise_jax.config"]
  assert "stackwise_jax.data" not in graph["stackwise_jax.data.pipeline"]
  assert "stackwise_jax" not in graph["stackwise_jax.config"]


def test_no_import_cycles():
  cycle = find_cycle(import_graph(REPO))
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_config_error_is_imported_from_errors_only():
  """ConfigError has one home, errors.py: no module takes it from another module that imports it."""
  elsewhere = []
  for name, path in modules(REPO).items():
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if (isinstance(node, ast.ImportFrom) and node.module != f"{PACKAGE}.errors"
          and any(alias.name == "ConfigError" for alias in node.names)):
        elsewhere.append(f"{name}: from {node.module} import ConfigError")
  assert not elsewhere


if __name__ == "__main__":   # python tests/test_imports.py [ROOT]: a cycle in ROOT's package, or None
  root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
  print(find_cycle(import_graph(root.resolve())))
