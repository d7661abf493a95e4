"""The monitoring check with an environment's settings, as `flywheel monitor` and the loop demo run
it (`check_traffic`: `monitoring.check.run_check`, then the numbers to the monitor service's
`POST /drift`), and what `flywheel monitor` shows of it: the per-feature drift table."""
from __future__ import annotations

import pandas as pd

from monitoring.check import CheckResult, Reference
from pipelines.config import CONFIG_DIR, Settings


def suite_for(settings: Settings) -> dict:
    """The training expectation suite, checked on the live rows."""
    from stages.validation import load_suite

    return load_suite(settings.dataset, CONFIG_DIR)


def check_traffic(settings: Settings, window: pd.DataFrame, reference: Reference) -> tuple[CheckResult, str | None]:
    """Check `window` against the champion's `reference` with the env's thresholds, features and
    training suite, recorded in the history under its sink root; then, when the env names a sink
    URL, its numbers posted as the monitor's drift gauges. (The result; what posting said, or None.)"""
    from monitoring.check import run_check
    from monitoring.publish import post_drift

    spec = settings.monitoring
    result = run_check(window, reference.profile, spec, settings.dataset.features,
                       model_version=reference.model_version, root=spec.sink.root, suite=suite_for(settings),
                       labels=reference.label_mapping, env=settings.env)
    posted = post_drift(spec.sink.url, reference.model_version, result.report.metrics()) if spec.sink.url else None
    return result, posted


def _number(value, digits: int = 3) -> str:
    """Fixed decimals; a value too small for them in scientific notation with one decimal, so
    that it stays short (8.6e-100, not a cut-off 8.61e-1...)."""
    if value is None:
        return "-"
    return f"{value:.1e}" if abs(value) < 10 ** -digits and value else f"{value:.{digits}f}"


def drift_table(report, title: str):
    """A rich renderable that fits 80 columns: the table (one row per feature: PSI, test and its
    statistic, adjusted p, missing % live/training, drifted; then the prediction and live-AUC
    rows) and, under it, each flagged feature's reasons as plain lines (a reasons column would
    wrap into a sliver at 80 columns: rich shrinks the widest column first)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for column, justify in (("feature", "left"), ("kind", "left"), ("PSI", "right"), ("test", "left"),
                            ("p adj.", "right"), ("missing %", "right"), ("drift", "left")):
        table.add_column(column, justify=justify, no_wrap=True, overflow="ellipsis", min_width=len(column))
    for f in report.features:
        test = f"{f.test} {_number(f.statistic)}" if f.test else "-"
        table.add_row(f.feature, "num" if f.kind == "numeric" else "cat" if f.kind == "categorical" else f.kind,
                      _number(f.psi), test, _number(f.p_adjusted),
                      f"{f.missing_rate * 100:.1f}/{f.reference_missing_rate * 100:.1f}",
                      "[red]yes[/red]" if f.drifted or f.missing_breach else "no")
    table.add_row("(prediction)", "score", _number(report.prediction_psi), "", "", "", "")
    if report.live_roc_auc is not None:
        table.add_row("(live ROC AUC)", "", _number(report.live_roc_auc), f"n={report.truth_rows:,}", "", "", "")
    reasons = [Text.assemble((f.feature, "bold"), ": ", "; ".join(f.reasons))
               for f in report.features if f.reasons]
    return Group(table, *reasons)
