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
    """A rich Table: one row per feature (PSI, test, adjusted p, missing rates, drifted, why),
    then the prediction and live-AUC rows."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("feature", "kind", "PSI", "test", "statistic", "p adj.", "missing live/train", "drifted", "why"):
        table.add_column(column, overflow="fold")
    for f in report.features:
        table.add_row(f.feature, f.kind, _number(f.psi), f.test or "-", _number(f.statistic), _number(f.p_adjusted),
                      f"{f.missing_rate:.1%} / {f.reference_missing_rate:.1%}",
                      "[red]yes[/red]" if f.drifted or f.missing_breach else "no", "; ".join(f.reasons))
    table.add_row("(prediction)", "score", _number(report.prediction_psi), "", "", "", "", "", "")
    if report.live_roc_auc is not None:
        table.add_row("(live ROC AUC)", f"{report.truth_rows:,} labelled", _number(report.live_roc_auc), "", "", "",
                      "", "", "")
    return table
