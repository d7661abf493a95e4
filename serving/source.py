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

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


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
    from stages.versions import download_model_dir, version_behind

    name = match["name"]
    version = match["version"] or version_behind(tracking_uri, name, match["alias"])
    if version is None:
        raise ValueError(f"{uri!r}: {name} has no alias {match['alias']!r} in {tracking_uri}")
    target = download_dir or tempfile.mkdtemp(prefix="flywheel-model-")
    return ModelSource(uri, download_model_dir(tracking_uri, name, version, target), version)
