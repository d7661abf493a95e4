"""Where a server's model directory comes from: a path or storage URI as it is (KServe's storage
initializer fills `/mnt/models`), or an MLflow registry URI (`models:/NAME@champion`,
`models:/NAME/3`) resolved to the `model_dir` artifact that `stages.registry` logged with the
version. Torch-free: the transformer resolves the same URI for the preprocessing state.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
MODEL_DIR_ARTIFACT = "model_dir"  # the artifact key stages.registry.register_model logs


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the directory to load and the registry version when there is one."""

    uri: str
    model_dir: str
    version: str | None = None


def resolve(uri: str, tracking_uri: str | None = None, download_dir: str | None = None) -> ModelSource:
    """Resolve `uri` to a loadable model directory.

    Args:
        uri: A local path, a storage URI (s3://, minio://, file://) or `models:/NAME@ALIAS` /
            `models:/NAME/VERSION`.
        tracking_uri: The MLflow server for `models:/` URIs; default `MLFLOW_TRACKING_URI`.
        download_dir: Where registry artifacts are downloaded; default a new temporary directory.

    Raises:
        ValueError: A `models:/` URI that is malformed, or no tracking URI to resolve it with.
    """
    if not uri.startswith("models:/"):
        return ModelSource(uri, uri)
    match = MODELS_URI.match(uri)
    if not match:
        raise ValueError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ValueError(f"{uri!r} needs an MLflow tracking URI (--tracking_uri or MLFLOW_TRACKING_URI)")
    version = _registry_version(tracking_uri, match["name"], match["alias"], match["version"])
    local = _download(tracking_uri, f"models:/{match['name']}/{version}", download_dir)
    return ModelSource(uri, str(_model_dir(local)), version)


def _registry_version(tracking_uri: str, name: str, alias: str | None, version: str | None) -> str:
    from stages.tracking import _client

    client = _client(tracking_uri)
    found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return str(found.version)


def _download(tracking_uri: str, artifact_uri: str, download_dir: str | None) -> Path:
    from stages.tracking import mlflow_at

    target = download_dir or tempfile.mkdtemp(prefix="flywheel-model-")
    with mlflow_at(tracking_uri) as mlflow:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=target))


def _model_dir(local: Path) -> Path:
    """The `model_dir` artifact inside a downloaded pyfunc, as its MLmodel file records it."""
    spec = yaml.safe_load((local / "MLmodel").read_text())
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    path = (artifacts.get(MODEL_DIR_ARTIFACT) or {}).get("path")
    if not path:
        raise ValueError(f"the registered model at {local} has no {MODEL_DIR_ARTIFACT!r} artifact")
    return local / path
