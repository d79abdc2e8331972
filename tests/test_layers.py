"""The layers of DESIGN.md hold: imports between tinylm's modules form no cycle (lazy imports inside functions count:
a cycle that only a lazy import breaks is still one), nothing outside `training/` reaches into the trainer, and the
model, data, tokenizers and sampling load without the command line's recipe parser (jsonargparse)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tinylm

PACKAGE = Path(tinylm.__file__).resolve().parent
# The API entry points: they expose `tinylm.train` (the pipeline: its stages), so they may import the trainer.
TRAINING_IMPORTERS = {"tinylm", "tinylm.cli", "tinylm.pipeline"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The tinylm modules `name` imports anywhere in its file, at the top or inside a function. `from a import b`
    imports a.b when that is a module, else the package a (whose __init__ defines b)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_import_graph_sees_lazy_imports_and_finds_cycles():
    assert "tinylm.recipes" in GRAPH["tinylm.cli"] and "tinylm.model.presets" in GRAPH["tinylm.recipes"]
    assert "tinylm.hf" in GRAPH["tinylm.cli"]  # imported inside run_export
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_tinylm_modules():
    found = cycles(GRAPH)
    edges = [f"{a} -> {b}" for component in found for a in component for b in sorted(GRAPH[a]) if b in component]
    assert not found, "import cycles: " + "; ".join(edges)


def test_only_training_and_the_api_entry_points_import_training():
    reaching_in = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if not name.startswith("tinylm.training") and name not in TRAINING_IMPORTERS
        for target in sorted(targets)
        if target.startswith("tinylm.training")
    ]
    assert not reaching_in, "outside training/, these import it: " + "; ".join(reaching_in)


@pytest.mark.parametrize(
    "module",
    [
        "tinylm.config",
        "tinylm.model.gpt",
        "tinylm.model",
        "tinylm.tokenizers",
        "tinylm.data.prepare",
        "tinylm.generate",
    ],
)
def test_the_model_data_and_sampling_load_without_the_recipe_parser(module):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    check = f"import {module}, sys; assert 'jsonargparse' not in sys.modules, 'jsonargparse was imported'"
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# docs/architecture.md's layers, deepest first; a module may import its own layer and those below, never above.
LAYERS = [
    ["tinylm.errors"],
    ["tinylm.runs", "tinylm.device"],
    ["tinylm.config"],
    ["tinylm.tokenizers", "tinylm.data", "tinylm.model"],
    ["tinylm.generate", "tinylm.evaluate"],
    [
        "tinylm.pretrained",
        "tinylm.hf",
        "tinylm.gguf_export",
        "tinylm.gguf_metadata",
        "tinylm.quantize",
        "tinylm.copy_task",
    ],
    ["tinylm.training"],
    ["tinylm.run"],
    ["tinylm.chat", "tinylm.serve", "tinylm.harness", "tinylm.stories", "tinylm.report"],
    ["tinylm.recipes", "tinylm.pipeline", "tinylm.cli", "tinylm.__main__", "tinylm"],
]


def layer(module: str) -> int:
    """The layer of `module`: its own, or its package's (tinylm.model.gpt is in tinylm.model's)."""
    for prefix in sorted((p for names in LAYERS for p in names), key=len, reverse=True):
        if module == prefix or (prefix != "tinylm" and module.startswith(prefix + ".")):
            return next(i for i, names in enumerate(LAYERS) if prefix in names)
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def test_imports_point_down_only():
    upward = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in sorted(targets)
        if layer(target) > layer(name)
    ]
    assert not upward, "these import a higher layer: " + "; ".join(upward)
