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
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from specs import TrackingSpec

# The experiment tag the MLflow 3 UI reads to decide what an experiment is for: without it, the UI
# opens on traces (GenAI); with this value it opens on runs (classic model development).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# What training/train.py records per epoch in metadata["history"], logged as step metrics (step = epoch).
EPOCH_METRICS = ("train_loss", "val_loss", "val_roc_auc", "samples_per_s")
# The training run's final metrics, named apart from the curves so that they add no point to them.
FINAL_METRIC_NAMES = {"val_loss": "best_val_loss", "val_roc_auc": "best_val_roc_auc",
                      "samples_per_s": "mean_samples_per_s"}
MAX_DIGEST = 36  # MLflow's limit on a dataset digest (the full content hash goes in an input tag)
MAX_METRICS_PER_BATCH = 1000


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 sends telemetry unless told not to
    import mlflow

    return mlflow


@contextmanager
def mlflow_at(tracking_uri: str):
    """Point MLflow's fluent API (needed for log_model) at `tracking_uri` for a block, then leave
    the process's globals and MLFLOW_* variables as they were before, the active experiment
    (`mlflow.set_experiment` in the block) included: a leftover one makes a later
    `start_run(run_id=...)` in another experiment fail."""
    reach(tracking_uri)
    mlflow = _mlflow()
    from mlflow.tracking import fluent

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")}
    active_experiment = fluent._active_experiment_id
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        fluent._active_experiment_id = active_experiment
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def reach(tracking_uri: str) -> None:
    """Fail at once, with `storage.endpoints.Unreachable`, when a remote tracking server does not
    take a connection: MLflow's own HTTP retries would spend about 4 minutes on it first (see
    storage/endpoints.py). Local stores (sqlite:, file paths) are not probed."""
    from storage.endpoints import probe

    probe("MLflow", tracking_uri)


def _client(tracking_uri: str):
    reach(tracking_uri)
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
    """The experiment's id, created on first use (two tasks racing to create it is fine), tagged
    as a model-development experiment so that the MLflow UI opens on its runs; an experiment made
    before Flywheel tagged them gets the tag too (one whose kind someone set is left alone)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            return client.create_experiment(experiment, artifact_location=_artifact_location(tracking_uri, experiment),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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
            params=[Param(k, (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000])
                    for k, v in flat.items()],
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


# --- the training run --------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetRef:
    """A table a run used, logged as an MLflow dataset input by reference (never uploaded):
    where it lives (`uri`), its content hash (storage.tables.content_hash) and its role
    (`context`: training, testing). `path`, when readable here, gives the schema from a few rows;
    `rows` the profile."""

    uri: str
    content_hash: str
    context: str = "training"
    name: str | None = None
    path: str | None = None
    rows: int | None = None
    source_hash: str | None = None  # the snapshot the table was split from


def _digest(content_hash: str) -> str:
    return content_hash.split(":", 1)[-1][:MAX_DIGEST]


def _dataset_source(uri: str):
    """MLflow's source for `uri` (local path, s3://, gs://, ...); a scheme MLflow has no artifact
    repository for (KFP's minio://) is recorded as it is."""
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
        warnings.simplefilter("ignore", UserWarning)
        try:
            return resolve_dataset_source(uri)
        except MlflowException:
            pass

    class UriDatasetSource(DatasetSource):
        @staticmethod
        def _get_source_type() -> str:
            return "uri"

        def load(self, **kwargs):
            raise NotImplementedError(f"read {uri} with storage.open_uri")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            raise NotImplementedError

        def to_dict(self) -> dict:
            return {"uri": uri}

        @classmethod
        def from_dict(cls, source_dict):
            raise NotImplementedError

    return UriDatasetSource()


def _head(path: str, rows: int = 100):
    """The first `rows` of a table (a few row batches read, never the whole table) and the
    table's row count when its footer says it (Parquet)."""
    import pyarrow as pa

    import storage
    from storage.tables import table_format

    with storage.open_uri(path) as handle:
        fmt = table_format(handle)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.ParquetFile(handle)
            batch = next(table.iter_batches(batch_size=rows), None)
            return (batch.to_pandas() if batch is not None else table.schema_arrow.empty_table().to_pandas(),
                    table.metadata.num_rows)
        import pyarrow.csv as pcsv

        stream = pa.PythonFile(handle, mode="r")
        if fmt == "csv.gz":
            stream = pa.CompressedInputStream(stream, "gzip")
        reader = pcsv.open_csv(stream, read_options=pcsv.ReadOptions(block_size=1 << 16),
                               convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
        return reader.read_next_batch().to_pandas().head(rows), None


def _schema(path: str | None):
    """The MLflow schema of a table from its first rows, or None when it cannot be read here."""
    if not path:
        return None, None
    from mlflow.models import infer_signature

    try:
        head, rows = _head(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return infer_signature(head).inputs, rows
    except Exception:  # a schema is a nicety; the reference and digest are what count
        return None, None


def dataset_input(ref: DatasetRef):
    """An MLflow DatasetInput for `ref`: a metadata-only dataset (source URI, digest = our
    content hash, schema from a few rows, row count), tagged with its context and full hash."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    schema, counted = _schema(ref.path)
    rows = ref.rows if ref.rows is not None else counted
    config = MetaDataset(_dataset_source(ref.uri), name=ref.name or ref.context, digest=_digest(ref.content_hash),
                         schema=schema).to_dict()
    entity = DatasetEntity(name=config["name"], digest=config["digest"], source_type=config["source_type"],
                           source=config["source"], schema=config.get("schema"),
                           profile=json.dumps({"num_rows": int(rows)}) if rows is not None else None)
    tags = {MLFLOW_DATASET_CONTEXT: ref.context, "flywheel.content_hash": ref.content_hash,
            "flywheel.source_hash": ref.source_hash}
    return DatasetInput(entity, [InputTag(k, str(v)[:500]) for k, v in tags.items() if v])


def _number(value) -> float | None:
    """A finite float, or None (bools, text, NaN and infinities are no metric points)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def training_metrics(metadata: Mapping, timestamp: int):
    """The learning curves (one point per epoch of `metadata["history"]`, step = epoch) and the
    final metrics (the best epoch's, under FINAL_METRIC_NAMES) as MLflow Metric entities."""
    from mlflow.entities import Metric

    points = []
    for index, point in enumerate(metadata.get("history") or [], start=1):
        step = int(point.get("epoch", index))
        points += [Metric(key, value, timestamp, step) for key in EPOCH_METRICS
                   if (value := _number(point.get(key))) is not None]
    for key, value in (metadata.get("metrics") or {}).items():
        if (value := _number(value)) is not None:
            points.append(Metric(metric_name(FINAL_METRIC_NAMES.get(key, key)), value, timestamp, 0))
    return points


def log_training_run(tracking: TrackingSpec, env: str, metadata: Mapping, datasets: Sequence[DatasetRef],
                     model_uri: str, *, backend: str | None = None, run_name: str = "train") -> str:
    """Log a finished training as an MLflow run and return its id: hyperparameters and data sizes
    as params, per-epoch train_loss/val_loss/val_roc_auc/samples_per_s as step metrics (step =
    epoch), the best epoch's metrics, the tables as dataset inputs, lineage as tags (stage, env,
    pipeline run, job name, training backend) and the model's metadata as an artifact.

    `metadata` is what training/train.py returns (and writes to the model's metadata.json);
    `backend` is the training backend (torchrun, pytorchjob, trainjob), metadata's own "backend"
    being the DDP process group's (gloo, nccl). The run ends FAILED if logging breaks halfway.
    """
    import time

    from mlflow.entities import Param

    client = _client(tracking.tracking_uri)
    tags = {
        "flywheel.stage": "training", "flywheel.env": env, "flywheel.pipeline_run": metadata.get("pipeline_run"),
        "flywheel.job_name": metadata.get("job_name"), "flywheel.backend": backend,
        "flywheel.ddp_backend": metadata.get("backend"), "flywheel.device": metadata.get("device"),
        "flywheel.resumed_from_epoch": metadata.get("resumed_from_epoch"),
        "model_uri": model_uri, "data_hash": metadata.get("data_hash"), "source_hash": metadata.get("source_hash"),
        "torch_version": metadata.get("torch_version"),
    }
    tags = {k: str(v)[:5000] for k, v in tags.items() if v not in (None, "")}
    run = client.create_run(experiment_id(tracking.tracking_uri, tracking.experiment), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        params = {**_flatten(metadata.get("hyperparameters") or {}),
                  **{k: metadata[k] for k in ("world_size", "train_rows", "validation_rows") if k in metadata}}
        params = [Param(k, (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000])
                  for k, v in params.items()]
        metrics = training_metrics(metadata, int(time.time() * 1000))
        for start in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
            client.log_batch(run_id, params=params[start:start + 100])
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])
        if datasets:
            client.log_inputs(run_id, datasets=[dataset_input(ref) for ref in datasets])
        client.log_dict(run_id, json.loads(json.dumps(dict(metadata), default=str)), "model_metadata.json")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def record_run(model_dir: str, run_id: str) -> dict:
    """Name the training run in the model's metadata.json (`mlflow_run_id`), so that the evaluate
    run becomes its child and the registry records it; returns the updated metadata."""
    from model.artifact import METADATA_FILE, read_metadata, write_json

    metadata = {**read_metadata(model_dir), "mlflow_run_id": run_id}
    write_json(model_dir, METADATA_FILE, metadata)
    return metadata
