"""Every retraining-trigger decision, started or refused, as an MLflow run in the env's experiment.

A run per decision, tagged `flywheel.stage=retraining-trigger`, so the MLflow UI lists them beside
the training and evaluation runs they led to (search `tags."flywheel.stage" = 'retraining-trigger'`):
params hold the source, the dedup key and each reason; tags the outcome (started, guard, why, the
run id it started); the metric `started` is 1 or 0.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable

from specs import TrackingSpec
from stages.tracking import _client, experiment_id

STAGE = "retraining-trigger"
MAX_TAG, MAX_PARAM = 5000, 6000


def log_trigger_decision(tracking_uri: str, experiment: str, decision: dict) -> str:
    """Log one decision of `monitoring.trigger.GuardedTrigger.fire`; the MLflow run id."""
    from mlflow.entities import Metric, Param, RunTag

    reasons = [str(r) for r in decision.get("reasons") or []]
    outcome = "started" if decision.get("started") else f"refused ({decision.get('guard')})"
    tags = {
        "flywheel.stage": STAGE, "flywheel.env": decision.get("env"),
        "flywheel.trigger.source": decision.get("source"),
        "flywheel.trigger.started": str(bool(decision.get("started"))).lower(),
        "flywheel.trigger.guard": decision.get("guard") or "", "flywheel.trigger.why": decision.get("why"),
        "flywheel.trigger.dedup_key": decision.get("dedup_key"),
        "flywheel.trigger.run_id": decision.get("run_id") or "",
        "flywheel.trigger.reasons": "; ".join(reasons),
    }
    client = _client(tracking_uri)
    run = client.create_run(experiment_id(tracking_uri, experiment),
                            run_name=f"{STAGE} {decision.get('source')}: {outcome}",
                            tags={k: str(v)[:MAX_TAG] for k, v in tags.items() if v is not None})
    run_id = run.info.run_id
    try:
        params = {"source": decision.get("source"), "dedup_key": decision.get("dedup_key"), "reasons": len(reasons),
                  **{f"reason_{i}": reason for i, reason in enumerate(reasons[:90])}}
        now = int(float(decision.get("at") or time.time()) * 1000)
        client.log_batch(run_id, params=[Param(k, str(v)[:MAX_PARAM]) for k, v in params.items()],
                         metrics=[Metric("started", float(bool(decision.get("started"))), now, 0),
                                  Metric("runs_in_flight", float(len(decision.get("in_flight") or [])), now, 0)],
                         tags=[RunTag("flywheel.trigger.in_flight",
                                      json.dumps(decision.get("in_flight") or [], default=str)[:MAX_TAG])])
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def mlflow_audit(tracking: TrackingSpec | dict) -> Callable[[dict], None]:
    """The `audit` callable of a GuardedTrigger: each decision to the tracking spec's experiment."""
    spec = tracking if isinstance(tracking, TrackingSpec) else TrackingSpec.model_validate(tracking)

    def audit(decision: dict) -> None:
        log_trigger_decision(spec.tracking_uri, spec.experiment, decision)

    return audit
