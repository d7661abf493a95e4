"""Shared fixtures: telemetry off, small settings, and a kfp.local runner per test."""
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"


@pytest.fixture
def config_dir(tmp_path) -> Path:
    """A writable copy of config/ for tests that break or extend it."""
    target = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, target)
    return target


@pytest.fixture
def small_settings(tmp_path):
    """The local environment shrunk to seconds: 3k rows, 3 epochs, MLflow in tmp_path."""
    from pipelines.config import load_settings

    return load_settings("local", overrides={
        "dataset": {"rows": 3000},
        "training": {"hyperparameters": {"epochs": 3}},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })


@pytest.fixture
def kfp_local(tmp_path):
    """kfp.local with subprocesses in this venv (no per-task pip install), artifacts in tmp_path."""
    from kfp import local

    root = tmp_path / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    return root


@pytest.fixture
def run_pipeline(kfp_local):
    """Run a pipeline function through kfp.local and read back what each task produced
    (single components with input artifacts can only run inside a pipeline locally)."""
    from pipelines.local_runner import run_function

    return lambda pipeline, **arguments: run_function(pipeline, arguments, kfp_local)
