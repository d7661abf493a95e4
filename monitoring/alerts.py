"""The Alertmanager webhook (payload version 4) as the monitor service's `POST /alerts` reads it:
what makes a payload not one, which of its alerts ask for retraining (firing, labelled
`flywheel_action="retrain"`), and the adapter that hands them to a guarded trigger's `fire`.
Alertmanager's webhook format: https://prometheus.io/docs/alerting/latest/configuration/#webhook_config
"""
from __future__ import annotations

from collections.abc import Callable

RETRAIN_LABEL, RETRAIN_VALUE = "flywheel_action", "retrain"
ALERT_STATUSES = ("firing", "resolved")


def alert_problems(payload) -> list[str]:
    """What makes `payload` not an Alertmanager webhook payload (version 4); empty when it is one."""
    if not isinstance(payload, dict):
        return ["the payload is not a JSON object"]
    problems = []
    if payload.get("version") != "4":
        problems.append(f"version must be \"4\" (Alertmanager's webhook format), got {payload.get('version')!r}")
    if payload.get("status") not in ALERT_STATUSES:
        problems.append(f"status must be one of {ALERT_STATUSES}, got {payload.get('status')!r}")
    for key in ("receiver", "groupKey"):
        if not isinstance(payload.get(key), str):
            problems.append(f"{key} must be a string")
    for key in ("groupLabels", "commonLabels", "commonAnnotations"):
        if key in payload and not isinstance(payload[key], dict):
            problems.append(f"{key} must be an object")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        return [*problems, "alerts must be a list"]
    for k, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            problems.append(f"alerts[{k}] is not an object")
            continue
        if alert.get("status") not in ALERT_STATUSES:
            problems.append(f"alerts[{k}].status must be one of {ALERT_STATUSES}")
        labels = alert.get("labels")
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            problems.append(f"alerts[{k}].labels must be an object of strings")
        if "annotations" in alert and not isinstance(alert["annotations"], dict):
            problems.append(f"alerts[{k}].annotations must be an object")
        if not isinstance(alert.get("startsAt"), str):
            problems.append(f"alerts[{k}].startsAt must be a time string")
    return problems


def retrain_alerts(payload: dict) -> list[dict]:
    """The firing alerts of a webhook payload that ask for retraining."""
    return [a for a in payload["alerts"]
            if a["status"] == "firing" and a["labels"].get(RETRAIN_LABEL) == RETRAIN_VALUE]


def alert_trigger(fire: Callable[[list[str], str, str], dict]) -> Callable[[dict], dict]:
    """Adapt a `fire(reasons, source, dedup_key) -> decision` (`monitoring.trigger.GuardedTrigger.fire`)
    to the app's trigger: reasons are the alerts' names and summaries, and the dedup key is made of
    their fingerprints and start times, so Alertmanager repeating the same notification is one key."""

    def trigger(payload: dict) -> dict:
        reasons, keys = [], []
        for alert in payload["alerts"]:
            labels, notes = alert["labels"], alert.get("annotations") or {}
            name = labels.get("alertname", "alert")
            summary = notes.get("summary") or notes.get("description") or ""
            reasons.append(f"alert {name}" + (f": {summary}" if summary else ""))
            keys.append(f"{alert.get('fingerprint') or name}@{alert.get('startsAt', '')}")
        return fire(reasons, "alert", "alert/" + ",".join(sorted(keys)))

    return trigger
