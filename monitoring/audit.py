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

from gateways import mlflow_api
from gateways.mlflow_api import Point
from specs import TrackingSpec
from stages.tracking import experiment_id

STAGE = "retraining-trigger"


def log_trigger_decision(tracking_uri: str, experiment: str, decision: dict) -> str:
    """Log one decision of `monitoring.trigger.GuardedTrigger.fire`; the MLflow run id."""
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
    with mlflow_api.run(tracking_uri, experiment_id(tracking_uri, experiment),
                        f"{STAGE} {decision.get('source')}: {outcome}", tags) as run:
        params = {"source": decision.get("source"), "dedup_key": decision.get("dedup_key"), "reasons": len(reasons),
                  **{f"reason_{i}": reason for i, reason in enumerate(reasons[:90])}}
        at = int(float(decision.get("at") or time.time()) * 1000)
        run.log(params={k: str(v) for k, v in params.items()},
                metrics=[Point("started", float(bool(decision.get("started"))), 0, at),
                         Point("runs_in_flight", float(len(decision.get("in_flight") or [])), 0, at)],
                tags={"flywheel.trigger.in_flight": json.dumps(decision.get("in_flight") or [], default=str)})
        return run.run_id


def mlflow_audit(tracking: TrackingSpec | dict) -> Callable[[dict], None]:
    """The `audit` callable of a GuardedTrigger: each decision to the tracking spec's experiment."""
    spec = tracking if isinstance(tracking, TrackingSpec) else TrackingSpec.model_validate(tracking)

    def audit(decision: dict) -> None:
        log_trigger_decision(spec.tracking_uri, spec.experiment, decision)

    return audit
