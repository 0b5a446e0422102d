"""The package's import graph is its architecture (docs/design.md, Layout).

launchers -> {train loop, predict/evaluate, pretrain} -> {steps, runtime, checkpointing, data, reporting}
-> {models, losses, metrics}. Read from the source (every import statement, those inside functions too),
so that no lazy import slips a layer either, and in milliseconds: no module is executed.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "dsn_saal_jax"


def _modules() -> dict[str, str]:
  """{dotted module name: file} of every module of the package."""
  found = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
        found[rel.removesuffix(".__init__")] = os.path.join(folder, name)
  return found


def _graph() -> dict[str, set[str]]:
  """{module: the package's modules it imports}, a submodule's parent packages included (Python runs them)."""
  modules = _modules()

  def with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(modules)

  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for target in targets:
        if target.split(".")[0] == PACKAGE:
          edges |= with_parents(target)
    graph[name] = edges - {name}
  return graph


GRAPH = _graph()


def _closure(module: str) -> set[str]:
  seen, todo = set(), [module]
  while todo:
    for nxt in GRAPH[todo.pop()] - seen:
      seen.add(nxt)
      todo.append(nxt)
  return seen


TRAINER = {f"{PACKAGE}.train"}
MIDDLE = {f"{PACKAGE}.{m}" for m in ("steps", "runtime", "checkpointing", "reporting", "predict", "pretrain",
                                      "folder_eval")}


@pytest.mark.parametrize("module, forbidden", [
    # Inference stands beside training: reading a checkpoint to predict needs no trainer and no steps.
    ("predict", TRAINER | {f"{PACKAGE}.steps", f"{PACKAGE}.runtime"}),
    ("folder_eval", TRAINER | {f"{PACKAGE}.steps", f"{PACKAGE}.runtime"}),
    ("pretrain", TRAINER),
    # The middle layer knows nothing of the loop that drives it.
    ("steps", TRAINER | {f"{PACKAGE}.runtime", f"{PACKAGE}.checkpointing"}),
    ("runtime", TRAINER | {f"{PACKAGE}.steps", f"{PACKAGE}.checkpointing"}),
    ("checkpointing", TRAINER | {f"{PACKAGE}.steps", f"{PACKAGE}.runtime"}),
    ("reporting", TRAINER | {f"{PACKAGE}.steps", f"{PACKAGE}.runtime"}),
    ("data", TRAINER | MIDDLE),
    # The bottom: models, losses and metrics import nothing above them.
    ("models", TRAINER | MIDDLE),
    ("losses", TRAINER | MIDDLE),
    ("metrics", TRAINER | MIDDLE),
    ("optim", TRAINER | MIDDLE),
])
def test_a_module_imports_nothing_from_the_layers_above_it(module, forbidden):
  above = sorted(_closure(f"{PACKAGE}.{module}") & forbidden)
  assert not above, f"{PACKAGE}.{module} imports {above} (directly or through another module)"


def test_the_graph_reads_the_whole_package():
  """A check that cannot fail for want of modules: the ones named above exist and have imports."""
  assert {f"{PACKAGE}.{m}" for m in ("train", "steps", "runtime", "checkpointing", "predict")} <= set(GRAPH)
  assert f"{PACKAGE}.steps" in _closure(f"{PACKAGE}.train")
  assert f"{PACKAGE}.models" in _closure(f"{PACKAGE}.predict")
