"""jdq's packages import one way only: each from the layers below it (README, "Layout").

Every ``import`` / ``from ... import`` in ``jdq/`` counts, at module level or inside a function
(a lazy import is still a dependency). There is no list of exceptions.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jdq"

#: The layers, lowest first. A package may import packages of strictly lower layers (and itself).
LAYERS = (
    ("io", "sharding", "tree"),  # utilities: nothing of jdq
    ("formats",),
    ("quant",),
    ("kernels",),
    ("models",),
    ("sampling",),
    ("recipes", "metrics", "hw"),
    ("demo",),
    ("sweep",),
    ("cli",),
)
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """``(line, imported module)`` for every import in ``path``, relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield node.lineno, target
            for alias in node.names:  # ``from jdq import quant``, ``from . import uniform``: may name modules
                yield node.lineno, f"{target}.{alias.name}"


def _package(module: str) -> str | None:
    """The top-level jdq package (``jdq.quant.casts`` -> ``quant``); ``None`` for ``jdq`` itself / not jdq."""
    parts = module.split(".")
    return parts[1] if parts[0] == "jdq" and len(parts) > 1 else None


FILES = sorted(p for p in ROOT.rglob("*.py") if p.parent != ROOT or p.name != "__init__.py")


def test_every_package_has_a_layer():
    packages = {_package(_module_name(p)) for p in FILES}
    missing = sorted(packages - set(RANK))
    assert not missing, f"jdq packages {missing} are in no layer: add them to LAYERS here and to the README's layout"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_point_down(path):
    here = _package(_module_name(path))
    wrong = []
    for line, target in _imports(path):
        there = _package(target)
        if there is None or there == here or there not in RANK:
            continue
        if RANK[there] >= RANK[here]:
            wrong.append(f"line {line}: imports jdq.{there} (layer {RANK[there]}) from jdq.{here} (layer {RANK[here]})")
    assert not wrong, f"{path.relative_to(ROOT.parent)} imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules():
    """No circle of imports between the modules of jdq, lazy imports included (inside a package too)."""
    modules = {_module_name(p): p for p in FILES}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for _, target in _imports(path):
            # ``from jdq.quant import cast`` depends on jdq.quant; ``jdq.quant.casts`` on that module
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    # a package's __init__ re-exporting its submodules is its face, not a dependency of them:
    # drop edges from a submodule to its own package's __init__
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _mentions_family(node) -> bool:
    return (isinstance(node, ast.Name) and node.id == "family") or (isinstance(node, ast.Attribute) and node.attr == "family")


@pytest.mark.parametrize("path", [p for p in FILES if "models" not in p.relative_to(ROOT).parts[:1]],
                         ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_family_comparisons_outside_models(path):
    """A family's conventions live in its spec (jdq.models.spec): nothing outside jdq/models branches on its name."""
    found = [node.lineno for node in ast.walk(ast.parse(path.read_text(), str(path)))
             if isinstance(node, ast.Compare) and any(_mentions_family(n) for n in [node.left, *node.comparators])]
    assert not found, f"{path.relative_to(ROOT.parent)} compares a model family at lines {found}; read its FamilySpec"
