"""The layers (docs/design.md section 1) hold: import-linter's contracts in pyproject.toml name every
core module, so a new vqt_edge module has to be placed in a layer before it can be imported."""

from __future__ import annotations

import pkgutil

import tomllib

import vqt_edge
from tests.conftest import REPO

FRONT_ENDS = {"vqt_edge.api", "vqt_edge.cli", "vqt_edge.fleet", "vqt_edge.sweep", "vqt_edge.web"}


def test_every_vqt_edge_module_is_core_or_a_front_end():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    core = set(config["contracts"][0]["source_modules"])
    top = {f"vqt_edge.{m.name}" for m in pkgutil.iter_modules(vqt_edge.__path__)}
    assert top - core - FRONT_ENDS == set(), "place each new module in the core contract or among the front ends"
    assert core & FRONT_ENDS == set()


def test_the_cli_starts_without_the_heavy_imports():
    """Every command is registered at start-up, so a module-level import of Flower or cryptography
    (the fleet's) or of onnxruntime cost every device command its memory: `train` measured 25 MiB
    over the memory model's baseline when the fleet's security options imported them."""
    import subprocess
    import sys

    code = "import sys, vqt_edge.cli; print(sorted(m for m in ('flwr', 'cryptography', 'onnxruntime', 'torch', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout
