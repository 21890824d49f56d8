"""No import circles in the package: each module's imports, read with ``ast``, form a graph
without a cycle (docs/design.md, "Layout").

Two graphs are checked. The *module-level* graph has the imports that run when a module is
loaded. The *runtime* graph adds the imports written inside functions: a circle hidden behind a
deferred import still ties two modules together (neither can be read or moved without the
other). Imports under ``if TYPE_CHECKING:`` are left out of both: they never run.

Rerun by hand with ``python tests/test_import_graph.py`` (prints every circle it finds).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "tokengate"
SRC = Path(__file__).resolve().parent.parent / "src" / PACKAGE


def module_names(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package is its ``__init__``)."""
    names = {}
    for path in sorted(src.rglob("*.py")):
        parts = [package, *path.relative_to(src).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, *, deferred: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run: not those under ``if TYPE_CHECKING:``; those inside a
    function or class body only if ``deferred``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), deferred=deferred)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            if deferred:
                yield from _imports(node, deferred=deferred)
        else:
            yield from _imports(node, deferred=deferred)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_graph(*, deferred: bool) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (an imported submodule counts as itself)."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges: set[str] = set()
        for node in _imports(tree, deferred=deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(name, is_package, node)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan), as a path
    ``a -> b -> ... -> a``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.add(item)
                if item == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_a_cycle_in(graph, component) for component in components]


def _a_cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``component`` (breadth first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in {component}")  # pragma: no cover - Tarjan found one


def describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_import_circle_at_module_level() -> None:
    cycles = find_cycles(import_graph(deferred=False))
    assert not cycles, f"import circles (module-level imports):\n{describe(cycles)}"


def test_no_import_circle_through_deferred_imports() -> None:
    cycles = find_cycles(import_graph(deferred=True))
    assert not cycles, f"import circles (counting imports inside functions):\n{describe(cycles)}"


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or not."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_bench_task_bodies_are_a_leaf() -> None:
    """Worker processes unpickle the bench bodies by reference: importing them loads nothing
    else of tokengate (no scenario module, no runtime)."""
    graph = import_graph(deferred=True)
    assert graph["tokengate.bench._bodies"] == set()


def test_the_dask_protocol_imports_neither_side() -> None:
    """The Dask client side and worker side share ``_dask_protocol``; it reaches neither of
    them, nor the coordinator."""
    graph = import_graph(deferred=True)
    reached = reachable(graph, "tokengate.backends._dask_protocol")
    sides = {
        "tokengate.backends._dask",
        "tokengate.backends._dask_runner",
        "tokengate.backends._dask_task",
        "tokengate._coordinator",
    }
    assert not reached & sides, f"_dask_protocol imports {sorted(reached & sides)}"
    # and the runner, which both sides use, never imports the worker side
    assert "tokengate.backends._dask_task" not in reachable(
        graph, "tokengate.backends._dask_runner"
    )


def test_the_check_finds_a_circle() -> None:
    """The check itself: a two-module and a three-module circle are found and named."""
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set(), "x": {"y"}, "y": {"z"}, "z": {"x"}}
    assert sorted(map(tuple, find_cycles(graph))) == [("a", "b", "a"), ("x", "y", "z", "x")]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


if __name__ == "__main__":
    found = False
    for label, deferred in (("module-level", False), ("with deferred imports", True)):
        cycles = find_cycles(import_graph(deferred=deferred))
        print(f"{label}: {len(cycles)} circle(s)")
        if cycles:
            found = True
            print(describe(cycles))
    sys.exit(1 if found else 0)
