"""One monitoring check, the same in the monitoring pipeline's ops and in `flywheel monitor`:
a window of logged traffic against the champion's reference profile, then the decision with
hysteresis over the checks before it.

The history of checks is kept per model version beside the sink's windows:

    <sink root>/checks/model_version=<v>/history.json    the last KEEP_HISTORY checks' summaries

A summary is what `decide` needs of a report (breaches, enough_data, rows) plus the flat metrics
and the window it was computed on; checking the same window twice (no new traffic between two
scheduled checks) replaces its entry instead of counting twice towards `consecutive_windows`.

A window is the newest `window_rows` rows, so two checks can share most of their rows. A check is
new evidence only when at least `min_samples` of its rows are newer than the newest event of the
last check that was (`evidence`): one that is not is recorded with `new_evidence: false`, and
`monitoring.drift.decide` neither counts it towards the streak nor lets it break one, nor decides
on it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass, field

import pandas as pd

import storage
from monitoring.windows import EVENT_TIME, partition_name
from specs import MonitoringSpec

KEEP_HISTORY = 100


def _plain(value):
    """JSON-able: numpy scalars and arrays, pandas timestamps, NaN (-> None), nested containers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (pd.Timestamp, dt.datetime, dt.date)):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def report_dict(report) -> dict:
    """A DriftReport as plain JSON-able data (its own `to_dict` when it has one)."""
    if isinstance(report, dict):
        return _plain(report)
    if hasattr(report, "to_dict"):
        return _plain(report.to_dict())
    if dataclasses.is_dataclass(report):
        return _plain(dataclasses.asdict(report))
    return _plain(vars(report))


def window_key(window: pd.DataFrame, model_version: str | None) -> str:
    """Names the traffic a check saw: the model version, the time span and the row count."""
    version = partition_name(model_version)
    if window.empty or EVENT_TIME not in window.columns:
        return f"v{version}/empty"
    times = pd.to_datetime(window[EVENT_TIME], utc=True)
    return f"v{version}/{times.min():%Y%m%dT%H%M%S}-{times.max():%Y%m%dT%H%M%S}/{len(window)}"


def summary(report, key: str, now: dt.datetime | None = None) -> dict:
    """What the history keeps of a check: `decide`'s inputs, the metrics and the window's key."""
    data = report_dict(report)
    return {
        "window": key, "at": (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
        "rows": data.get("rows"), "enough_data": bool(data.get("enough_data")),
        "breaches": list(data.get("breaches") or []),
        "metrics": _plain(report.metrics() if hasattr(report, "metrics") else data.get("metrics", {})),
    }


def history_uri(root: str, model_version: str | None) -> str:
    return storage.join(root, "checks", f"model_version={partition_name(model_version)}", "history.json")


def load_history(uri: str) -> list[dict]:
    if not storage.exists(uri):
        return []
    with storage.open_uri(uri, "rb") as handle:
        data = json.loads(handle.read() or b"[]")
    return data if isinstance(data, list) else []


def _before(history: list[dict], key: str) -> list[dict]:
    """The history `record` adds an entry for window `key` to: a last entry of the same window goes."""
    history = [h for h in history if isinstance(h, dict)]
    if history and history[-1].get("window") == key:
        history = history[:-1]
    return history


def evidence(history: list[dict], window: pd.DataFrame, key: str, min_samples: int) -> dict:
    """What of `window` (to be recorded as `key`) is new: {newest, since, new_rows, new_evidence}.

    `since` is the newest event of the last check in `history` that had enough data and was new
    evidence; `new_rows` are the window's rows after it (all of them when there is none). Fewer
    than `min_samples`: the window overlaps the checks before it, `new_evidence` is False."""
    if window.empty or EVENT_TIME not in window.columns:
        return {"newest": None, "since": None, "new_rows": 0, "new_evidence": False}
    times = pd.to_datetime(window[EVENT_TIME], utc=True)
    since = next((h["newest"] for h in reversed(_before(history, key))
                  if h.get("enough_data") and h.get("new_evidence", True) and h.get("newest")), None)
    new = len(times) if since is None else int((times > pd.Timestamp(since)).sum())
    return {"newest": times.max().isoformat(), "since": since, "new_rows": new, "new_evidence": new >= min_samples}


def record(history: list[dict], entry: dict) -> list[dict]:
    """The history with `entry` appended, or replacing the last entry when it saw the same window."""
    return [*_before(history, entry["window"]), entry][-KEEP_HISTORY:]


def save_history(uri: str, history: list[dict]) -> None:
    storage.write_atomic(uri, json.dumps(history[-KEEP_HISTORY:], indent=1).encode())


@dataclass
class CheckResult:
    """A check and its decision.

    Attributes:
        report: The DriftReport of the window.
        entry: Its summary, as recorded in the history.
        retrain: The decision (hysteresis over the history).
        reasons: Why (the breaches that made it, or why not).
        history: The history the decision was made on, this check last.
        dedup_key: Names this decision for the trigger: same window, same key.
        html: The drift report page, when rendered.
    """

    report: object
    entry: dict
    retrain: bool
    reasons: list[str]
    history: list[dict] = field(default_factory=list)
    dedup_key: str = ""
    html: str | None = None


def decide_on(history: list[dict], spec: MonitoringSpec, env: str = "") -> tuple[bool, list[str], str]:
    """(retrain, reasons, dedup key) from a history whose last entry is the current check."""
    from monitoring.drift import decide

    decision = decide(history, spec)
    key = f"drift/{env}/{history[-1]['window']}" if history else f"drift/{env}/none"
    return bool(decision.retrain), [str(r) for r in decision.reasons], key


def run_check(window: pd.DataFrame, profile: dict, spec: MonitoringSpec, features, *, model_version: str | None,
              root: str | None = None, suite: dict | None = None, labels=None, env: str = "",
              render: bool = True, now: dt.datetime | None = None) -> CheckResult:
    """Check `window`, record it in the history under `root` (none: a history of this check alone),
    decide, and render the report."""
    from monitoring.drift import check_window

    report = check_window(window, profile, spec, features, suite=suite, labels=labels)
    key = window_key(window, model_version)
    uri = history_uri(root, model_version) if root else None
    before = load_history(uri) if uri else []
    entry = {**summary(report, key, now), **evidence(before, window, key, spec.min_samples)}
    history = record(before, entry)
    if uri:
        save_history(uri, history)
    retrain, reasons, key = decide_on(history, spec, env)
    html = None
    if render:
        from monitoring.report import render_report

        html = render_report(report, profile)
    return CheckResult(report, entry, retrain, reasons, history, key, html)
