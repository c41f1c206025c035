"""The package's shape: no import cycles between its modules, and no overlong functions.

Both are read from the source with :mod:`ast` (nothing is imported), so a cycle hidden in a function-local
import counts as much as one at module top.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nucseg"
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    """Dotted module name of a file of the package (``nucseg.train.fit``; a package is its ``__init__``)."""
    parts = ("nucseg",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package, parsed, by dotted name."""
    return {module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """Absolute module of a ``from ... import`` in module ``name`` (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    # In a package's __init__, "." is the package itself; in a module, its parent.
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(name: str, path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in it (function bodies included).

    ``from pkg import mod`` counts as importing ``pkg.mod`` when that is a module, else ``pkg``.
    """
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node, name, is_package)
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            # "import nucseg.train.fit" also runs nucseg.train: the longest known prefix is what is imported.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    parsed = modules()
    known = set(parsed)
    return {name: imported_modules(name, path, tree, known) for name, (path, tree) in parsed.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_package_modules():
    graph = import_graph()
    assert "nucseg.io" in graph["nucseg.model"]            # from .io import ...
    assert "nucseg.train.params" in graph["nucseg.train"]  # from .params import ... in __init__
    assert "nucseg.model" in graph["nucseg.train.fit"]     # from ..model import ...


def test_no_import_cycle_between_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``module:line name (n lines)`` of every function longer than ``limit`` lines, def line to body end."""
    out = []
    for name, (_, tree) in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{name}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_longer_than_the_limit():
    too_long = long_functions()
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(too_long)


def callers_of(function: str) -> set[str]:
    """Modules of the package whose code calls ``function`` by its bare or attribute name."""
    found = set()
    for name, (_, tree) in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                if (f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)) == function:
                    found.add(name)
    return found


def test_one_inference_path_from_network_output_to_instances():
    """Segment, evaluate, QC and the self-training reach the instance extraction only through
    nucseg.inference, so the gate and the extraction cannot drift apart between them."""
    assert callers_of("extract_instances") == {"nucseg.inference"}
    users = callers_of("image_instances") | callers_of("segment_images")
    assert {"nucseg.segment", "nucseg.evaluate", "nucseg.qc", "nucseg.train.pseudo"} <= users


def test_local_imports_say_why():
    """Imports sit at module top; one inside a function (a heavy or optional dependency) says why on its line."""
    silent = []
    for name, (path, tree) in modules().items():
        lines = path.read_text().splitlines()
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and "#" not in lines[node.lineno - 1]:
                        silent.append(f"{name}:{node.lineno} {lines[node.lineno - 1].strip()}")
    assert not silent, "function-local imports without a reason: " + "; ".join(silent)
