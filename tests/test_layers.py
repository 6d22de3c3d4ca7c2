"""The import structure: layers only import downwards, and no modules import each other in a
circle (docs/architecture.md). Read from the source with ``ast``, local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Package -> layer. A module may import its own package and any package of a lower layer;
#: packages on one layer do not import each other (build tools and the pipeline sit side by
#: side on the runners; the leaves are independent).
LAYERS = {
    "common": 0,
    "models": 1,
    "preprocess": 2,
    "infer": 3,
    "pipeline": 4,
    "convert": 4,
    "eval": 5,
    "serve": 6,
    "train": 6,
    "ocr": 6,
    "bench": 7,
}
#: ``bench`` measures the leaves (it starts the service), so it sits above them.


def _modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def imports_of(path: Path) -> set[str]:
    """The project modules ``path`` imports: ``from a.b import c`` names ``a.b.c`` when that
    is a module, else ``a.b``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES
                     else node.module for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    return found


GRAPH = {module: imports_of(path) - {module} for module, path in MODULES.items()}


def test_every_package_imports_only_its_own_layer_and_below():
    wrong = []
    for module, targets in GRAPH.items():
        package = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != package and LAYERS[other] >= LAYERS[package]:
                wrong.append(f"{module} imports {target} ({package} is layer {LAYERS[package]}, "
                             f"{other} layer {LAYERS[other]})")
    assert not wrong, "\n".join(sorted(wrong))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member (import circles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_modules_import_each_other_in_a_circle():
    assert strongly_connected(GRAPH) == []


def test_the_circle_check_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", ["common", "models"])
def test_the_ground_floor_imports_no_engine_at_module_level(package):
    # models/ and common/ describe files; onnxruntime, ais_bench and the service's stack load
    # only where a runner or a tool needs them.
    engines = {"onnxruntime", "ais_bench", "fastapi", "uvicorn", "ray", "grpc"}
    for module, path in MODULES.items():
        if not module.startswith(package):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            if isinstance(node, ast.Import):
                top = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                top = {node.module.split(".")[0]}
            else:
                continue
            assert not top & engines, f"{module} imports {top & engines} at module level"
