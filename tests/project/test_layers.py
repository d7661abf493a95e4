"""The layers hold: each imports only the layers below it (import-linter, contracts in
pyproject.toml), and a planted upward import breaks the contract."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGES = ("specs", "storage", "crds", "model", "gateways", "stages", "training", "serving", "monitoring",
            "deployment", "components", "pipelines")
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


def plant(tree, module: str, planted: str) -> int:
    """Append `planted` to `tree/module`; the line its last statement lands on."""
    path = tree / module
    text = path.read_text()
    path.write_text(text + f"\n{planted}  # planted by the test\n")
    return len(text.splitlines()) + 1 + planted.count("\n") + 1


@pytest.mark.parametrize("module, planted, broken", [
    ("model/labels.py", "import pipelines.config", "model.labels -> pipelines.config"),
    ("stages/gate.py", "from components import train", "stages.gate -> components"),
    ("model/artifact.py", "import torch", "model.artifact -> torch"),
    ("stages/metrics.py", "from kfp import dsl", "stages.metrics -> kfp"),
])
def test_an_upward_import_breaks_the_contract(tree, module, planted, broken):
    # Given a lower layer that imports a higher one (or torch/kfp where they are kept out)
    plant(tree, module, planted)
    # When import-linter checks the contracts
    result = lint_imports(tree)
    # Then it fails and names the import
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout


# ---- MLflow's client, only in gateways/ --------------------------------------------------------
# import-linter sees external packages as a whole (`mlflow`), not `mlflow.tracking`, so this one is
# an AST check: MlflowClient, mlflow.tracking and mlflow.entities are imported by gateways/ alone.
MLFLOW_CLIENT_MODULES = ("mlflow.tracking", "mlflow.entities")


def _mlflow_client_names(node: ast.AST) -> list[str]:
    """The dotted names an import (or an `x.MlflowClient` attribute) brings in."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    if isinstance(node, ast.Attribute) and node.attr == "MlflowClient":
        return ["MlflowClient"]
    return []


def mlflow_client_uses(root: Path) -> list[str]:
    """`path:line name` for each use of MLflow's client outside gateways/, in every package of
    `root` but tests/ (tests read what was logged back through MLflow's own client)."""
    found = []
    for package in sorted(p.parent for p in root.glob("*/__init__.py")):
        if package.name in ("gateways", "tests"):
            continue
        for path in sorted(package.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                for name in _mlflow_client_names(node):
                    if name.endswith("MlflowClient") or any(name == m or name.startswith(f"{m}.")
                                                            for m in MLFLOW_CLIENT_MODULES):
                        found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
                        break
    return found


def test_only_the_gateway_uses_mlflows_client():
    # Given the project as it is, where gateways/mlflow_api.py imports MlflowClient
    assert "from mlflow import MlflowClient" in (ROOT / "gateways" / "mlflow_api.py").read_text()
    # When the check runs, Then nothing else does
    assert mlflow_client_uses(ROOT) == []


@pytest.mark.parametrize("planted, named", [
    ("from mlflow import MlflowClient", "stages/gate.py:{line} mlflow.MlflowClient"),
    ("import mlflow.tracking.fluent", "stages/gate.py:{line} mlflow.tracking.fluent"),
    ("from mlflow.entities import Metric", "stages/gate.py:{line} mlflow.entities"),
    ("import mlflow\nclient = mlflow.MlflowClient()", "stages/gate.py:{line} MlflowClient"),
])
def test_a_planted_mlflow_client_outside_the_gateway_is_found(tree, planted, named):
    # Given a stage that reaches MLflow's client itself, not through gateways/mlflow_api.py
    line = plant(tree, "stages/gate.py", planted)
    # When the check runs, Then it names the file, the line and what was imported
    assert mlflow_client_uses(tree) == [named.format(line=line)]


# ---- the Kubernetes API's clients, only in gateways/ -------------------------------------------
# Rule: only gateways/ import or name what CALLS the Kubernetes API (kubernetes.client's *Api
# classes, ApiClient, Configuration and ApiException, kubernetes.config/watch/stream, KServe's
# KServeClient, kubeflow-training's TrainingClient). The SDKs' MODEL classes (kubernetes.client
# V1*, kserve V1beta1*, kubeflow.training.models, kubeflow_trainer_api) stay where objects are
# built (crds/hardening.py, training/, deployment/), so `from kubernetes import client` is allowed.
KUBE_CALLING_MODULES = ("kubernetes.config", "kubernetes.watch", "kubernetes.stream", "kubernetes.dynamic",
                        "kubernetes.client.rest", "kubernetes.client.api", "kubernetes.client.api_client",
                        "kserve.api", "kubeflow.training.api")
KUBE_CALLING_NAME = re.compile(r"^(KServeClient|TrainingClient|ApiClient|ApiException|Configuration|[A-Z]\w*Api)$")


def _imported_names(node: ast.AST) -> list[str]:
    """Dotted names an import brings in, or the attribute a `x.Name` reads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    return []


def kube_client_uses(root: Path) -> list[str]:
    """`path:line name` for each use of a Kubernetes API client outside gateways/ (and tests/)."""
    found = []
    for package in sorted(p.parent for p in root.glob("*/__init__.py")):
        if package.name in ("gateways", "tests"):
            continue
        for path in sorted(package.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                for name in _imported_names(node):
                    last = name.rsplit(".", 1)[-1]
                    calling_module = any(name == m or name.startswith(f"{m}.") for m in KUBE_CALLING_MODULES)
                    from_sdk = isinstance(node, ast.Attribute) or name.startswith(("kubernetes", "kserve", "kubeflow"))
                    if calling_module or (from_sdk and KUBE_CALLING_NAME.match(last)):
                        found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
                        break
    return found


def test_only_the_gateway_calls_the_kubernetes_api():
    # Given the project as it is, where gateways/kube_api.py holds the clients
    assert "CustomObjectsApi" in (ROOT / "gateways" / "kube_api.py").read_text()
    # When the check runs, Then nothing else names one
    assert kube_client_uses(ROOT) == []


@pytest.mark.parametrize("planted, named", [
    ("from kserve import KServeClient", "deployment/rollout.py:{line} kserve.KServeClient"),
    ("from kubeflow.training import TrainingClient", "deployment/rollout.py:{line} kubeflow.training.TrainingClient"),
    ("from kubernetes import config", "deployment/rollout.py:{line} kubernetes.config"),
    ("from kubernetes import client\napi = client.CustomObjectsApi()", "deployment/rollout.py:{line} CustomObjectsApi"),
])
def test_a_planted_kubernetes_client_outside_the_gateway_is_found(tree, planted, named):
    # Given the rollout reaching the API itself, not through gateways/kube_api.py
    line = plant(tree, "deployment/rollout.py", planted)
    # When the check runs, Then it names the file, the line and what was used
    assert kube_client_uses(tree) == [named.format(line=line)]


# ---- KFP: authoring in layers 4-5, the API client in gateways/kfp_api.py alone --------------------
# import-linter forbids `kfp` as a whole (pyproject), not its submodules, so this is an AST check of
# every import, lazy ones inside functions included: pipelines are authored (kfp.dsl, compiler,
# local, kubernetes) only in components/ and pipelines/, and the KFP API is called (kfp.Client,
# kfp.client, kfp_server_api) only by gateways/.
KFP_AUTHORING = ("kfp.dsl", "kfp.compiler", "kfp.local", "kfp.kubernetes", "kfp.components")
KFP_AUTHORING_PACKAGES = ("components", "pipelines")
KFP_CLIENT = ("kfp.client", "kfp.Client", "kfp_server_api")


def _kfp_names(node: ast.AST) -> list[str]:
    """Dotted names an import brings in, or `kfp.Client` read as an attribute of the kfp module."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kfp":
        return [f"kfp.{node.attr}"]
    return [] if isinstance(node, ast.Attribute) else _imported_names(node)


def kfp_uses(root: Path) -> list[str]:
    """`path:line name` for each kfp use outside the layers allowed to make it (tests/ aside)."""
    found = []
    for package in sorted(p.parent for p in root.glob("*/__init__.py")):
        if package.name == "tests":
            continue
        for path in sorted(package.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                for name in _kfp_names(node):
                    authoring = any(name == m or name.startswith(f"{m}.") for m in KFP_AUTHORING)
                    calling = any(name == m or name.startswith(f"{m}.") for m in KFP_CLIENT)
                    if (authoring and package.name not in KFP_AUTHORING_PACKAGES) or (
                            calling and package.name != "gateways"):
                        found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
                        break
    return found


def test_kfp_submodules_stay_in_their_layers():
    # Given the project as it is, where gateways/kfp_api.py holds the client and the pipelines use dsl
    assert "kfp_server_api" in (ROOT / "gateways" / "kfp_api.py").read_text()
    assert "from kfp import dsl" in (ROOT / "pipelines" / "training_pipeline.py").read_text()
    # When the check runs, Then nothing else imports them
    assert kfp_uses(ROOT) == []


@pytest.mark.parametrize("module, planted, named", [
    ("pipelines/schedule.py", "def f():\n    import kfp_server_api", "pipelines/schedule.py:{line} kfp_server_api"),
    ("components/monitor.py", "from kfp.client import Client", "components/monitor.py:{line} kfp.client"),
    ("pipelines/submit.py", "import kfp\nclient = kfp.Client()", "pipelines/submit.py:{line} kfp.Client"),
    ("gateways/kfp_api.py", "from kfp import dsl", "gateways/kfp_api.py:{line} kfp.dsl"),
    ("monitoring/trigger.py", "def g():\n    from kfp import compiler", "monitoring/trigger.py:{line} kfp.compiler"),
])
def test_a_planted_kfp_import_outside_its_layer_is_found(tree, module, planted, named):
    # Given a module that reaches the KFP API itself, or authors pipelines below layer 4
    line = plant(tree, module, planted)
    # When the check runs, Then it names the file, the line and what was imported
    assert kfp_uses(tree) == [named.format(line=line)]
