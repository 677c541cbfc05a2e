"""The package's layers point one way: model <- data <- train <- commands <- cli, with no import cycle.

Every module is imported in a fresh interpreter; its xcft imports are read from the source (module
top and function bodies alike), so a lazy import cannot hide a wrong-way dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "xcft"
#: Layer of each top-level part; a module may import its own layer and the ones below.
LAYERS = {
    "errors": 0,
    "options": 0,
    "output_dir": 0,
    "run_files": 0,
    "model": 1,
    "data": 2,
    "train": 3,
    "commands": 4,
    "cli": 5,
    "__init__": 5,
    "__main__": 5,
}
#: Files copied into saved model folders: they may import only each other (relative imports).
SELF_CONTAINED = {
    "configuration_xcomposer2",
    "modeling_xcomposer2",
    "tokenization_internlm2",
    "image_processing_xcomposer2",
    "template_xcomposer2",
}


def _modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def _path(module: str) -> Path:
    base = SRC.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _xcft_imports(module: str) -> set[str]:
    tree = ast.parse(_path(module).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("xcft"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("xcft")}
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


MODULES = _modules()


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    proc = subprocess.run(
        [sys.executable, "-c", code, *MODULES],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down_the_layers(module):
    wrong = sorted(m for m in _xcft_imports(module) if _layer(m) > _layer(module))
    assert not wrong, f"{module} (layer {_layer(module)}) imports higher layers: {wrong}"


def test_model_imports_nothing_above_it():
    for module in MODULES:
        if module.startswith("xcft.model"):
            bad = [m for m in _xcft_imports(module) if m.startswith(("xcft.data", "xcft.train", "xcft.commands", "xcft.cli"))]
            assert not bad, f"{module} imports {bad}"


def test_self_contained_files_import_only_each_other():
    for name in SELF_CONTAINED:
        assert not _xcft_imports(f"xcft.model.{name}"), f"{name} must not import xcft (it is copied into model folders)"
        tree = ast.parse(_path(f"xcft.model.{name}").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in SELF_CONTAINED, f"{name} imports .{node.module}, which is not copied beside it"


def test_no_import_cycle():
    graph = {m: {i for i in _xcft_imports(m) if i in MODULES} for m in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])
