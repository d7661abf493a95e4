"""KFP components for evaluation, the champion/challenger gate and registration: thin wrappers
over `stages.metrics`, `stages.gate`, `stages.evaluation_report` and `stages.registry`. No `from __future__
import annotations` here: KFP reads these annotations at build time."""
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
    """Evaluate the trained model on the held-out test data.

    Args:
        model: The trained model directory.
        test_data: Held-out rows the model never saw.
        dataset_spec: The dataset section of the environment's config (target column).
        evaluation_spec: Decision threshold and slice column.
        tracking: MLflow tracking URI and experiment.

    Returns:
        metrics: Scalar metrics (ROC AUC, PR AUC, F1, Brier, ...).
        classification: Confusion matrix and ROC curve for the Kubeflow UI.
        report: HTML report (report.html) with ROC, PR, calibration and confusion-matrix plots.
        roc_auc: Test ROC AUC.
        run_id: The MLflow run the evaluation was logged to.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import os
    from collections import namedtuple

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from components.factory import named_file
    from model.loader import load_model
    from specs import DatasetSpec, EvaluationSpec, TrackingSpec
    from stages.evaluation import evaluate_and_log
    from storage.tables import read_table

    upstream = test_data.metadata
    outcome = evaluate_and_log(load_model(model.path), read_table(test_data.path),
                               DatasetSpec.model_validate(dataset_spec),
                               EvaluationSpec.model_validate(evaluation_spec), TrackingSpec.model_validate(tracking),
                               {"model_uri": model.uri, "test_data_uri": test_data.uri,
                                "dataset_hash": upstream.get("data_hash") or upstream.get("content_hash"),
                                "source_hash": upstream.get("source_hash")})
    result = outcome.result
    for name, value in outcome.kfp_metrics.items():
        metrics.log_metric(name, value)
    classification.log_confusion_matrix([str(c) for c in result.classes], result.confusion_matrix)
    classification.log_roc_curve(result.roc["fpr"], result.roc["tpr"], result.roc["thresholds"])
    with open(named_file(report, ".html"), "w", encoding="utf-8") as handle:
        handle.write(outcome.html)
    for artifact in (classification, report):
        artifact.metadata.update(outcome.lineage)
    report.metadata.update({"roc_auc": result.metrics["roc_auc"], "beats_baseline": result.beats_baseline()})
    return namedtuple("EvaluateOutputs", ["roc_auc", "run_id"])(result.metrics["roc_auc"], outcome.run_id)


def gate_op(
    model: Input[Model],
    test_data: Input[Dataset],
    dataset_spec: dict,
    evaluation_spec: dict,
    tracking: dict,
    report: Output[HTML],
) -> str:
    """Champion/challenger: score the registry's champion and the candidate on the same test data.

    One plain `str` output on purpose: kfp 2.17.0's local runner cannot resolve a `dsl.If`
    condition on a NamedTuple output field (it logs "Could not resolve CEL parameter" and skips
    the branch), while `dsl.If(gate.outputs["Output"] == "promote")` works locally and on a cluster.

    Args:
        model: The candidate model directory.
        test_data: Held-out rows both models are scored on.
        dataset_spec: The dataset section of the environment's config (target column).
        evaluation_spec: Absolute thresholds, promotion margin, decision threshold.
        tracking: MLflow tracking URI and the registered model's name.

    Returns:
        report: HTML report (report.html) comparing candidate and champion; its metadata holds the decision
            and reason (and the challenger's version when it registered one).
        Output: "promote", "reject", or "challenger": with evaluation.shadow set, a winner against a
            champion is registered here under the `challenger` alias and nothing is deployed; it is
            promoted after its shadow report passes (`flywheel shadow`).
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from components.factory import named_file
    from model.loader import load_model
    from specs import EvaluationSpec
    from stages.evaluation_report import render_report
    from stages.gate import challenge
    from stages.registry import load_champion
    from storage.tables import content_hash, read_table

    frame = read_table(test_data.path)
    champion = load_champion(tracking["tracking_uri"], tracking["registered_model"])
    outcome = challenge(load_model(model.path), champion, frame, dataset_spec["target"],
                        EvaluationSpec.model_validate(evaluation_spec))
    decision = outcome.decision
    challenger = ""
    if decision.shadow:  # evaluation.shadow: the winner shadows the champion before it is promoted
        from dataclasses import replace

        from specs import TrackingSpec
        from stages.registry import register_candidate

        challenger = register_candidate(model.path, frame, TrackingSpec.model_validate(tracking), "",
                                        {"model_uri": model.uri, "registered_by": "gate"}, challenger=True)
        decision = replace(decision, reason=f"{decision.reason} (v{challenger})")
    print(f"gate: {decision.label}: {decision.reason}")
    title = f"Champion/challenger gate: {decision.label}" + (f" (vs {outcome.champion_label})" if champion else "")
    with open(named_file(report, ".html"), "w", encoding="utf-8") as handle:
        handle.write(render_report(outcome.candidate, title, champion=outcome.champion, decision=decision))
    report.metadata.update({
        "decision": decision.label, "reason": decision.reason,
        "candidate_roc_auc": outcome.candidate.metrics["roc_auc"], "champion_version": outcome.champion_version,
        "champion_roc_auc": outcome.champion.metrics["roc_auc"] if outcome.champion else "",
        "candidate_metrics": outcome.candidate.metrics,
        "champion_metrics": outcome.champion.metrics if outcome.champion else {},
        "thresholds": EvaluationSpec.model_validate(evaluation_spec).thresholds.configured(),
        "test_data_hash": content_hash(frame), "challenger_version": challenger,
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
    """Register the model in MLflow and make it the champion (the old one stays as previous-champion).

    The pipeline passes the KFP run identity as task arguments (the KFP backend resolves run
    placeholders only there, not in component defaults); a value still unresolved is recorded
    as unknown, not as a fake id. No literal placeholder text may appear in this function: its
    source travels in the task's command line, where KFP substitutes placeholders.

    Args:
        model: The promoted model directory.
        test_data: Held-out rows; a few become the MLflow input example.
        tracking: MLflow tracking URI, experiment and registered model name.
        env: The environment the model was trained in, recorded as a tag.
        evaluation_run_id: The MLflow run of the model's evaluation; the model is logged into it.
        pipeline_job_name: The KFP run's name.
        pipeline_job_id: The KFP run's id.
        pipeline_task_name: This task's name in the run.
        pipeline_task_id: This task's id in the run.

    Returns:
        version: The new registered model version.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import os
    from collections import namedtuple

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from specs import TrackingSpec
    from stages.registry import register_candidate
    from storage.tables import read_table

    def resolved(value: str) -> str:
        return "" if not value or value.startswith("{" + "{$") else value

    spec = TrackingSpec.model_validate(tracking)
    version = register_candidate(model.path, read_table(test_data.path), spec, evaluation_run_id, {
        "env": env, "model_uri": model.uri, "kfp.pipeline_job_name": resolved(pipeline_job_name),
        "kfp.pipeline_job_id": resolved(pipeline_job_id), "kfp.task_name": resolved(pipeline_task_name),
        "kfp.task_id": resolved(pipeline_task_id)})
    print(f"registered {spec.registered_model} v{version} as champion")
    return namedtuple("RegisterOutputs", ["version"])(version)
