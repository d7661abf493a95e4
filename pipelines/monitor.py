"""What `flywheel monitor` shows and sends: the per-feature drift table, the env's training suite
for the quality check, and the check's metrics posted to the monitor service's `/drift` (which
turns them into the `flywheel_monitor_*drift` gauges Prometheus alerts on)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

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


def drift_url(sink_url: str) -> str:
    """The monitor service's /drift, from the sink URL serving sends events to (its /events)."""
    base = sink_url.rstrip("/")
    return base.removesuffix("/events") + "/drift"


def post_drift(sink_url: str, model_version: str, metrics: dict, timeout: float = 10.0) -> str:
    """POST the check's flat metrics to the monitor service; a line saying what happened (a
    monitor that is down does not fail the check)."""
    url = drift_url(sink_url)
    body = json.dumps({"model_version": str(model_version), "metrics": metrics}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read() or b"{}")
        return f"metrics: {answer.get('gauges', len(metrics))} gauges set at {url}"
    except urllib.error.HTTPError as err:
        return f"metrics: {url} answered HTTP {err.code}: {err.read()[:200].decode('utf-8', 'replace')}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return f"metrics: not posted to {url}: {getattr(err, 'reason', err)}"
