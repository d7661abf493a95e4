"""KFP validate stage: a thin wrapper over components.validation.

`component(validate_op, image)` builds the task. It writes the GX result JSON and the HTML report
first, then fails the task on a blocking expectation, so the run record keeps both reports.
"""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output


def validate_op(
    dataset: Input[Dataset],
    suite: dict,
    report: Output[HTML],
    result: Output[Artifact],
    metrics: Output[Metrics],
):
    """Validate `dataset` against `suite` (compiled in by load_suite); raise ValidationFailed on a
    blocking failure after the reports and metrics are written."""
    import json
    import os

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    from components.validation import ValidationFailed, render_html, validate_file

    outcome = validate_file(dataset.path, suite, id_column=suite.get("id_column"))
    content_hash = dataset.metadata.get("content_hash")
    if not content_hash:  # upstream gave none: hash the table, or the bytes if it won't parse
        from components.dataset import content_hash as hash_frame, file_hash
        from components.validation import read_for_validation

        content_hash = hash_frame(read_for_validation(dataset.path)) if outcome.rows else file_hash(dataset.path)

    lineage = {"dataset_content_hash": content_hash or "", "dataset_uri": dataset.uri,
               "suite": outcome.suite_name, "passed": outcome.passed}
    with open(result.path, "w") as fh:
        json.dump(outcome.to_dict(), fh, indent=1)
    with open(report.path, "w") as fh:
        fh.write(render_html(outcome))
    result.metadata.update(lineage, **outcome.metrics())
    report.metadata.update(lineage)
    for name, value in outcome.metrics().items():
        metrics.log_metric(name, value)
    if not outcome.passed:
        raise ValidationFailed(outcome)
