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


def skip_final_gc() -> None:
    """Let this task's process exit without CPython's last garbage collection.

    Every op calls it first. A task imports torch, MLflow or Great Expectations, and at exit the
    interpreter walks every object they allocated to free memory the OS takes back anyway: 0.3-0.9 s
    per task, ~15 s over `make run`'s two pipeline runs. `gc.freeze()` moves every tracked object to
    the permanent generation, which that collection skips (docs.python.org/3/library/gc.html#gc.freeze).
    Registered before the op's imports, it runs after their atexit handlers (atexit is last in, first
    out); flushes, handlers and the exit status are untouched.
    """
    import atexit
    import gc

    atexit.register(gc.freeze)
