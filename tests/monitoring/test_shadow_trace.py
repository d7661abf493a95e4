"""A champion's rows and its challenger's, logged on a cluster by KServe's agent, pair in the shadow
report on the x-request-id both carry (monitoring/shadow.py), not on their ce-ids.

The events are KServe's agent's, header for header: binary-mode CloudEvents as cloudevents-sdk-go
sends them (Go's canonical header names), `Ce-Id` the agent's own UUID per pod (kserve
pkg/logger/handler.go getOrCreateID), `Ce-Metadata` the JSON of the request headers
`logger.metadataHeaders` names, keyed by Go's canonical name (handler.go; worker.go sets the
`metadata`, `recordedtime`, `inferenceservicename`, `namespace`, `component` and `endpoint`
extensions; cmd/agent/main.go's default source is http://localhost:<port>/).
"""
import json
import uuid
from datetime import UTC, datetime

import pytest

from monitoring import shadow
from monitoring.events import REQUEST_TYPE, RESPONSE_TYPE
from monitoring.windows import TRACE_ID, read_window
from specs.evaluation import ShadowSpec
from tests.monitoring.payloads import NAME, Monitor, Traffic
from tests.monitoring.sink_fixtures import frame, wait_for_rows  # noqa: F401  (fixture)

CHAMPION, CHALLENGER = "7", "8"


def agent_event(kind: str, isvc: str, body: bytes, metadata: dict) -> tuple[dict, bytes]:
    """One event as KServe's agent (the logger) posts it for InferenceService `isvc`."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")  # RFC 3339, nanoseconds as Go writes
    return ({"Ce-Specversion": "1.0", "Ce-Id": str(uuid.uuid4()), "Ce-Type": kind,
             "Ce-Source": "http://localhost:9081/", "Ce-Time": now, "Ce-Recordedtime": now,
             "Ce-Inferenceservicename": isvc, "Ce-Namespace": "ml", "Ce-Component": "predictor",
             "Ce-Endpoint": "", "Ce-Metadata": json.dumps(metadata, separators=(",", ":")),
             "Content-Type": "application/json"}, body)


def call(traffic: Traffic, isvc: str, version: str, rows: list[dict], trace: str | None):
    """The agent's (request, response) events of one call to `isvc`, sharing the agent's ce-id."""
    metadata = {"X-Request-Id": [trace]} if trace else {}
    request = agent_event(REQUEST_TYPE, isvc, json.dumps({"instances": rows}).encode(), metadata)
    body = json.dumps(traffic.codec.to_v1(traffic.rng.random(len(rows)), NAME, version)).encode()
    response = agent_event(RESPONSE_TYPE, isvc, body, metadata)
    response[0]["Ce-Id"] = request[0]["Ce-Id"]  # one call, one id: the agent's getOrCreateID, once
    return request, response


@pytest.fixture
def monitor(tmp_path):
    server = Monitor(tmp_path / "windows", tmp_path / "monitor.log", "--flush-seconds", "0.2")
    yield server
    server.stop()


def test_the_agents_rows_of_a_call_and_its_mirrored_copy_pair_on_x_request_id(monitor, frame):
    traffic = Traffic(frame)
    # Given three calls mirrored to the challenger (each pod's agent with its own ce-id, the same
    # x-request-id), one call the mirror skipped, and one mirrored call logged without the header
    mirrored = [(uuid.uuid4().hex, traffic.records(2, start=2 * i)) for i in range(3)]
    events = []
    for trace, rows in mirrored:
        events += call(traffic, "credit", CHAMPION, rows, trace)
        events += call(traffic, "credit-challenger", shadow.shadow_version(CHALLENGER), rows, trace)
    events += call(traffic, "credit", CHAMPION, traffic.records(2, start=10), uuid.uuid4().hex)
    untraced = traffic.records(2, start=12)
    events += call(traffic, "credit", CHAMPION, untraced, None)
    events += call(traffic, "credit-challenger", shadow.shadow_version(CHALLENGER), untraced, None)
    # When the monitor takes them
    assert [monitor.send(e).status_code for e in events] == [202] * len(events)
    wait_for_rows(monitor.root, 8, model_version=CHAMPION)
    wait_for_rows(monitor.root, 8, model_version=shadow.shadow_version(CHALLENGER))
    # Then every row keeps its call's x-request-id (none where the agent forwarded none)
    champion = read_window(str(monitor.root), model_version=CHAMPION)
    assert champion[TRACE_ID].notna().sum() == 8 and champion[TRACE_ID].isna().sum() == 2
    # And the report pairs exactly the mirrored, traced calls' instances, though no ce-id is shared
    report = shadow.load(str(monitor.root), CHAMPION, CHALLENGER, ShadowSpec())
    assert (report.rows, report.champion_rows, report.shadow_rows) == (6, 10, 8)
    rows = shadow.matched(champion, read_window(str(monitor.root),
                                                model_version=shadow.shadow_version(CHALLENGER)))
    assert sorted(rows["request_id"].unique()) == sorted(f"trace:{t}" for t, _ in mirrored)


def test_a_client_sent_ce_id_shared_by_both_pods_still_pairs_each_pods_own_halves(monitor, frame):
    # Given a client that sends its own Ce-Id: both agents take it (getOrCreateID), as the mirrored
    # copy carries every header, so the champion's and the challenger's four events share one ce-id
    traffic, trace, shared = Traffic(frame), uuid.uuid4().hex, str(uuid.uuid4())
    rows = traffic.records(3, start=20)
    champion = call(traffic, "credit", CHAMPION, rows, trace)
    challenger = call(traffic, "credit-challenger", shadow.shadow_version(CHALLENGER), rows, trace)
    for headers, _ in (*champion, *challenger):
        headers["Ce-Id"] = shared
    # When they arrive interleaved (a request of each, then the responses)
    for event in (champion[0], challenger[0], challenger[1], champion[1]):
        assert monitor.send(event).status_code == 202
    # Then each version's rows are its own call's: the request id the client sent, its own answers
    for version, (_, body) in ((CHAMPION, champion[1]), (shadow.shadow_version(CHALLENGER), challenger[1])):
        window = wait_for_rows(monitor.root, 3, model_version=version)
        assert window["request_id"].tolist() == [shared] * 3 and window[TRACE_ID].tolist() == [trace] * 3
        assert window["probability"].tolist() == pytest.approx(json.loads(body)["probabilities"])
