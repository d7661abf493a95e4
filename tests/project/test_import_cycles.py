"""No import circles inside a package: each package's modules form a graph without cycles, read from
the source (every import, lazy ones inside functions included: a lazy import hides a circle from
the interpreter, not from a reader). A planted circle in a throwaway package shows the check bites."""
import ast
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGES = ("specs", "storage", "crds", "model", "gateways", "stages", "training", "serving", "monitoring",
            "deployment", "components", "pipelines")


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGE under ROOT (a package is its __init__)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may refer to: a module, or a module and a name in it."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (anywhere in its body)."""
    modules = modules_of(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, name, is_package):
                # `from a.b import c`: the module a.b.c when there is one, else a.b (c is a name in it)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component with more than one module, as a closed path
    (Tarjan's algorithm; the path is a walk inside the component back to its first module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_closed_path(graph, set(c), c[0]) for c in components]


def _closed_path(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest path from START back to itself through MEMBERS (breadth first)."""
    paths = [[start]]
    seen = {start}
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph[path[-1]] & members):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    raise AssertionError(f"no circle through {start}")  # a strongly connected component always has one


def circles(root: Path, packages) -> list[str]:
    return [" -> ".join(cycle) for package in packages for cycle in cycles(import_graph(root, package))]


def test_no_package_has_an_import_circle():
    assert circles(ROOT, PACKAGES) == []


def test_a_planted_circle_is_named(tmp_path):
    # Given a package whose module a imports b, b imports c, and c imports a lazily inside a function
    package = tmp_path / "planted"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from planted.sub import b\n")
    (package / "sub" / "b.py").write_text("from ..c import helper\n")
    (package / "c.py").write_text("def helper():\n    import planted.a\n")
    (package / "d.py").write_text("from planted import a\n")  # into the circle, not part of it
    # When the check runs, Then it names the circle, module by module
    assert circles(tmp_path, ["planted"]) == ["planted.a -> planted.sub.b -> planted.c -> planted.a"]


@pytest.mark.parametrize("source, imported", [
    ("from planted import c", "planted.c"),
    ("from planted.c import helper", "planted.c"),
    ("from . import c", "planted.c"),
    ("import planted.c", "planted.c"),
    ("from planted import VALUE", "planted"),
    ("from planted import c, VALUE", "planted.c planted"),
])
def test_import_forms_resolve_to_modules(tmp_path, source, imported):
    package = tmp_path / "planted"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "c.py").write_text("def helper():\n    pass\n")
    (package / "a.py").write_text(source + "\n")
    assert import_graph(tmp_path, "planted")["planted.a"] == set(imported.split())
