"""The evaluate stage: score the model on held-out data, render the report and log both to MLflow."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import pandas as pd

from specs import DatasetSpec, EvaluationSpec, TrackingSpec
from stages.evaluation_report import render_report
from stages.metrics import EvaluationResult, evaluate
from stages.tracking import log_evaluation, metric_name
from storage.tables import content_hash


@dataclass
class EvaluationOutcome:
    result: EvaluationResult
    html: str
    run_id: str
    kfp_metrics: dict[str, float]
    lineage: dict


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def evaluate_and_log(trained, frame: pd.DataFrame, dataset: DatasetSpec, spec: EvaluationSpec, tracking: TrackingSpec,
                     lineage: dict) -> EvaluationOutcome:
    """Evaluate `trained` (a `model.loader.TrainedModel`) on `frame` and log the run to MLflow:
    params, metrics (slices included), the HTML report, the result and the model's metadata.
    `lineage` (model and data URIs and hashes) becomes the run's tags and the artifacts' metadata."""
    result = evaluate(trained, frame, dataset.target, spec.decision_threshold, spec.slice_column)
    html = render_report(result, f"Evaluation: {dataset.target} on {result.rows} held-out rows")
    model_meta = dict(trained.metadata)
    lineage = {**lineage, "test_data_hash": content_hash(frame), "model_data_hash": model_meta.get("data_hash")}
    slices = {metric_name(f"slice.{result.slice_column}.{s['value']}.roc_auc"): s["roc_auc"] for s in result.slices}
    summary = {**result.metrics, "base_rate": result.base_rate, "baseline_brier": result.baseline["brier"]}
    with tempfile.TemporaryDirectory() as tmp:
        report_file = os.path.join(tmp, "report.html")
        with open(report_file, "w", encoding="utf-8") as handle:
            handle.write(html)
        run_id = log_evaluation(
            tracking.tracking_uri, tracking.experiment, run_name="evaluate",
            params=model_meta.get("hyperparameters", {}), metrics={**summary, **slices},
            artifacts={"report.html": report_file, "evaluation.json": result.to_dict(),
                       "model_metadata.json": _jsonable(model_meta)},
            tags={k: v for k, v in lineage.items() if v}, parent_run_id=model_meta.get("mlflow_run_id"),
        )
    lineage.update({"mlflow_run_id": run_id, "model_metrics": _jsonable(model_meta.get("metrics", {})),
                    "hyperparameters": _jsonable(model_meta.get("hyperparameters", {}))})
    return EvaluationOutcome(result, html, run_id, {**summary, "rows": float(result.rows)},
                             {k: v for k, v in lineage.items() if v not in (None, "")})
