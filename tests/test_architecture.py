"""The package's layering: no import cycles, callbacks that do not know each other, small modules.

Every import is read from the source with :mod:`ast` (module-level and inside functions,
``TYPE_CHECKING`` blocks excepted), so a cycle hidden behind a function-level import fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "matsciml"
CALLBACKS = PACKAGE / "lightning" / "callbacks"

#: The callbacks package's layers that callback modules may import (helpers and base classes).
CALLBACK_SUPPORT = ("_utils", "_base")
#: Modules of the callbacks package that are not callbacks (the package's index and its builder).
CALLBACK_INDEX = ("__init__", "builder")

MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, level: int, module: str, is_package: bool) -> str:
    if level == 0:
        return name
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(module: str) -> set[str]:
    """The ``matsciml`` modules that ``module`` imports anywhere in its source."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, module, is_package)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out = set()
    for name in found:
        # ``import a.b.c`` imports a, a.b and a.b.c; the deepest known module is the edge.
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def _package_inits(module: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & set(MODULES)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or ``None``."""
    colour = dict.fromkeys(graph, 0)
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt, 0) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if colour.get(nxt, 0) == 0:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = 2
        return None

    for start in sorted(graph):
        if colour[start] == 0:
            cycle = dfs(start)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_relative_and_function_level_imports_are_seen():
    src = "def f():\n    from .periodic import PeriodicCallback\n"
    tree = ast.parse(src)
    node = tree.body[0].body[0]
    assert _resolve(node.module, node.level, "matsciml.lightning.callbacks.x", False) == (
        "matsciml.lightning.callbacks.periodic"
    )


def test_function_level_imports_are_edges_and_type_checking_ones_are_not(tmp_path, monkeypatch):
    fake = tmp_path / "fake.py"
    fake.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from matsciml.runner import cli\n"
        "def f():\n    from matsciml.registry import lookup\n    import matsciml.common.errors\n"
    )
    monkeypatch.setitem(MODULES, "matsciml.fake", fake)
    assert imports_of("matsciml.fake") == {"matsciml.registry", "matsciml.common.errors"}


def test_no_import_cycle_in_matsciml():
    """A module never needs itself, directly or through others (package ``__init__`` files included)."""
    graph = {m: imports_of(m) for m in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _callback_module(name: str) -> bool:
    prefix = "matsciml.lightning.callbacks."
    if not name.startswith(prefix):
        return False
    first = name[len(prefix) :].split(".")[0]
    return first not in CALLBACK_SUPPORT and first not in CALLBACK_INDEX


def test_no_callback_module_imports_another_callback_module():
    callbacks = [m for m in MODULES if _callback_module(m)]
    assert len(callbacks) > 10
    offenders = {
        m: sorted(i for i in imports_of(m) if _callback_module(i) or i == "matsciml.lightning.callbacks")
        for m in callbacks
    }
    offenders = {m: i for m, i in offenders.items() if i}
    assert not offenders, f"callback modules importing other callback modules: {offenders}"


def test_callback_support_layers_import_no_callback():
    support = [
        m for m in MODULES if m.startswith("matsciml.lightning.callbacks.") and m.split(".")[3] in CALLBACK_SUPPORT
    ]
    assert support
    offenders = {m: sorted(i for i in imports_of(m) if _callback_module(i)) for m in support}
    offenders = {m: i for m, i in offenders.items() if i}
    assert not offenders, f"helper or base modules importing callbacks: {offenders}"
    # and the helpers never import the base classes
    upward = {
        m: sorted(i for i in imports_of(m) if ".callbacks._base" in i) for m in support if ".callbacks._utils" in m
    }
    assert not {m: i for m, i in upward.items() if i}, upward


@pytest.mark.parametrize("path", sorted(MODULES.values()), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path):
    rel = str(path.relative_to(ROOT))
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{rel} has {lines} lines (at most {MAX_LINES}): split it by responsibility"
