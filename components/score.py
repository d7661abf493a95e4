"""KFP components of the batch scoring pipeline: thin wrappers over `stages.scoring` (screen,
partitions, score), `stages.versions` (the champion) and `monitoring.check` / `drift_report` (the
scored batch checked like a window of served traffic).

    resolve -> screen -> ParallelFor(partitions) score -> collect -> drift (metrics, HTML report)

No `from __future__ import annotations` here: KFP reads these annotations at build time.
"""
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output


def resolve_op(tracking: dict, model: Output[Model], champion: Output[Artifact]) -> str:
    """Resolve the registry's champion alias now (never cached) and copy its model directory.

    Args:
        tracking: MLflow tracking URI and the registered model's name.

    Returns:
        model: The champion's model directory (weights, preprocessing, label mapping, profile).
        champion: JSON lineage: model name, version, MLflow run id, model URI, reference profile, labels, features.
        Output: The champion's version.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import json
    import os
    import shutil
    import tempfile

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from gateways.mlflow_api import Registry
    from model.artifact import read_metadata
    from stages.versions import CHAMPION, download_model_dir, model_dir_uri, version_behind

    uri, name = tracking["tracking_uri"], tracking["registered_model"]
    version = version_behind(uri, name, CHAMPION)
    if version is None:
        raise LookupError(f"{name} has no champion in {uri}: nothing to score with (train and register one first)")
    with tempfile.TemporaryDirectory(prefix="flywheel-score-") as tmp:
        shutil.copytree(download_model_dir(uri, name, version, tmp), model.path, dirs_exist_ok=True)
    metadata = read_metadata(model.path)
    lineage = {"model_name": name, "model_version": version, "run_id": Registry(uri, name).version(version)["run_id"],
               "model_uri": model_dir_uri(uri, name, version)}
    with open(champion.path, "w", encoding="utf-8") as handle:
        json.dump({**lineage, "profile": metadata.get("reference_profile"), "labels": metadata.get("labels"),
                   "features": metadata.get("features"), "id_column": metadata.get("id_column")}, handle)
    for artifact in (model, champion):
        artifact.metadata.update(lineage)
    print(f"champion: {name} v{version} (run {lineage['run_id']})")
    return version


def screen_op(data_uri: str, suite: dict, scoring_spec: dict, model: Input[Model], clean: Output[Dataset],
              quarantine: Output[Dataset]) -> list:
    """Check every input row against the training suite's blocking row-level expectations and the
    model's input contract: rows that break one go to the quarantine file with their reasons. A
    table with a column named input_row or quarantine_reason, or an id column named like a
    prediction or lineage column, fails here (ColumnClashError, one line naming the column).

    Args:
        data_uri: The table to score (CSV, CSV.gz or Parquet; a path or an object-store URI).
        suite: The training expectation suite.
        scoring_spec: max_quarantine_share (the run fails past it) and partition_rows.
        model: The champion's model directory (its features, id column, preprocessing).

    Returns:
        clean: The rows to score (Parquet, one row group per partition), each with input_row (its 0-based
            position in the input table) first.
        quarantine: The quarantined rows with input_row and quarantine_reason (Parquet).
        Output: The partitions' row ranges, each {partition, start, stop}.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    from model.artifact import read_metadata, read_preprocessor
    from specs.scoring import ScoringSpec
    from stages.scoring import check_share, partitions, read_input, screen

    spec = ScoringSpec.model_validate(scoring_spec)
    frame = read_input(data_uri)
    screened = screen(frame, suite, read_preprocessor(model.path), read_metadata(model.path).get("id_column"))
    screened.quarantined.to_parquet(quarantine.path, index=False)
    screened.clean.to_parquet(clean.path, index=False, row_group_size=spec.partition_rows)
    ranges = partitions(len(screened.clean), spec.partition_rows)
    facts = {"input_uri": data_uri, "rows": screened.rows, "quarantined": len(screened.quarantined),
             "partitions": len(ranges)}
    clean.metadata.update({**facts, "rows": len(screened.clean)})
    quarantine.metadata.update(facts)
    print(f"screened {screened.rows:,} rows: {len(screened.quarantined):,} quarantined ({screened.share:.2%}), "
          f"{len(screened.clean):,} to score in {len(ranges)} partition(s)")
    check_share(screened, spec.max_quarantine_share, where=quarantine.path)
    return ranges


def score_op(clean: Input[Dataset], model: Input[Model], champion: Input[Artifact], partition: dict,
             decision_threshold: float, predictions: Output[Dataset]) -> int:
    """Score one partition's rows in process with the champion (serving's preprocessing and forward pass).

    Args:
        clean: The screened rows.
        model: The champion's model directory.
        champion: The champion's lineage (name, version, MLflow run id).
        partition: The row range to score: {partition, start, stop}.
        decision_threshold: Probability at or above which a row is predicted the positive class.

    Returns:
        predictions: The partition's predictions (Parquet): id (when the table has one), input_row (the row's
            0-based position in the input table), prediction, probability, lineage columns.
        Output: How many rows were scored.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import json

    from model.loader import load_model
    from stages.scoring import read_rows, score_frame

    with open(champion.path, encoding="utf-8") as handle:
        lineage = json.load(handle)
    start, stop = int(partition["start"]), int(partition["stop"])
    frame = read_rows(clean.path, start, stop)
    scored = score_frame(load_model(model.path), frame, decision_threshold=decision_threshold, lineage=lineage,
                         id_column=lineage.get("id_column"))
    scored.to_parquet(predictions.path, index=False)
    predictions.metadata.update({"partition": int(partition["partition"]), "start": start, "stop": stop,
                                 "rows": len(scored)})
    print(f"partition {partition['partition']}: rows {start:,}..{stop - 1:,} scored")
    return len(scored)


def collect_op(parts: Input[list[Dataset]], champion: Input[Artifact], quarantine: Input[Dataset], data_uri: str,
               out_uri: str, predictions: Output[Dataset]) -> dict:
    """Join the partitions' predictions in row order, check that they cover every row once, and
    write them (and the quarantined rows beside them, when there are any) to the output URI,
    copied in chunks. Each prediction's input_row is its row's position in the input table.

    Args:
        parts: Every partition's predictions.
        champion: The champion's lineage (name, version, run id, model URI).
        quarantine: The quarantined rows and the screen's counts.
        data_uri: The input table, recorded as lineage.
        out_uri: Where the predictions go (Parquet; a path or an object-store URI).

    Returns:
        predictions: All predictions (Parquet: id, input_row, prediction, probability, lineage columns), with
            lineage metadata: model name/version/URI, input, rows, quarantined.
        Output: {rows, quarantined, partitions, out_uri, quarantine_uri, model_version}.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import json

    from stages.scoring import write_predictions

    with open(champion.path, encoding="utf-8") as handle:
        lineage = json.load(handle)
    expected = int(quarantine.metadata["rows"]) - int(quarantine.metadata["quarantined"])
    facts = write_predictions([(dict(p.metadata), p.path) for p in parts], predictions.path, out_uri,
                              quarantine.path, expected)
    meta = {"model_name": lineage["model_name"], "model_version": lineage["model_version"],
            "model_uri": lineage["model_uri"], "run_id": lineage["run_id"], "input_uri": data_uri, **facts}
    predictions.metadata.update(meta)
    print(f"wrote {facts['rows']:,} predictions to {out_uri}")
    return meta


def batch_drift_op(clean: Input[Dataset], predictions: Input[Dataset], champion: Input[Artifact],
                   monitoring_spec: dict, dataset_spec: dict, suite: dict, metrics: Output[Metrics],
                   report: Output[HTML], summary: Output[Artifact]) -> str:
    """Check the scored batch as a monitoring window: drift per feature and of the scores against
    the champion's reference profile, live AUC where the table has the label, and the training
    suite on the scored rows (GX). Reported, never recorded in the served traffic's history.

    Args:
        clean: The scored rows (features, and the label when the table has it).
        predictions: Their predictions (probability per row, in row order).
        champion: The champion's version, reference profile and label mapping.
        monitoring_spec: The thresholds the monitoring check uses.
        dataset_spec: The dataset section: which features are numeric or categorical, the label column.
        suite: The training expectation suite.

    Returns:
        metrics: Flat numbers: rows, PSI and adjusted p-value per feature, prediction PSI, live AUC.
        report: HTML drift report: training vs batch distributions per feature.
        summary: JSON of the check (breaches, notes, metrics).
        Output: The verdict: "drift", "no drift" or "not enough data".
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import json

    from components.factory import named_file
    from monitoring.check import Reference, assess, report_dict
    from monitoring.drift_report import render_report
    from specs import DatasetSpec, MonitoringSpec
    from stages.scoring import drift_window

    spec, dataset = MonitoringSpec.model_validate(monitoring_spec), DatasetSpec.model_validate(dataset_spec)
    with open(champion.path, encoding="utf-8") as handle:
        reference = Reference.from_dict(json.load(handle))
    window = drift_window(clean.path, predictions.path, dataset.target)
    checked = assess(window, reference.profile, spec, dataset.features, model_version=reference.model_version,
                     suite=suite, labels=reference.label_mapping)
    drift = checked.report
    for name, value in drift.metrics().items():
        metrics.log_metric(name, value)
    with open(named_file(report, ".html"), "w", encoding="utf-8") as handle:
        handle.write(render_report(drift, reference.profile, title="Batch scoring drift report"))
    verdict = "not enough data" if not drift.enough_data else "drift" if drift.breaches else "no drift"
    with open(summary.path, "w", encoding="utf-8") as handle:
        json.dump({"verdict": verdict, "report": report_dict(drift), "model_version": reference.model_version}, handle)
    for artifact in (report, summary):
        artifact.metadata.update({"model_version": reference.model_version, "rows": drift.rows, "verdict": verdict,
                                  "breaches": len(drift.breaches), "drifted": ", ".join(drift.drifted)})
    for breach in drift.breaches:
        print(f"breach: {breach}")
    return verdict
