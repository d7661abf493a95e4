"""KFP components of the monitoring pipeline: thin wrappers over `monitoring.windows`,
`monitoring.check` (drift_op: `assess`; decide_op: `conclude`), `monitoring.drift_report` and
`monitoring.trigger`.

    champion -> window -> drift (metrics, HTML report) -> decide -> [retrain] trigger

No `from __future__ import annotations` here: KFP reads these annotations at build time.
"""
from typing import NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output


def champion_op(tracking: dict, champion: Output[Artifact]) -> str:
    """Find the registry's champion and read the reference profile saved with it at training time.

    Args:
        tracking: MLflow tracking URI and the registered model's name.

    Returns:
        champion: JSON with the champion's version, reference profile, label mapping and features.
        Output: The champion's version: the window is read for it alone.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import json
    import os
    import tempfile

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from model.artifact import read_metadata
    from monitoring.reference_profile import load_profile
    from stages.versions import CHAMPION, download_model_dir, version_behind

    version = version_behind(tracking["tracking_uri"], tracking["registered_model"], CHAMPION)
    if version is None:
        raise LookupError(f"{tracking['registered_model']} has no champion in {tracking['tracking_uri']}: "
                          "nothing is served, so nothing is monitored")
    with tempfile.TemporaryDirectory(prefix="flywheel-champion-") as tmp:
        model_dir = download_model_dir(tracking["tracking_uri"], tracking["registered_model"], version, tmp)
        metadata, profile = read_metadata(model_dir), load_profile(model_dir)
    with open(champion.path, "w", encoding="utf-8") as handle:
        json.dump({"model_version": version, "profile": profile, "labels": metadata.get("labels"),
                   "features": metadata.get("features")}, handle)
    champion.metadata.update({"model_version": version, "registered_model": tracking["registered_model"]})
    print(f"champion: {tracking['registered_model']} v{version}")
    return version


def window_op(monitoring_spec: dict, model_version: str, window: Output[Dataset]) -> int:
    """Read the most recent logged requests of the model version from the payload sink.

    Args:
        monitoring_spec: The env's monitoring section: the sink's root and how many rows a window holds.
        model_version: Only this version's traffic is read.

    Returns:
        window: The rows (Parquet): the features as sent, probability, prediction, truth where joined.
        Output: How many rows the window holds.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    from monitoring.check import window_key
    from monitoring.windows import read_window
    from specs import MonitoringSpec

    spec = MonitoringSpec.model_validate(monitoring_spec)
    frame = read_window(spec.sink.root, model_version=model_version, rows=spec.window_rows)
    frame.to_parquet(window.path, index=False)
    window.metadata.update({"rows": len(frame), "model_version": model_version, "sink_root": spec.sink.root,
                            "window": window_key(frame, model_version)})
    print(f"window: {len(frame):,} rows of v{model_version} from {spec.sink.root}")
    return len(frame)


def drift_op(
    window: Input[Dataset],
    champion: Input[Artifact],
    monitoring_spec: dict,
    dataset_spec: dict,
    suite: dict,
    metrics: Output[Metrics],
    report: Output[HTML],
    summary: Output[Artifact],
) -> NamedTuple("DriftOutputs", [("breaches", int), ("enough_data", bool)]):
    """Check the window against the champion's reference profile: drift per feature, prediction
    drift, live AUC where ground truth arrived, and the training expectation suite on live rows.

    Args:
        window: The logged requests to check.
        champion: The champion's version, reference profile and label mapping.
        monitoring_spec: Thresholds (PSI, alpha and its correction, missing rate, ROC AUC floor, min samples).
        dataset_spec: The dataset section of the env's config: which features are numeric or categorical.
        suite: The training expectation suite, checked on the live rows.

    Returns:
        metrics: Flat numbers: rows, PSI and adjusted p-value per feature, prediction PSI, live AUC.
        report: HTML drift report: training vs live distributions per feature.
        summary: JSON of the whole check (what the history records and the decision reads).
        breaches: How many breaches the window has.
        enough_data: Whether the window had min_samples rows (no tests, no decision otherwise).
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import json
    from collections import namedtuple

    import pandas as pd

    from components.factory import named_file
    from monitoring.check import Reference, assess, report_dict
    from monitoring.drift_report import render_report
    from specs import DatasetSpec, MonitoringSpec

    spec = MonitoringSpec.model_validate(monitoring_spec)
    with open(champion.path, encoding="utf-8") as handle:
        reference = Reference.from_dict(json.load(handle))
    # The history is read, not written: decide_op records the check (see monitoring.check).
    checked = assess(pd.read_parquet(window.path), reference.profile, spec,
                     DatasetSpec.model_validate(dataset_spec).features, model_version=reference.model_version,
                     root=spec.sink.root, suite=suite, labels=reference.label_mapping)
    drift = checked.report
    for name, value in drift.metrics().items():
        metrics.log_metric(name, value)
    with open(named_file(report, ".html"), "w", encoding="utf-8") as handle:
        handle.write(render_report(drift, reference.profile))
    with open(summary.path, "w", encoding="utf-8") as handle:
        json.dump({"entry": checked.entry, "report": report_dict(drift), "model_version": reference.model_version},
                  handle)
    for artifact in (report, summary):
        artifact.metadata.update({"model_version": reference.model_version, "rows": drift.rows,
                                  "breaches": len(drift.breaches), "drifted": ", ".join(drift.drifted)})
    for breach in drift.breaches:
        print(f"breach: {breach}")
    if spec.sink.url:  # the drift gauges the alert rules and the dashboard read
        from monitoring.publish import post_drift

        print(post_drift(spec.sink.url, reference.model_version, drift.metrics()))
    return namedtuple("DriftOutputs", ["breaches", "enough_data"])(len(drift.breaches), drift.enough_data)


def decide_op(summary: Input[Artifact], monitoring_spec: dict, env: str, decision: Output[Artifact]) -> str:
    """Record the check in the model version's history beside the sink's windows, and decide with
    hysteresis: retrain only after `consecutive_windows` breaching windows in a row.

    One plain `str` output on purpose: `dsl.If` on a NamedTuple field does not resolve in kfp
    2.17's local runner (see `gate_op`).

    Args:
        summary: The check's summary from the drift task.
        monitoring_spec: consecutive_windows, min_samples and the sink's root (where the history is).
        env: The environment, part of the decision's dedup key.

    Returns:
        decision: JSON {retrain, reasons, dedup_key, streak of the history}.
        Output: "retrain" or "hold".
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import json

    from monitoring.check import conclude
    from specs import MonitoringSpec

    spec = MonitoringSpec.model_validate(monitoring_spec)
    with open(summary.path, encoding="utf-8") as handle:
        checked = json.load(handle)
    made, history = conclude(checked["entry"], spec, model_version=checked["model_version"], root=spec.sink.root,
                             env=env)
    with open(decision.path, "w", encoding="utf-8") as handle:
        json.dump({"retrain": made.retrain, "reasons": made.reasons, "dedup_key": made.dedup_key,
                   "model_version": checked["model_version"], "history": len(history)}, handle)
    label = "retrain" if made.retrain else "hold"
    decision.metadata.update({"decision": label, "reasons": made.reasons, "dedup_key": made.dedup_key})
    print(f"decision: {label}: {'; '.join(made.reasons)}")
    return label


def trigger_op(decision: Input[Artifact], retraining_spec: dict, kfp_target: dict, tracking: dict, env: str,
               monitoring_spec: dict) -> dict:
    """Start a retraining run of the env's published training pipeline (what `flywheel schedule` or
    `submit` published, with the arguments compiled into it), unless the trigger's guards refuse: drift
    triggering off, a run already in flight, the cool-down since the last triggered run, or a
    decision (dedup key) already acted on. Every decision is recorded as an MLflow run.

    Args:
        decision: The retrain decision with its reasons and dedup key.
        retraining_spec: The env's retraining section (trigger_on_drift, cooldown_minutes).
        kfp_target: KFP host, experiment, the training pipeline's name, namespace, pipeline root, ServiceAccount.
        tracking: MLflow tracking URI and experiment, where the decision is audited.
        env: The environment the decision is recorded for.
        monitoring_spec: The sink's root, where the trigger keeps its state between runs.

    Returns:
        Output: The trigger's decision: {started, run_id, why, guard, reasons, dedup_key, ...}.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import json
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from gateways.kfp_api import published_runs_in_flight, start_published_run
    from monitoring.audit import mlflow_audit
    from monitoring.trigger import GuardedTrigger, state_uri
    from specs import MonitoringSpec, RetrainingSpec

    with open(decision.path, encoding="utf-8") as handle:
        wanted = json.load(handle)
    trigger = GuardedTrigger(RetrainingSpec.model_validate(retraining_spec), env,
                             start_run=lambda request: start_published_run(kfp_target, request),
                             runs_in_flight=lambda: published_runs_in_flight(kfp_target),
                             audit=mlflow_audit(tracking),
                             state_path=state_uri(MonitoringSpec.model_validate(monitoring_spec).sink.root))
    outcome = trigger.fire(wanted["reasons"], "drift", wanted["dedup_key"])
    print(f"trigger: {'started ' + outcome['run_id'] if outcome['started'] else 'refused'}: {outcome['why']}")
    return {k: v for k, v in json.loads(json.dumps(outcome, default=str)).items() if v is not None}
