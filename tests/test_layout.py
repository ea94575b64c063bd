"""The import layout of the house: ``pipelines/`` commands are leaves, and the module graph has no circle.

Every ``pipelines/*.py`` and ``rgnet/**/*.py`` is parsed with ``ast`` (nothing is imported), and every import is
read, at the top of a module or inside a function: a function-level import runs too, so it is part of the graph.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

from pipelines.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]

# Command modules: what ``rgnet <command>`` dispatches to (pipelines.cli.COMMANDS).
COMMAND_MODULES = frozenset(module for module, _ in COMMANDS.values())

# Edges allowed to close a circle, each with its reason (none today: an entry whose edge is gone fails the test).
ALLOWED_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [*(ROOT / "pipelines").glob("*.py"), *(ROOT / "rgnet").rglob("*.py")]
    return {_module_name(p): p for p in sorted(files)}


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``name`` imports (absolute names, with the line), wherever the import statement sits."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .m import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, node.lineno))
            # `from package import module` imports the module itself
            found += [
                (f"{base}.{alias.name}", node.lineno) for alias in node.names if f"{base}.{alias.name}" in MODULES
            ]
    return found


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of this tree: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        edges: dict[str, int] = {}
        for target, line in _imports(name, path):
            if target in MODULES and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _where(src: str, dst: str, graph: dict[str, dict[str, int]]) -> str:
    return f"{MODULES[src].relative_to(ROOT)}:{graph[src][dst]} imports {dst}"


def test_command_modules_exist() -> None:
    assert set(MODULES) >= COMMAND_MODULES, sorted(COMMAND_MODULES - set(MODULES))
    assert {"pipelines.train", "pipelines.bench", "pipelines.study"} <= COMMAND_MODULES


def _command_offences(graph: dict[str, dict[str, int]]) -> list[str]:
    return [
        _where(src, dst, graph)
        for src in sorted(COMMAND_MODULES & set(graph))
        for dst in sorted(graph[src])
        if dst in COMMAND_MODULES
    ]


def test_no_command_imports_another_command() -> None:
    offending = _command_offences(_graph())
    assert not offending, (
        "a command module imports another command module (move the shared code into a library module):\n  "
        + "\n  ".join(offending)
    )


def test_rgnet_imports_no_pipelines_ray_or_mlflow() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for name, path in MODULES.items()
        if name.startswith("rgnet")
        for target, line in _imports(name, path)
        if target.split(".")[0] in ("pipelines", "ray", "mlflow")
    ]
    assert not offending, "rgnet/ is plain PyTorch:\n  " + "\n  ".join(offending)


def _find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One circle of the graph (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_import_graph_has_no_cycle() -> None:
    graph = _graph()
    stale = sorted(f"{src} -> {dst}" for src, dst in ALLOWED_CYCLE_EDGES if dst not in graph.get(src, {}))
    assert not stale, f"ALLOWED_CYCLE_EDGES lists edges that are gone (remove them): {stale}"
    for src, dst in ALLOWED_CYCLE_EDGES:
        del graph[src][dst]
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle:\n  " + "\n  ".join(_where(a, b, graph) for a, b in itertools.pairwise(cycle))


def test_the_checks_catch_what_they_claim() -> None:
    """The checks fail on a planted circle and a planted command-to-command import (so a pass means something)."""
    assert _find_cycle({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": 1}, "b": {}, "d": {"a": 1}}) is None
    planted = {"pipelines.study": {"pipelines.tune": 7, "pipelines.sweep": 8}, "pipelines.sweep": {}}
    assert _command_offences(planted) == ["pipelines/study.py:7 imports pipelines.tune"]
    # a function-level `from pipelines import tune` is read as an import of the module pipelines.tune
    tree = ast.parse("def f():\n    from pipelines import tune\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert f"{node.module}.{node.names[0].name}" in MODULES


@pytest.mark.parametrize("module", sorted(COMMAND_MODULES))
def test_every_command_runs_as_a_module(module: str) -> None:
    """``python -m pipelines.X`` (what ``ray job submit`` runs) works for every command: a main and the guard."""
    source = MODULES[module].read_text()
    tree = ast.parse(source)
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), module
    assert 'if __name__ == "__main__":' in source, module
