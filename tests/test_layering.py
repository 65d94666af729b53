"""The package's floors (README, "Layout"): imports only go down, and no two files import each other.

Read from the source with ``ast`` (every import, those inside functions too), so the test sees the real graph
without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dreamstereo"

# Floor of each part of the package, lowest first. A module imports from lower floors, or from its own
# part (a package's modules use each other), never from a higher floor or a sibling part of its floor.
FLOORS = [
    # shared vocabulary, and the built-in toy models every part resolves by name (``toy``)
    {"dreamstereo", "dreamstereo.types", "dreamstereo.arrays", "dreamstereo.config", "dreamstereo.toy_models"},
    {"dreamstereo.stages", "dreamstereo.models"},  # pure functions over arrays, model definitions
    {"dreamstereo.io"},  # storage, shards, sample format, media
    {"dreamstereo.pipeline", "dreamstereo.training", "dreamstereo.inference"},  # the three parts
    {"dreamstereo.cli", "dreamstereo.pbdp", "dreamstereo.demo", "dreamstereo.warp_eval", "dreamstereo.scenes",
     "dreamstereo.report"},  # commands and tools built on them
]
# Within the root floor, the order matters too: types imports nothing of ours, config and toy_models only types.
ROOT_ORDER = ["dreamstereo", "dreamstereo.types", "dreamstereo.arrays", "dreamstereo.config", "dreamstereo.toy_models"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that ``name`` imports anywhere in its file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` needs a, a.b and a.b.c; the package __init__ files are empty floors of their own
            if target in modules and target != name:
                found.add(target)
    return found


def _floor(name: str) -> int:
    part = ".".join(name.split(".")[:2])
    for level, members in enumerate(FLOORS):
        if part in members:
            return level
    raise AssertionError(f"{name} belongs to no floor: add it to FLOORS in tests/test_layering.py")


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def test_every_module_has_a_floor():
    for name in GRAPH:
        _floor(name)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_only_go_down(name):
    here, part = _floor(name), ".".join(name.split(".")[:2])
    wrong = []
    for target in sorted(GRAPH[name]):
        there, target_part = _floor(target), ".".join(target.split(".")[:2])
        if target == "dreamstereo":  # the package itself: __version__
            continue
        if part == target_part:
            continue  # within one part (a subpackage, or one root module)
        if there > here or (there == here and here != 0 and here != len(FLOORS) - 1):
            wrong.append(target)  # upward, or sideways between the parts of one floor
        if here == 0 and there == 0 and ROOT_ORDER.index(target) > ROOT_ORDER.index(name):
            wrong.append(target)
    assert not wrong, f"{name} imports {wrong} (up or sideways; see FLOORS)"


def test_no_import_circles_between_files():
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert circles == []


def test_the_io_floor_and_stages_know_nothing_of_the_parts_above():
    """The concrete promise of the README: io/ is imported by pipeline/, training/ and inference/ and imports
    none of them; stages/ import no storage."""
    above = ("dreamstereo.pipeline", "dreamstereo.training", "dreamstereo.inference")
    for name, targets in GRAPH.items():
        if name.startswith(("dreamstereo.io", "dreamstereo.stages")):
            assert not [t for t in targets if t.startswith(above)], name
        if name.startswith("dreamstereo.stages"):
            assert not [t for t in targets if t.startswith("dreamstereo.io")], name
    users = {".".join(n.split(".")[:2]) for n, targets in GRAPH.items()
             if any(t.startswith("dreamstereo.io") for t in targets)}
    assert set(above) <= users
