"""MLflow experiment tracking: experiments, runs, params, metrics and artifacts.

MLflow is imported lazily so that importing this module stays cheap for the pipeline compiler.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # FIELD-NOTES: no phoning home
    import mlflow

    return mlflow


@contextmanager
def mlflow_at(tracking_uri: str):
    """Point MLflow's fluent API (needed for log_model) at `tracking_uri` for a block, then leave
    the process's globals and MLFLOW_*_URI variables as they were before."""
    mlflow = _mlflow()
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    _mlflow()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """A local SQLite store keeps artifacts beside the database, not in ./mlruns of whatever the
    current directory happens to be; a tracking server manages its own artifact store."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_absolute():
            db = Path.cwd() / db
        return (db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)).as_uri()
    return None


def experiment_id(tracking_uri: str, experiment: str) -> str:
    """The experiment's id, created on first use (two tasks racing to create it is fine)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=_artifact_location(tracking_uri, experiment))
    except MlflowException:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def _flatten(values: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def metric_name(name: str) -> str:
    """MLflow metric keys allow letters, digits, _ - . / and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def log_evaluation(tracking_uri: str, experiment: str, run_name: str, params: Mapping, metrics: Mapping,
                   artifacts: Mapping[str, str | dict], tags: Mapping, parent_run_id: str | None = None) -> str:
    """Log one evaluation as an MLflow run and return its id; a child of `parent_run_id` (the
    training run) when given.

    `artifacts` maps a file name in the run to a local file path or to a JSON-able dict. Params
    are flattened (a.b.c) and truncated to MLflow's 6000-character limit; metrics that are None
    or not finite are skipped. The run ends FAILED if logging breaks halfway.
    """
    import time

    from mlflow.entities import Metric, Param, RunTag

    client = _client(tracking_uri)
    tags = {k: str(v)[:5000] for k, v in tags.items() if v is not None}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(tracking_uri, experiment), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        flat = _flatten(params)
        client.log_batch(
            run_id,
            metrics=[Metric(metric_name(k), float(v), now, 0) for k, v in metrics.items() if _finite(v)],
            params=[Param(k, (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000]) for k, v in flat.items()],
            tags=[RunTag("flywheel.stage", "evaluation")],
        )
        for name, value in artifacts.items():
            if isinstance(value, Mapping):
                client.log_dict(run_id, dict(value), name)
            else:
                directory = os.path.dirname(name) or None
                if os.path.basename(name) == os.path.basename(value):
                    client.log_artifact(run_id, value, directory)
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        copy = os.path.join(tmp, os.path.basename(name))
                        shutil.copyfile(value, copy)
                        client.log_artifact(run_id, copy, directory)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
