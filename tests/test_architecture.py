"""The package's import graph: no cycles (function-level imports included) and every import
between layers points down, so the folder tree is the architecture."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("blackbox_sat", "surrogates")
#: Layers from the bottom up; a module may import its own layer or lower ones.
LAYERS = ("sim", "devices", "data", "optim", "training", "methods", "harness", "cli", "__init__")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def import_graph() -> nx.DiGraph:
    """Edges ``a -> b`` for every import of module ``b`` anywhere in module ``a``."""
    mods = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[: len(up) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                # ``from pkg import mod`` imports the module ``pkg.mod``; otherwise ``pkg`` itself.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            for t in targets:
                while t and t not in mods:  # ``import a.b.c`` of a non-module attribute path
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph.add_edge(name, t)
    return graph


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "blackbox_sat":
        return None
    key = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS.index(key)


def test_the_import_graph_has_no_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_imports_point_down_the_layers():
    wrong = [
        (a, b)
        for a, b in import_graph().edges
        if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)
    ]
    assert not wrong, f"imports that point up a layer: {wrong}"


def test_surrogates_know_nothing_of_devices_or_training():
    wrong = [
        (a, b)
        for a, b in import_graph().edges
        if a.startswith("surrogates") and b.startswith("blackbox_sat")
    ]
    assert not wrong, wrong


def test_the_graph_sees_function_level_imports(tmp_path, monkeypatch):
    """The walker finds an import inside a function body: a cycle hidden there cannot pass."""
    graph = import_graph()
    assert graph.has_edge(
        "blackbox_sat.cli", "blackbox_sat.harness.run"
    )  # lazily imported in main()


@pytest.mark.parametrize(
    "folder",
    [p.name for p in (ROOT / "blackbox_sat").iterdir() if p.is_dir() and p.name != "__pycache__"],
)
def test_every_folder_is_a_known_layer(folder):
    assert folder in LAYERS
