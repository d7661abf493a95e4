"""Validate: the data gate before training, a thin wrapper over `stages.validation`.

It writes the GX result JSON and the HTML report first, then fails the task on a blocking
expectation, so the run record keeps both reports.
"""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output


def validate_op(
    dataset: Input[Dataset],
    suite: dict,
    report: Output[HTML],
    result: Output[Artifact],
    metrics: Output[Metrics],
):
    """Validate the dataset against its expectation suite; fail the task on a blocking failure.

    Args:
        dataset: The ingested snapshot.
        suite: The expectation suite, compiled into the pipeline from config/expectations/.

    Returns:
        report: HTML report (report.html) naming each failed expectation, its columns and sample rows.
        result: The full validation result as JSON (result.json).
        metrics: Expectation counts and the unexpected-value rate.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import json
    import os

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    from components.factory import named_file
    from stages.validation import ValidationFailed, render_html, validate_file
    from storage.tables import file_hash

    outcome = validate_file(dataset.path, suite, id_column=suite.get("id_column"))
    lineage = {"dataset_content_hash": dataset.metadata.get("content_hash") or file_hash(dataset.path),
               "dataset_uri": dataset.uri, "suite": outcome.suite_name, "passed": outcome.passed}
    with open(named_file(result, ".json"), "w") as fh:
        json.dump(outcome.to_dict(), fh, indent=1)
    with open(named_file(report, ".html"), "w", encoding="utf-8") as fh:
        fh.write(render_html(outcome))
    result.metadata.update(lineage, **outcome.metrics())
    report.metadata.update(lineage)
    for name, value in outcome.metrics().items():
        metrics.log_metric(name, value)
    if not outcome.passed:
        raise ValidationFailed(outcome)
