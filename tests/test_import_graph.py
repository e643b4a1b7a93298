"""The packages' import structure, read from the source with ``ast`` (nothing is imported):

- no import cycle among the modules of ``kernels/`` and ``autotune/`` (a module never imports
  one that imports it back, directly or through others), counting every import statement of
  a module, at module level or inside a function, absolute or relative;
- outside ``kernels/``, only its public modules and names are imported (tests may reach in).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "autotune")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Every module of :data:`PACKAGES` by dotted name (a package by its ``__init__``)."""
    return {
        _module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that runs (``if TYPE_CHECKING:`` blocks never do)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, str | None]]:
    """``(module, name)`` for each import in ``path`` (the module ``module``): the module a
    statement loads, and the name it takes from it (None for a submodule or ``import x``).
    ``from a import b`` loads ``a.b`` when that is a module in ``known``, else ``a``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            yield (sub, None) if sub in known else (base, alias.name)


def import_graph() -> dict[str, set[str]]:
    """Edges between the modules of :data:`PACKAGES` (imports of other modules left out)."""
    modules = _modules()
    known = set(modules)
    return {
        module: {target for target, _ in imported(module, path, known) if target in known}
        for module, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_relative_and_function_level_imports_are_edges(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    source = (
        "from . import sub, NAME\nfrom .sub import x\n"
        "def f():\n    from .. import top\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import hidden\n"
    )
    (pkg / "mod.py").write_text(source)
    found = set(imported("top.pkg.mod", pkg / "mod.py", {"top.pkg.sub"}))
    assert found == {
        ("top.pkg.sub", None),
        ("top.pkg", "NAME"),
        ("top.pkg.sub", "x"),
        ("top", "top"),
        ("typing", "TYPE_CHECKING"),
    }


@pytest.mark.parametrize("package", ["kernels", "autotune"])
def test_no_import_cycle(package):
    graph = import_graph()
    inside = {m: {t for t in ts if t.split(".")[0] == package} for m, ts in graph.items()}
    cycle = find_cycle({m: ts for m, ts in inside.items() if m.split(".")[0] == package})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _private(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split("."))


@pytest.mark.parametrize("directory", ["autotune", "benchmarks"])
def test_only_public_kernels_names_outside_kernels(directory):
    known = set(_modules())
    faults = []
    for path in sorted((ROOT / directory).rglob("*.py")):
        module = _module_name(path)
        for target, name in imported(module, path, known):
            if target.split(".")[0] != "kernels":
                continue
            if _private(target) or (name is not None and name.startswith("_")):
                shown = target if name is None else f"{target}.{name}"
                faults.append(f"{path.relative_to(ROOT)} imports {shown}")
    assert not faults, "private kernels names imported:\n" + "\n".join(faults)


def _top_level_names(path: Path) -> set[str]:
    """Names a module may bind at its top level: definitions, assignments and imports, those
    inside top-level ``if``/``try`` blocks included (nested function bodies are not walked)."""
    names: set[str] = set()
    stack = list(ast.parse(path.read_text(), str(path)).body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            stack.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)
    return names


@pytest.mark.parametrize("directory", ["autotune", "benchmarks", "tests", "kernels"])
def test_imports_of_our_packages_resolve(directory):
    """Every module and name taken from ``kernels`` or ``autotune`` exists (a script that no
    test runs still fails here when a module it imports moved)."""
    modules = _modules()
    known = set(modules)
    faults = []
    for path in sorted((ROOT / directory).rglob("*.py")):
        for target, name in imported(_module_name(path), path, known):
            if target.split(".")[0] not in PACKAGES:
                continue
            if target not in known:
                faults.append(f"{path.relative_to(ROOT)} imports the missing module {target}")
            elif name not in (None, "*") and name not in _top_level_names(modules[target]):
                faults.append(f"{path.relative_to(ROOT)} imports {target}.{name}: not defined")
    assert not faults, "\n".join(faults)
