"""What `flywheel monitor` shows: the per-feature drift table, and the env's training suite for the
quality check (`monitoring.publish` sends the numbers to the monitor service)."""
from __future__ import annotations

from pipelines.config import CONFIG_DIR, Settings


def suite_for(settings: Settings) -> dict:
    """The training expectation suite, checked on the live rows."""
    from stages.validation import load_suite

    return load_suite(settings.dataset, CONFIG_DIR)


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10 ** -digits and value else f"{value:.{digits}f}"


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
        table.add_column(column, justify=justify, no_wrap=True, overflow="ellipsis")
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
