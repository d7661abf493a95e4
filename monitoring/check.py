"""The monitoring check, in one place: a window of logged traffic against the champion's reference
profile (`assess`), then the decision with hysteresis over the checks before it (`conclude`).
`run_check` is both; the monitoring pipeline runs them as two ops (drift, decide), and
`flywheel monitor`, the loop demo and the monitor service's drift gauges (`POST /drift`, through
`monitoring.publish`) all read what it returns.

The history of checks is kept per model version beside the sink's windows:

    <sink root>/checks/model_version=<v>/history.json    the last KEEP_HISTORY checks' summaries

A summary is what `decide` needs of a report (breaches, enough_data, rows) plus the flat metrics
and the window it was computed on; checking the same window twice (no new traffic between two
scheduled checks) replaces its entry instead of counting twice towards `consecutive_windows`.

A window is the newest `window_rows` rows, so two checks can share most of their rows. A check is
new evidence only when at least `min_samples` of its rows are newer than the newest event of the
last check that was (`evidence`): one that is not is recorded with `new_evidence: false`, and
`decide` neither counts it towards the streak nor lets it break one, nor decides on it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

import storage
from model.labels import LabelMapping
from monitoring.drift import DriftReport, check_window
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


# ------------------------------------------------------------------------ the decision (hysteresis)


@dataclass
class Decision:
    """Whether to retrain, and why (or why not).

    Attributes:
        retrain: The decision.
        reasons: Why (the breaches that made it, or why not).
        streak: Consecutive breaching windows up to the latest.
        dedup_key: Names this decision for the trigger: same window, same key (set by `conclude`).
    """

    retrain: bool
    reasons: list[str]
    streak: int = 0
    dedup_key: str = ""


def _get(report: DriftReport | dict, name: str, default=None):
    return report.get(name, default) if isinstance(report, dict) else getattr(report, name, default)


def decide(history: Sequence[DriftReport | dict], spec: MonitoringSpec) -> Decision:
    """Retrain when each of the last `spec.consecutive_windows` checks (oldest first in `history`)
    had enough data and breached; otherwise say why not. A check recorded with `new_evidence`
    False (fewer than min_samples rows newer than the checks before it: see `evidence`)
    neither adds to the streak nor breaks it, and no decision is made on it."""
    need = spec.consecutive_windows
    if not history:
        return Decision(False, ["no window checked yet"])
    streak = 0
    for report in reversed(history):
        if not _get(report, "enough_data"):
            break
        if _get(report, "new_evidence") is False:
            continue  # mostly the rows of the checks before it: not new evidence either way
        if not _get(report, "breaches"):
            break
        streak += 1
    latest = history[-1]
    if _get(latest, "enough_data") and _get(latest, "new_evidence") is False:
        return Decision(False, [f"{streak} of {need} consecutive breaching windows: the latest window has "
                                f"{_get(latest, 'new_rows', 0):,} rows newer than the last check that counted "
                                f"(< min_samples {spec.min_samples}): it overlaps the checks before it, so it is "
                                "not new evidence"], streak)
    if streak >= need:
        reasons = [f"{need} consecutive breaching windows ({streak} in a row)"]
        reasons += [f"latest window ({_get(latest, 'rows', 0):,} rows): {b}" for b in _get(latest, "breaches")]
        return Decision(True, reasons, streak)
    why = f"{streak} of {need} consecutive breaching windows"
    if not _get(latest, "enough_data"):
        why += (f": the latest window had {_get(latest, 'rows', 0):,} rows (< min_samples {spec.min_samples}), "
                "no decision on it")
    elif not _get(latest, "breaches"):
        why += ": the latest window had no breach"
    else:
        why += ": the breach has to persist before retraining"
    return Decision(False, [why], streak)


# ------------------------------------------------------------------------------------ the check


@dataclass
class Reference:
    """What a check compares live traffic with: the champion's version, its training profile, its
    label mapping and its features, as saved with the model (and as the champion op's JSON)."""

    model_version: str
    profile: dict
    labels: dict | None = None
    features: dict | None = None

    @classmethod
    def from_model_dir(cls, model_dir: str, model_version: str) -> Reference:
        """The reference saved in a model directory (ValueError: a model saved without a profile)."""
        from model.artifact import read_metadata
        from monitoring.reference_profile import load_profile

        profile, metadata = load_profile(model_dir), read_metadata(model_dir)
        return cls(str(model_version), profile, metadata.get("labels"), metadata.get("features"))

    @classmethod
    def from_dict(cls, data: dict) -> Reference:
        return cls(str(data["model_version"]), data["profile"], data.get("labels"), data.get("features"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def label_mapping(self) -> LabelMapping:
        return LabelMapping.from_dict(self.labels)


@dataclass
class Assessment:
    """A checked window: its DriftReport, and the summary the history records for it."""

    report: DriftReport
    entry: dict


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

    report: DriftReport
    entry: dict
    retrain: bool
    reasons: list[str]
    history: list[dict] = field(default_factory=list)
    dedup_key: str = ""
    html: str | None = None


def assess(window: pd.DataFrame, profile: dict, spec: MonitoringSpec, features, *, model_version: str | None,
           root: str | None = None, suite: dict | None = None, labels: LabelMapping | None = None,
           now: dt.datetime | None = None) -> Assessment:
    """Check `window` against `profile` and summarise it for the history under `root` (read, not
    written: how much of the window is newer than the checks before it; none: all of it)."""
    report = check_window(window, profile, spec, features, suite=suite, labels=labels)
    key = window_key(window, model_version)
    before = load_history(history_uri(root, model_version)) if root else []
    return Assessment(report, {**summary(report, key, now), **evidence(before, window, key, spec.min_samples)})


def conclude(entry: dict, spec: MonitoringSpec, *, model_version: str | None, root: str | None = None,
             env: str = "") -> tuple[Decision, list[dict]]:
    """Record `entry` in the history under `root` (none: a history of this check alone) and decide
    on it: (the decision with its dedup key, the history it was made on)."""
    uri = history_uri(root, model_version) if root else None
    history = record(load_history(uri) if uri else [], entry)
    if uri:
        save_history(uri, history)
    decision = decide(history, spec)
    decision.reasons = [str(r) for r in decision.reasons]
    decision.dedup_key = f"drift/{env}/{history[-1]['window']}"
    return decision, history


def run_check(window: pd.DataFrame, profile: dict, spec: MonitoringSpec, features, *, model_version: str | None,
              root: str | None = None, suite: dict | None = None, labels: LabelMapping | None = None, env: str = "",
              render: bool = True, now: dt.datetime | None = None) -> CheckResult:
    """Check `window`, record it in the history under `root` (none: a history of this check alone),
    decide, and render the report."""
    checked = assess(window, profile, spec, features, model_version=model_version, root=root, suite=suite,
                     labels=labels, now=now)
    decision, history = conclude(checked.entry, spec, model_version=model_version, root=root, env=env)
    html = None
    if render:
        from monitoring.drift_report import render_report

        html = render_report(checked.report, profile)
    return CheckResult(checked.report, checked.entry, decision.retrain, decision.reasons, history,
                       decision.dedup_key, html)
