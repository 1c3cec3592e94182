"""The package's shape (docs/ARCHITECTURE.md): its parts import downwards only, no two
modules import each other even through others, nothing imports the benchmarks, and no
module grows past what a reader holds in their head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flix"
MAX_LINES = 300
# Lowest first: a module may import its own layer and the layers below it, never above.
LAYERS = [
    ("base: files, features", ("flix.io", "flix.lock", "flix.features")),
    (
        "library",
        (
            "flix",
            "flix.kernels",
            "flix.layer",
            "flix.routing",
            "flix.config",
            "flix.targets",
            "flix.model",
            "flix.export",
            "flix.collator",
            "flix.optim",
            "flix.loss",
            "flix.packing",
            "flix.attention",
            "flix.fused",
        ),
    ),
    ("base models", ("flix.base_models",)),
    ("data and metrics", ("flix.data", "flix.metrics")),
    ("run records", ("flix.record",)),
    ("report", ("flix.report",)),
    ("pipeline", ("flix.pipeline",)),
    ("serving", ("flix.serve",)),
    ("entry points", ("flix.cli", "flix.train", "flix.__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The highest layer whose prefix names the module (the package `flix` alone is the library's)."""
    found = [i for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if module == p or (p != "flix" and module.startswith(p + "."))]
    assert found, f"{module}: in no layer of tests/test_architecture.py LAYERS (and docs/ARCHITECTURE.md): place it"
    return max(found)


def imports(module: str) -> set[str]:
    """flix modules `module` imports, at the top or inside functions (`from flix import x`
    is flix.x when x is a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # flix.record.write.thing -> flix.record.write
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_arrow_points_down():
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
        for m, targets in GRAPH.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    """Tarjan's strongly connected components: any with two or more modules is a circle."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                circles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_package_never_imports_the_benchmarks():
    offenders = [
        m
        for m, p in MODULES.items()
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "benchmarks" in ast.unparse(n) for n in ast.walk(ast.parse(p.read_text())))
    ]
    assert not offenders


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_longer_than_a_reader_holds(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]}: {lines} lines; split it by job (at most {MAX_LINES})"


def test_the_schema_allows_the_library_s_dropout_modes():
    from flix.config import DROPOUT_MODES
    from flix.pipeline import schema

    assert schema.DROPOUT_MODES == DROPOUT_MODES
