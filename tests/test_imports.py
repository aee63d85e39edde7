"""No import cycle among the modules of prefix_kernels.

Every ``.py`` file of the package is parsed with ``ast`` (nothing is imported). Its imports are the edges
of a graph: module-level imports and the imports inside functions and methods alike (a lazy import still
ties two modules together), absolute (``import prefix_kernels.x``, ``from prefix_kernels.x import y``) and
relative (``from ..x import y``); imports under ``if TYPE_CHECKING:`` are left out, as they never run.
``from package import name`` is an edge to ``package.name`` when that is a module, else to the package's
``__init__``. Importing a submodule also runs its parents' ``__init__`` files, so an import of ``a.b.c`` is an
edge to ``a.b`` and ``a`` as well, except to the packages the importing module itself lies in (their
``__init__`` has already started by the time it runs). That is how ``prefix_kernels/backends.py`` importing
``ops.attention.inputs`` closed a cycle with ``ops/attention/__init__.py`` importing it back.

A cycle is a strongly connected component of more than one module.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import prefix_kernels

ROOT = pathlib.Path(prefix_kernels.__file__).parent

# Cycles inside these packages are being untangled on another branch (issue 13, item 4). They are reported,
# not failed. The coordinator empties this list after that branch is merged.
KNOWN_PENDING: tuple[str, ...] = ()


def module_names(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file under ``root`` (``__init__`` names its package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([package, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: pathlib.Path, package: str) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line of the first such import}."""
    modules = module_names(root, package)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        # The packages this module lies in (itself too, for an __init__): already initialising when it runs.
        inside = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}

        def add(target, line, edges=edges, inside=inside):
            while target and target not in modules:  # `import a.b.c` of a name in a.b: the module a.b
                target = target.rpartition(".")[0]
            while target and target not in inside:  # the module, then the parents whose __init__ it runs
                edges.setdefault(target, line)
                target = target.rpartition(".")[0]

        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        add(alias.name, node.lineno)
                continue
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base != package and not base.startswith(package + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components that are cycles (Tarjan's algorithm), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], graph) -> str:
    members = set(component)
    lines = [f"  {a} -> {b} (line {graph[a][b]})" for a in component for b in sorted(graph[a]) if b in members]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(lines)


def _pending(component: list[str]) -> bool:
    return all(any(m == p or m.startswith(p + ".") for p in KNOWN_PENDING) for m in component)


def test_no_import_cycle_in_the_package():
    graph = import_graph(ROOT, "prefix_kernels")
    assert "prefix_kernels.ops.attention.backends" in graph  # the walk found the package
    found = cycles(graph)
    failing = [c for c in found if not _pending(c)]
    assert not failing, "\n".join(describe(c, graph) for c in failing)
    pending = [c for c in found if _pending(c)]
    if pending:
        print("known pending cycles (integrations, another branch):\n" + "\n".join(describe(c, graph) for c in pending))


def test_known_pending_cycles_still_exist():
    """When the integrations branch has removed its cycles, KNOWN_PENDING must be emptied (this fails then)."""
    graph = import_graph(ROOT, "prefix_kernels")
    pending_left = {p for c in cycles(graph) if _pending(c) for m in c for p in KNOWN_PENDING
                    if m == p or m.startswith(p + ".")}
    stale = [p for p in KNOWN_PENDING if p not in pending_left]
    if stale and KNOWN_PENDING:
        pytest.fail(f"no import cycle is left under {stale}: remove them from KNOWN_PENDING in tests/test_imports.py")


def test_the_checker_finds_relative_absolute_and_function_level_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..b import g\n    return g\n")  # function-level, relative
    (pkg / "b.py").write_text("import pkg.sub.a\n\ndef g():\n    pass\n")  # absolute
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n")
    (pkg / "d.py").write_text("from pkg import c\nfrom .sub import a\n")  # no cycle: c does not import d
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.a": 1}
    assert graph["pkg.c"] == {}
    assert graph["pkg.d"] == {"pkg.c": 1, "pkg.sub.a": 2, "pkg.sub": 2}  # importing sub.a runs sub/__init__
    assert cycles(graph) == [["pkg.b", "pkg.sub", "pkg.sub.a"]]
