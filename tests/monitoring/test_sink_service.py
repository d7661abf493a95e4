"""The monitor service's payload sink, in a real server process on loopback: the transformer's
CloudEvents (headers from `serving/payload.py`, bodies as the transformer answers) paired and
written as Parquet windows; malformed events refused with their reason while it stays up; loopback
only; Prometheus counters and drift gauges; the sink settings read from a rendered config file."""
import json
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from monitoring import windows
from monitoring.windows import read_window
from serving.payload import RESPONSE_TYPE
from specs.monitoring import SinkSpec
from tests.monitoring.payloads import COLUMNS, NAME, VERSION
from tests.monitoring.sink_fixtures import frame, monitor, traffic, wait_for_rows, window_of  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def test_transformer_events_are_paired_in_either_order_and_written_one_row_per_instance(monitor, traffic):
    # Given a v1 call of three rows (request first) and a v2 call of two rows (response first)
    v1_id, v2_id = uuid.uuid4().hex, uuid.uuid4().hex
    v1_rows, v2_rows = traffic.records(3, start=0), traffic.records(2, start=3)
    v1_request, v1_response = traffic.call(v1_id, v1_rows, "v1")
    v2_request, v2_response = traffic.call(v2_id, v2_rows, "v2")
    # When the monitor receives them
    answers = [monitor.send(e) for e in (v1_request, v1_response, v2_response, v2_request)]
    # Then each is acknowledged
    assert [a.status_code for a in answers] == [202] * 4, [a.text for a in answers]
    # And after a flush there is one row per instance, with the sink's columns after the features
    window = wait_for_rows(monitor.root, 5)
    assert list(window.columns) == [*COLUMNS, *windows.SINK_COLUMNS]
    for request_id, rows, (_, body) in ((v1_id, v1_rows, v1_response), (v2_id, v2_rows, v2_response)):
        got = window_of(window, request_id)
        assert got["instance"].tolist() == list(range(len(rows)))
        assert got[COLUMNS].to_dict("records") == rows  # the features as the client sent them
        assert set(got["model_name"]) == {NAME} and set(got["model_version"]) == {VERSION}
        assert got["truth"].isna().all()
        response = json.loads(body)
        if "predictions" in response:  # v1: labels and probabilities as the transformer answered
            assert got["prediction"].tolist() == [str(p) for p in response["predictions"]]
            assert np.allclose(got["probability"], response["probabilities"])
        else:
            outputs = {o["name"]: o["data"] for o in response["outputs"]}
            assert got["prediction"].tolist() == [str(p) for p in outputs["label"]]
            assert np.allclose(got["probability"], outputs["probability"])
        # And the row's time is the request's ce-time
        sent = datetime.fromisoformat(traffic_time(v1_request if request_id == v1_id else v2_request))
        assert abs((got["event_time"].iloc[0].to_pydatetime() - sent).total_seconds()) < 1e-3
    # And the files sit in the model_version/date/hour partitions
    files = list(Path(monitor.root).glob("model_version=*/date=*/hour=*/*.parquet"))
    assert files and all(f.parts[-4] == f"model_version={VERSION}" for f in files)
    when = window["event_time"].iloc[0]
    assert any(f.parts[-3] == f"date={when:%Y-%m-%d}" and f.parts[-2] == f"hour={when:%H}" for f in files)


def traffic_time(event) -> str:
    return event[0]["ce-time"]


MALFORMED = [
    # (what, headers change, body, status, words in the message)
    ("no ce-type", {"ce-type": None}, None, 400, "ce-type"),
    ("unknown ce-type", {"ce-type": "org.kubeflow.serving.inference.explain"}, None, 422, "ce-type"),
    ("no ce-id", {"ce-id": None}, None, 400, "ce-id"),
    ("no ce-specversion", {"ce-specversion": None}, None, 400, "specversion"),
    ("bad ce-time", {"ce-time": "yesterday"}, None, 400, "ce-time"),
    ("bad JSON", {}, b'{"instances": [', 400, "JSON"),
    ("empty body", {}, b"", 400, "no data"),
    ("binary body", {"content-type": "application/octet-stream"}, b"\x00\x01", 415, "JSON"),
    ("structured mode", {"content-type": "application/cloudevents+json"}, b"{}", 415, "binary mode"),
    ("not a request", {}, b'{"rows": []}', 422, "instances"),
    ("instances not records", {}, b'{"instances": [[1, 2]]}', 422, "records"),
    ("ragged v2 tensors", {}, json.dumps({"inputs": [{"name": "a", "shape": [2], "data": [1, 2]},
                                                     {"name": "b", "shape": [1], "data": [1]}]}).encode(), 422,
     "values"),
]


BAD_RESPONSES = [
    ("response of no known shape", b'{"scores": [0.1]}', 422, "predictions"),
    ("v2 outputs without label or probability", json.dumps(
        {"outputs": [{"name": "output-0", "shape": [1], "datatype": "FP32", "data": [0.3]}]}).encode(), 422, "label"),
    ("probabilities that are not numbers", b'{"predictions": [1], "probabilities": ["high"]}', 422, "numbers"),
]


def test_malformed_events_get_a_4xx_with_the_reason_and_the_service_stays_up(monitor, traffic):
    request, _ = traffic.call("malformed", traffic.records(1))
    for what, change, body, status, words in MALFORMED:
        # Given an event broken in one way
        headers = {k: v for k, v in {**request[0], **change}.items() if v is not None}
        # When it is sent, Then it is refused with its status and a JSON message saying why
        answer = monitor.client.post("/events", content=request[1] if body is None else body, headers=headers)
        assert answer.status_code == status, (what, answer.text)
        assert words in answer.json()["error"], (what, answer.text)
    for what, body, status, words in BAD_RESPONSES:
        headers = traffic.event(RESPONSE_TYPE, uuid.uuid4().hex, "s", body)[0]
        answer = monitor.client.post("/events", content=body, headers=headers)
        assert answer.status_code == status and words in answer.json()["error"], (what, answer.text)
    # And the service is still up and still pairs good events
    assert monitor.process.poll() is None and monitor.client.get("/healthz").status_code == 200
    good = uuid.uuid4().hex
    assert [monitor.send(e).status_code for e in traffic.call(good, traffic.records(1, start=10))] == [202, 202]
    deadline = time.monotonic() + 15
    while window_of(read_window(str(monitor.root)), good).empty:
        assert time.monotonic() < deadline, monitor.tail()
        time.sleep(0.1)


def test_the_monitor_listens_on_loopback_only_by_default(monitor):
    import psutil

    listening = {c.laddr.ip for c in psutil.Process(monitor.process.pid).connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == monitor.port}
    assert listening == {"127.0.0.1"}


def test_metrics_count_events_by_type_and_code_rows_written_and_the_buffer(monitor, traffic):
    before = {key: monitor.metric("flywheel_monitor_events_total", type=key[0], code=key[1])
              for key in (("request", "202"), ("response", "202"), ("other", "400"))}
    rows_before = monitor.metric("flywheel_monitor_rows_written_total", model_version=VERSION)
    # Given two calls of 2 rows, a lone request, and an event without a type
    for _ in range(2):
        for event in traffic.call(uuid.uuid4().hex, traffic.records(2, start=20)):
            assert monitor.send(event).status_code == 202
    lone = traffic.call(uuid.uuid4().hex, traffic.records(1))[0]
    assert monitor.send(lone).status_code == 202
    headers = {k: v for k, v in lone[0].items() if k != "ce-type"}
    assert monitor.client.post("/events", content=lone[1], headers=headers).status_code == 400
    # Then /metrics counts them by type and code, the rows written, and what waits in memory
    deadline = time.monotonic() + 10
    while monitor.metric("flywheel_monitor_rows_written_total", model_version=VERSION) < rows_before + 4:
        assert time.monotonic() < deadline, monitor.client.get("/metrics").text
        time.sleep(0.1)
    assert monitor.metric("flywheel_monitor_events_total", type="request", code="202") == before[("request", "202")] + 3
    assert monitor.metric("flywheel_monitor_events_total", type="response", code="202") == \
        before[("response", "202")] + 2
    assert monitor.metric("flywheel_monitor_events_total", type="other", code="400") == before[("other", "400")] + 1
    assert monitor.metric("flywheel_monitor_pending_events") >= 1  # the lone request waits for its response
    assert monitor.metric("flywheel_monitor_buffer_events") >= 1
    assert monitor.metric("flywheel_monitor_flush_seconds_count") >= 1
    text = monitor.client.get("/metrics").text
    assert "flywheel_monitor_unpaired_total" in text or "# TYPE flywheel_monitor_unpaired counter" in text


def test_drift_gauges_posted_by_the_check_are_on_metrics(monitor):
    # Given a check's flat metrics (DriftReport.metrics() names) for a version
    metrics = {"rows": 5000.0, "prediction_psi": 0.31, "breaches": 2.0, "psi_income": 0.42, "drifted_income": 1.0,
               "missing_rate_age": 0.0, "p_adjusted_region": 0.004, "live_roc_auc": None}
    answer = monitor.client.post("/drift", json={"model_version": "drift-v1", "metrics": metrics})
    assert answer.status_code == 200 and answer.json()["gauges"] == 7
    # Then Prometheus sees model-level and per-feature gauges of that version
    assert monitor.metric("flywheel_monitor_drift", model_version="drift-v1", metric="prediction_psi") == 0.31
    assert monitor.metric("flywheel_monitor_feature_drift", model_version="drift-v1", feature="income",
                          stat="psi") == 0.42
    assert monitor.metric("flywheel_monitor_feature_drift", model_version="drift-v1", feature="region",
                          stat="p_adjusted") == 0.004
    # And the next check replaces them: a feature it no longer reports is gone
    monitor.client.post("/drift", json={"model_version": "drift-v1", "metrics": {"rows": 10.0, "psi_age": 0.01}})
    text = monitor.client.get("/metrics").text
    assert 'feature="income"' not in text and 'feature="age",model_version="drift-v1",stat="psi"} 0.01' in text
    # And malformed posts are refused
    assert monitor.client.post("/drift", content=b"{").status_code == 400
    assert monitor.client.post("/drift", json={"metrics": [1]}).status_code == 400
    assert monitor.client.post("/drift", json={"metrics": {"psi_age": "high"}}).status_code == 422


def test_the_sink_settings_come_from_a_rendered_config_file(tmp_path):
    from monitoring.service import alert_hook, sink_spec

    # Given no file, Then the sink has its defaults and no trigger
    assert sink_spec(None) == SinkSpec() and alert_hook(None) is None
    # And a rendered file's sink section (root from sink_root), a monitoring section, or a bare sink
    # spec is read, JSON too
    (tmp_path / "rendered.json").write_text(json.dumps({"env": "staging", "sink_root": "s3://b/w",
                                                        "sink": {"buffer_events": 50}}))
    (tmp_path / "monitor.yaml").write_text("monitoring:\n  sink: {root: s3://bucket/windows, buffer_events: 50}\n")
    (tmp_path / "sink.yaml").write_text("flush_seconds: 1.5\n")
    rendered = sink_spec(str(tmp_path / "rendered.json"))
    assert rendered.buffer_events == 50 and rendered.root == "s3://b/w"
    assert sink_spec(str(tmp_path / "monitor.yaml")).root == "s3://bucket/windows"
    assert sink_spec(str(tmp_path / "sink.yaml")).flush_seconds == 1.5
    # And a file of sink settings alone describes no retraining trigger
    assert alert_hook(str(tmp_path / "sink.yaml")) is None
    # And an environment's name is not a file: the service merges no config itself (one line)
    with pytest.raises(SystemExit, match="--config local: no such file"):
        sink_spec("local")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(SystemExit, match="expected a mapping"):
        sink_spec(str(tmp_path / "list.yaml"))

