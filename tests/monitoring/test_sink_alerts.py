"""The monitor service's Alertmanager hook: firing retrain alerts call the retraining trigger, nothing
else does; malformed payloads are a 400, a failing trigger a 500 (Alertmanager retries); and
`alert_trigger` gives repeated alerts the same dedup key."""
import json
import uuid

import pytest

from monitoring.sink import PayloadSink
from specs.monitoring import SinkSpec

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def alert(status: str = "firing", **labels) -> dict:
    return {"status": status, "labels": {"alertname": "FlywheelDrift", **labels},
            "annotations": {"summary": "prediction PSI 0.4 > 0.2"}, "startsAt": "2026-01-01T00:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prometheus/graph",
            "fingerprint": uuid.uuid4().hex}


def webhook(*alerts: dict, status: str = "firing") -> dict:
    return {"version": "4", "groupKey": '{}:{alertname="FlywheelDrift"}', "truncatedAlerts": 0, "status": status,
            "receiver": "flywheel-retrain", "groupLabels": {"alertname": "FlywheelDrift"}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": "http://alertmanager", "alerts": list(alerts)}


def test_alerts_call_the_trigger_for_firing_retrain_alerts_only(tmp_path):
    from starlette.testclient import TestClient

    from monitoring.alerts import alert_trigger
    from monitoring.service import create_app

    calls = []

    def trigger(payload: dict) -> dict:
        calls.append(payload)
        return {"started": True, "run_id": "run-1"}

    sink = PayloadSink(str(tmp_path), SinkSpec(root=str(tmp_path)), start=False)
    with TestClient(create_app(sink, trigger)) as client:
        # Given a notification with a firing retrain alert, a resolved one and a firing page
        retrain = alert(flywheel_action="retrain")
        payload = webhook(retrain, alert("resolved", flywheel_action="retrain"), alert(severity="page"))
        # When Alertmanager posts it, Then the trigger gets the payload with the firing retrain alert only
        answer = client.post("/alerts", json=payload)
        assert answer.status_code == 202
        assert answer.json() == {"triggered": True, "alerts": 1, "decision": {"started": True, "run_id": "run-1"}}
        assert len(calls) == 1 and calls[0]["alerts"] == [retrain] and calls[0]["receiver"] == "flywheel-retrain"
        # And notifications without a firing retrain alert do not call it
        for quiet in (webhook(alert("resolved", flywheel_action="retrain"), status="resolved"),
                      webhook(alert(flywheel_action="page")), webhook()):
            answer = client.post("/alerts", json=quiet)
            assert answer.status_code == 202 and answer.json()["triggered"] is False
        # And malformed payloads are a 400 that never reaches the trigger
        broken = [b"{", json.dumps({**payload, "version": "3"}).encode(),
                  json.dumps({k: v for k, v in payload.items() if k != "alerts"}).encode(),
                  json.dumps(webhook({**retrain, "labels": {"flywheel_action": 1}})).encode(),
                  json.dumps(webhook({**retrain, "status": "pending"})).encode(), b"[]"]
        for body in broken:
            answer = client.post("/alerts", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 400 and answer.json()["error"], body
        assert len(calls) == 1
    # And a trigger that fails is a 500 (Alertmanager retries), a missing one a 202 that says so
    def failing(payload):
        raise RuntimeError("KFP unreachable")

    with TestClient(create_app(sink, failing)) as client:
        answer = client.post("/alerts", json=webhook(alert(flywheel_action="retrain")))
        assert answer.status_code == 500 and "KFP unreachable" in answer.json()["error"]
    with TestClient(create_app(sink)) as client:
        answer = client.post("/alerts", json=webhook(alert(flywheel_action="retrain")))
        assert answer.status_code == 202 and answer.json()["triggered"] is False
    # And alert_trigger adapts a guarded trigger's fire(reasons, source, dedup_key): the same alerts
    # repeated by Alertmanager are the same dedup key
    fired = []
    adapted = alert_trigger(lambda reasons, source, key: fired.append((reasons, source, key)) or {"started": False})
    same = webhook(alert(flywheel_action="retrain"))
    adapted(same), adapted(json.loads(json.dumps(same)))
    assert fired[0] == fired[1] and fired[0][1] == "alert"
    assert fired[0][0] == ["alert FlywheelDrift: prediction PSI 0.4 > 0.2"]

