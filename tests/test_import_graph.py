"""The project's import graph, read from the source (AST), not by importing it.

Three rules:
- no cycle between modules, counting every import (module level and inside functions);
- the base layer (``adaface_jax.errors``, ``adaface_jax.io``) imports nothing else of the project, and the data
  layer (``data_pipeline``) and the protocols (``evaluation``) import nothing of ``adaface_jax`` but the base layer:
  they never pull in the model package. ``data_pipeline`` does not import ``evaluation``;
- ``import adaface_jax`` itself imports nothing of the project (its public names are lazy), so importing the base
  layer loads two small modules, not the models.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("adaface_jax", "data_pipeline", "evaluation", "configs")
BASE = {"adaface_jax.errors", "adaface_jax.io"}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported_names(path: pathlib.Path, name: str) -> set[tuple[str, ...]]:
    """Every import of ``path`` as ``(module,)`` for ``import module`` or ``(base, name)`` for
    ``from base import name`` (absolute: relative imports resolved against ``name``), inside functions too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update((alias.name,) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.update((base, alias.name) for alias in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports. ``from pkg import sub`` names the submodule ``pkg.sub`` when there
    is one (as import-linter reads it), else ``pkg``; a dotted name resolves to the longest module it names."""
    modules = project_modules()

    def resolve(dotted):
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
        return None

    graph = {}
    for name, path in modules.items():
        edges = set()
        for imp in imported_names(path, name):
            target = resolve(".".join(imp)) if len(imp) == 1 or f"{imp[0]}.{imp[1]}" in modules else resolve(imp[0])
            if target is not None and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def package_imports_are_lazy() -> set[str]:
    return import_graph()["adaface_jax"]


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("source, expected", [
    ("from adaface_jax import io", {("adaface_jax", "io")}),
    ("from . import io", {("adaface_jax", "io")}),
    ("from .io import atomic_write", {("adaface_jax.io", "atomic_write")}),
    ("def f():\n    import data_pipeline.manifest as m", {("data_pipeline.manifest",)}),
])
def test_imports_are_read_inside_functions_and_relative_ones_resolved(tmp_path, source, expected):
    path = tmp_path / "mod.py"
    path.write_text(source)
    assert imported_names(path, "adaface_jax.mod") == expected


def test_the_base_layer_imports_nothing_else_of_the_project():
    graph = import_graph()
    for module in BASE:
        assert graph[module] <= BASE | {"adaface_jax"}, (module, graph[module] - BASE)


@pytest.mark.parametrize("package", ["data_pipeline", "evaluation"])
def test_data_and_evaluation_use_only_the_base_layer_of_adaface_jax(package):
    graph = import_graph()
    offending = {(m, dep) for m, deps in graph.items() if m == package or m.startswith(package + ".")
                 for dep in deps if dep.startswith("adaface_jax") and dep not in BASE | {"adaface_jax"}}
    assert offending == set()
    if package == "data_pipeline":
        assert not {(m, d) for m, deps in graph.items() if m.startswith("data_pipeline")
                    for d in deps if d.startswith("evaluation")}


def test_importing_the_package_loads_nothing_of_the_project():
    # `from adaface_jax import io` runs adaface_jax/__init__.py first: it must stay free of project imports.
    assert package_imports_are_lazy() == set()
