"""The layers hold: each imports only the layers below it (import-linter, contracts in
pyproject.toml), and a planted upward import breaks the contract."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("specs", "storage", "crds", "model", "stages", "training", "serving", "monitoring", "components",
            "pipelines")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # --no-cache: a cache from one tree must not answer for another.
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def tree(tmp_path):
    """A copy of the project's packages and its import contracts."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_project_keeps_its_layers(tree):
    # Given the project as it is, When import-linter checks the contracts, Then they all hold
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


@pytest.mark.parametrize("module, planted, broken", [
    ("model/labels.py", "import pipelines.config", "model.labels -> pipelines.config"),
    ("stages/gate.py", "from components import train", "stages.gate -> components"),
    ("model/artifact.py", "import torch", "model.artifact -> torch"),
    ("stages/metrics.py", "from kfp import dsl", "stages.metrics -> kfp"),
])
def test_an_upward_import_breaks_the_contract(tree, module, planted, broken):
    # Given a lower layer that imports a higher one (or torch/kfp where they are kept out)
    path = tree / module
    path.write_text(path.read_text() + f"\n{planted}  # planted by the test\n")
    # When import-linter checks the contracts
    result = lint_imports(tree)
    # Then it fails and names the import
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout
