"""MLflow experiment tracking: the experiments, runs, params, metrics and dataset inputs Flywheel
logs, through `gateways.mlflow_api` (which imports MLflow lazily, so that importing this module
stays cheap for the pipeline compiler)."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateways import mlflow_api
from gateways.mlflow_api import Point

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


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def experiment_id(tracking_uri: str, experiment: str) -> str:
    """The experiment's id, created on first use, tagged as a model-development experiment so that
    the MLflow UI opens on its runs; an experiment made before Flywheel tagged them gets the tag
    too (one whose kind someone set is left alone)."""
    return mlflow_api.ensure_experiment(tracking_uri, experiment, {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


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
    with mlflow_api.run(tracking_uri, experiment_id(tracking_uri, experiment), run_name, tags,
                        parent_run_id=parent_run_id) as run:
        run.log(params=_flatten(params), tags={"flywheel.stage": "evaluation"},
                metrics=[Point(metric_name(k), float(v)) for k, v in metrics.items() if _finite(v)])
        for name, value in artifacts.items():
            if isinstance(value, Mapping):
                run.log_dict(value, name)
            else:
                run.log_file(value, name)
        return run.run_id


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


def _readable_head(path: str | None):
    """(first rows, row count) of a table, or (None, None) when it cannot be read here."""
    if not path:
        return None, None
    try:
        return _head(path)
    except Exception:  # a schema is a nicety; the reference and digest are what count
        return None, None


def dataset_input(ref: DatasetRef):
    """An MLflow dataset input for `ref`: a metadata-only dataset (source URI, digest = our
    content hash, schema from a few rows, row count), tagged with its context and full hash."""
    head, counted = _readable_head(ref.path)
    return mlflow_api.dataset_input(ref.uri, name=ref.name or ref.context, digest=ref.content_hash.split(":", 1)[-1],
                                    context=ref.context, head=head, rows=ref.rows if ref.rows is not None else counted,
                                    tags={"flywheel.content_hash": ref.content_hash,
                                          "flywheel.source_hash": ref.source_hash})


def _number(value) -> float | None:
    """A finite float, or None (bools, text, NaN and infinities are no metric points)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def training_metrics(metadata: Mapping) -> list[Point]:
    """The learning curves (one point per epoch of `metadata["history"]`, step = epoch) and the
    final metrics (the best epoch's, under FINAL_METRIC_NAMES)."""
    points = []
    for index, point in enumerate(metadata.get("history") or [], start=1):
        step = int(point.get("epoch", index))
        points += [Point(key, value, step) for key in EPOCH_METRICS
                   if (value := _number(point.get(key))) is not None]
    for key, value in (metadata.get("metrics") or {}).items():
        if (value := _number(value)) is not None:
            points.append(Point(metric_name(FINAL_METRIC_NAMES.get(key, key)), value))
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
    tags = {
        "flywheel.stage": "training", "flywheel.env": env, "flywheel.pipeline_run": metadata.get("pipeline_run"),
        "flywheel.job_name": metadata.get("job_name"), "flywheel.backend": backend,
        "flywheel.ddp_backend": metadata.get("backend"), "flywheel.device": metadata.get("device"),
        "flywheel.resumed_from_epoch": metadata.get("resumed_from_epoch"),
        "model_uri": model_uri, "data_hash": metadata.get("data_hash"), "source_hash": metadata.get("source_hash"),
        "torch_version": metadata.get("torch_version"),
    }
    tags = {k: v for k, v in tags.items() if v not in (None, "")}
    with mlflow_api.run(tracking.tracking_uri, experiment_id(tracking.tracking_uri, tracking.experiment), run_name,
                        tags) as run:
        params = {**_flatten(metadata.get("hyperparameters") or {}),
                  **{k: metadata[k] for k in ("world_size", "train_rows", "validation_rows") if k in metadata}}
        run.log(params=params, metrics=training_metrics(metadata))
        if datasets:
            run.log_datasets([dataset_input(ref) for ref in datasets])
        run.log_dict(json.loads(json.dumps(dict(metadata), default=str)), "model_metadata.json")
        return run.run_id


def record_run(model_dir: str, run_id: str) -> dict:
    """Name the training run in the model's metadata.json (`mlflow_run_id`), so that the evaluate
    run becomes its child and the registry records it; returns the updated metadata."""
    from model.artifact import METADATA_FILE, read_metadata, write_json

    metadata = {**read_metadata(model_dir), "mlflow_run_id": run_id}
    write_json(model_dir, METADATA_FILE, metadata)
    return metadata
