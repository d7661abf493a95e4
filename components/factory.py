"""How every Flywheel component is built: the project's own image, no pip install at start.

Components are plain functions in `components/<stage>.py`; `component(fn, image)` turns one into
a KFP component for an environment's image at pipeline-build time, so one pipeline definition
compiles to each environment's image (tag or digest from config).
"""
from __future__ import annotations

from kfp import dsl

LOCAL_IMAGE = "python:3.11-slim"  # kfp.local with use_venv=False ignores it; set to silence warnings


def component(fn, image: str):
    return dsl.component(func=fn, base_image=image or LOCAL_IMAGE, install_kfp_package=False)


def named_file(artifact, suffix: str) -> str:
    """Give an output artifact's file a suffix (`report` -> `report.html`) and return its local path.

    KFP names an output artifact's file after the output, so a report downloaded from the object
    store is a file called `report` that a browser shows as source. The executor writes the
    artifact's `uri` into executor_output.json; kfp.local hands that URI to downstream tasks, and
    on a cluster the launcher adopts it and uploads the file found there (kubeflow/pipelines
    backend/src/v2/component/launcher_v2.go, `mergeRuntimeArtifacts`: `dst.Uri = src.Uri`). The
    artifact keeps its type (`system.HTML`), which is what the Kubeflow UI renders by.
    """
    if not artifact.uri.endswith(suffix):
        artifact.uri += suffix
    return artifact.path
