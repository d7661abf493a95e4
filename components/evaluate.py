"""KFP components for evaluation, the champion/challenger gate and registration.

Thin wrappers over `components.evaluation`: each body imports the project inside the function
(lightweight components ship only the function's source), reads its inputs, calls the plain
code and writes outputs. Build them for an environment's image with
`components.base.component(fn, image)`. No `from __future__ import annotations` here: KFP reads
these annotations at build time.
"""
from typing import NamedTuple

from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def evaluate_op(
    model: Input[Model],
    test_data: Input[Dataset],
    dataset_spec: dict,
    evaluation_spec: dict,
    tracking: dict,
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    report: Output[HTML],
) -> NamedTuple("EvaluateOutputs", [("roc_auc", float), ("run_id", str)]):
    """Evaluate the model on the held-out split; KFP metrics, an HTML report and an MLflow run."""
    import json
    import os
    import tempfile
    from collections import namedtuple

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from components import evaluation as ev
    from components.dataset import content_hash

    target = dataset_spec["target"]
    frame = ev.read_dataset(test_data.path)
    trained = ev.load_model(model.path)
    result = ev.evaluate(trained, frame, target, evaluation_spec["decision_threshold"],
                         evaluation_spec.get("slice_column"))

    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    metrics.log_metric("base_rate", result.base_rate)
    metrics.log_metric("baseline_brier", result.baseline["brier"])
    metrics.log_metric("rows", float(result.rows))
    classification.log_confusion_matrix(["0", "1"], result.confusion_matrix)
    classification.log_roc_curve(result.roc["fpr"], result.roc["tpr"], result.roc["thresholds"])

    html = ev.render_report(result, f"Evaluation: {target} on {result.rows} held-out rows")
    with open(report.path, "w", encoding="utf-8") as handle:
        handle.write(html)

    model_meta = dict(trained.metadata)
    lineage = {
        "test_data_hash": content_hash(frame),
        "dataset_hash": test_data.metadata.get("data_hash") or test_data.metadata.get("content_hash"),
        "source_hash": test_data.metadata.get("source_hash"),  # the whole dataset before the split
        "model_data_hash": model_meta.get("data_hash"),
        "model_uri": model.uri,
        "test_data_uri": test_data.uri,
    }
    slice_metrics = {
        ev.metric_name(f"slice.{result.slice_column}.{s['value']}.roc_auc"): s["roc_auc"] for s in result.slices
    }
    with tempfile.TemporaryDirectory() as tmp:
        report_file = os.path.join(tmp, "report.html")
        with open(report_file, "w", encoding="utf-8") as handle:
            handle.write(html)
        run_id = ev.log_evaluation(
            tracking["tracking_uri"], tracking["experiment"], run_name="evaluate",
            params=model_meta.get("hyperparameters", {}),
            metrics={**result.metrics, "base_rate": result.base_rate, "baseline_brier": result.baseline["brier"],
                     **slice_metrics},
            artifacts={"report.html": report_file, "evaluation.json": result.to_dict(),
                       "model_metadata.json": json.loads(json.dumps(model_meta, default=str))},
            tags={k: v for k, v in lineage.items() if v},
        )

    lineage["mlflow_run_id"] = run_id
    lineage["model_metrics"] = json.loads(json.dumps(model_meta.get("metrics", {}), default=str))
    lineage["hyperparameters"] = json.loads(json.dumps(model_meta.get("hyperparameters", {}), default=str))
    for artifact in (classification, report):
        artifact.metadata.update({k: v for k, v in lineage.items() if v not in (None, "")})
    report.metadata["roc_auc"] = result.metrics["roc_auc"]
    report.metadata["beats_baseline"] = result.beats_baseline()

    outputs = namedtuple("EvaluateOutputs", ["roc_auc", "run_id"])
    return outputs(result.metrics["roc_auc"], run_id)


def gate_op(
    model: Input[Model],
    test_data: Input[Dataset],
    dataset_spec: dict,
    evaluation_spec: dict,
    tracking: dict,
    report: Output[HTML],
) -> str:
    """Champion/challenger: score the registry's champion and the candidate on the same test
    data and return "promote" or "reject"; the reason is in the report and its metadata.

    One plain `str` output on purpose: kfp 2.17.0's local runner cannot resolve a `dsl.If`
    condition on a NamedTuple output field (it logs "Could not resolve CEL parameter" and skips
    the branch), while `dsl.If(gate.outputs["Output"] == "promote")` works locally and on a
    cluster (`.output` is not available: the report is a second output).
    """
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from components import evaluation as ev
    from components.dataset import content_hash

    target = dataset_spec["target"]
    threshold, slice_column = evaluation_spec["decision_threshold"], evaluation_spec.get("slice_column")
    frame = ev.read_dataset(test_data.path)
    candidate = ev.evaluate(ev.load_model(model.path), frame, target, threshold, slice_column)

    champion = ev.load_champion(tracking["tracking_uri"], tracking["registered_model"])
    champion_result, champion_error = None, None
    if champion is not None and champion.readable:
        try:
            champion_result = ev.evaluate(champion.model, frame, target, threshold, slice_column)
        except Exception as err:  # noqa: BLE001 - e.g. the champion expects features this data lacks
            champion_error = f"{champion.label} could not score the test data: {type(err).__name__}: {str(err)[:300]}"
    elif champion is not None:
        champion_error = champion.error

    decision = ev.decide(
        candidate.metrics,
        champion_result.metrics if champion_result else None,
        evaluation_spec["thresholds"],
        evaluation_spec["promotion_margin"],
        champion_error=champion_error,
    )
    print(f"gate: {decision.label}: {decision.reason}")
    title = f"Champion/challenger gate: {decision.label}" + (f" (vs {champion.label})" if champion else "")
    with open(report.path, "w", encoding="utf-8") as handle:
        handle.write(ev.render_report(candidate, title, champion=champion_result, decision=decision))
    report.metadata.update({
        "decision": decision.label,
        "reason": decision.reason,
        "candidate_roc_auc": candidate.metrics["roc_auc"],
        "champion_version": champion.version["version"] if champion else "",
        "champion_roc_auc": champion_result.metrics["roc_auc"] if champion_result else "",
        "candidate_metrics": candidate.metrics,
        "champion_metrics": champion_result.metrics if champion_result else {},
        "test_data_hash": content_hash(frame),
    })
    return decision.label


def register_op(
    model: Input[Model],
    test_data: Input[Dataset],
    tracking: dict,
    env: str,
    evaluation_run_id: str,
    pipeline_job_name: str = "",
    pipeline_job_id: str = "",
    pipeline_task_name: str = "",
    pipeline_task_id: str = "",
) -> NamedTuple("RegisterOutputs", [("version", str)]):
    """Register the model in MLflow as a pyfunc, with lineage tags, and make it the champion
    (the old champion stays reachable as `previous-champion` for rollback).

    Pass the KFP run identity in the pipeline: `pipeline_job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER`,
    `pipeline_job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER`, `pipeline_task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER`,
    `pipeline_task_id=dsl.PIPELINE_TASK_ID_PLACEHOLDER`. They are resolved only when passed as
    task arguments (the KFP backend does not resolve placeholders in component defaults), so
    a value that is still an unresolved placeholder is recorded as unknown, not as a fake id.
    (No literal placeholder text may appear in these functions: the source travels in the task's
    command line, where KFP substitutes placeholders.)
    """
    import os
    from collections import namedtuple

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from components import evaluation as ev
    from components.dataset import content_hash

    def resolved(value: str) -> str:
        return "" if not value or value.startswith("{" + "{$") else value

    frame = ev.read_dataset(test_data.path)
    metadata = ev.load_model(model.path).metadata
    lineage = {
        "data_hash": metadata.get("data_hash"),
        "test_data_hash": content_hash(frame),
        "evaluation_run_id": evaluation_run_id,
        "env": env,
        "model_uri": model.uri,
        "kfp.pipeline_job_name": resolved(pipeline_job_name),
        "kfp.pipeline_job_id": resolved(pipeline_job_id),
        "kfp.task_name": resolved(pipeline_task_name),
        "kfp.task_id": resolved(pipeline_task_id),
    }
    version = ev.register_model(
        tracking["tracking_uri"], tracking["registered_model"], model.path, evaluation_run_id or None, lineage,
        ev.input_example(frame, ev.feature_columns(metadata)), experiment=tracking["experiment"],
    )
    print(f"registered {tracking['registered_model']} v{version} as champion")
    outputs = namedtuple("RegisterOutputs", ["version"])
    return outputs(version)
