"""The monitor service's payload sink: the transformer's CloudEvents (headers from
`serving/payload.py`, bodies as the transformer answers) paired and written as Parquet windows by a
real server process on loopback; malformed events refused with their reason while it stays up;
503 backpressure when the buffer is full; no acknowledged event lost across a SIGTERM; ground
truth joined by request id in `read_window` (also on S3); Prometheus counters and drift gauges; the
Alertmanager hook calling the retraining trigger for firing retrain alerts only."""
import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from monitoring import windows
from monitoring.sink import PayloadSink
from monitoring.windows import read_window, write_ground_truth
from serving.payload import RESPONSE_TYPE
from specs.monitoring import SinkSpec
from stages.dataset import ReferenceTask
from tests.monitoring.payloads import COLUMNS, NAME, VERSION, Monitor, Traffic

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


# ---- the transformer's events -------------------------------------------------------------------

@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return ReferenceTask(rows=600, seed=11).generate()


@pytest.fixture(scope="module")
def traffic(frame):
    return Traffic(frame)


# ---- a real monitor process -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def monitor(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor")
    server = Monitor(tmp / "windows", tmp / "monitor.log", "--flush-seconds", "0.2", "--flush-events", "1000")
    yield server
    server.stop()


def wait_for_rows(root, count: int, timeout: float = 15, **options) -> pd.DataFrame:
    deadline = time.monotonic() + timeout
    while True:
        window = read_window(str(root), **options)
        if len(window) >= count or time.monotonic() > deadline:
            return window
        time.sleep(0.1)


def window_of(window: pd.DataFrame, request_id: str) -> pd.DataFrame:
    return window[window["request_id"] == request_id].sort_values("instance").reset_index(drop=True)


# ---- pairing and writing --------------------------------------------------------------------------

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


# ---- backpressure and shutdown -------------------------------------------------------------------

def test_a_full_buffer_answers_503_with_retry_after_and_nothing_accepted_is_lost(tmp_path, traffic):
    # Given a monitor whose buffer holds 4 events and whose writes fail (the partition folder is
    # blocked by a file), so every flush keeps its rows
    root = tmp_path / "windows"
    root.mkdir()
    blocker = root / f"model_version={VERSION}"
    blocker.write_text("not a folder")
    monitor = Monitor(root, tmp_path / "monitor.log", "--buffer-events", "4", "--flush-events", "1",
                      "--flush-seconds", "0.1")
    try:
        calls = [traffic.call(uuid.uuid4().hex, traffic.records(2, start=30 + 2 * i)) for i in range(3)]
        # When two calls fill it
        for request, response in calls[:2]:
            assert monitor.send(request).status_code == 202 and monitor.send(response).status_code == 202
        deadline = time.monotonic() + 10
        while monitor.metric("flywheel_monitor_flush_errors_total") < 1:
            assert time.monotonic() < deadline, monitor.tail()
            time.sleep(0.05)
        # Then the next call's request is refused with 503 and a Retry-After, the service healthy
        refused = monitor.send(calls[2][0])
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text
        assert "full" in refused.json()["error"]
        assert monitor.client.get("/healthz").json()["depth"] == 4
        assert monitor.metric("flywheel_monitor_events_total", type="request", code="503") == 1
        # And the refusal is counted as rejected, by reason, for the FlywheelMonitorRejectingEvents alert
        assert monitor.metric("flywheel_monitor_rejected_events_total", type="request", reason="full") == 1
        # And once the store writes again, the buffer drains and a retry is accepted
        blocker.unlink()
        deadline = time.monotonic() + 30
        while monitor.send(calls[2][0]).status_code == 503:
            assert time.monotonic() < deadline, monitor.tail()
            time.sleep(0.2)
        assert monitor.send(calls[2][1]).status_code == 202
        # And after SIGTERM every acknowledged pair is on disk
        assert monitor.terminate() == 0, monitor.tail()
    finally:
        monitor.stop()
    window = read_window(str(root))
    assert sorted(set(window["request_id"])) == sorted(request[0]["ce-id"] for request, _ in calls)
    assert len(window) == 6


def test_a_blocked_flush_fills_the_buffer_and_accept_says_busy_until_it_finishes(tmp_path, traffic):
    # Given a sink with a 4-event buffer whose writes block until released
    release, writing = threading.Event(), threading.Event()
    written = []

    def slow_write(uri, data):
        writing.set()
        assert release.wait(10)
        written.append(uri)
        from storage import write_atomic
        write_atomic(uri, data)

    sink = PayloadSink(str(tmp_path), SinkSpec(root=str(tmp_path), buffer_events=4, flush_events=1),
                       write=slow_write)
    try:
        calls = [traffic.call(f"call-{i}", traffic.records(1, start=i)) for i in range(4)]
        for request, response in calls[:2]:
            assert sink.accept(*request).status == 202 and sink.accept(*response).status == 202
        assert writing.wait(5)
        # When a new call arrives while the flush is stuck
        busy = sink.accept(*calls[2][0])
        # Then it is refused as busy (the HTTP layer's 503), with a time to wait
        assert busy.status == 503 and busy.retry_after >= 1 and "full" in busy.message
        # And once the flush finishes, events are accepted again
        release.set()
        deadline = time.monotonic() + 10
        while sink.accept(*calls[2][0]).status == 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert sink.accept(*calls[2][1]).status == 202
    finally:
        release.set()
        assert sink.close()
    assert sorted(read_window(str(tmp_path))["request_id"]) == ["call-0", "call-1", "call-2"]


def slow_writer(delay: float = 0.0, gate: threading.Event | None = None):
    """A `write` for the sink that waits `delay` seconds (or until `gate` is set) before writing:
    a slow or stuck object store. It records when writes are in progress."""
    from storage import write_atomic

    state = {"writing": threading.Event(), "in_progress": 0, "files": 0}

    def write(uri, data):
        state["in_progress"] += 1
        state["writing"].set()
        try:
            if gate is not None:
                assert gate.wait(30)
            time.sleep(delay)
            write_atomic(uri, data)
            state["files"] += 1
        finally:
            state["in_progress"] -= 1

    return write, state


def test_a_flush_in_progress_never_makes_the_buffer_look_full(tmp_path, traffic):
    # Given a 100-event sink that flushes by size only (flush_events and flush_seconds out of
    # reach) and a store that takes 0.2 s per write
    write, state = slow_writer(delay=0.2)
    sink = PayloadSink(str(tmp_path), SinkSpec(root=str(tmp_path), buffer_events=100, flush_events=10_000,
                                               flush_seconds=600), write=write)
    try:
        # When 150 calls come at 50 calls/s, about a third of what the store keeps up with
        statuses, during_writes = [], 0
        for i in range(150):
            started = time.monotonic()
            for event in traffic.call(f"steady-{i}", traffic.records(1, start=i)):
                statuses.append(sink.accept(*event).status)
                during_writes += state["in_progress"] > 0
            time.sleep(max(0.0, 0.02 - (time.monotonic() - started)))
        # Then every event is accepted, also the many that came while a write was in progress
        assert statuses == [202] * 300, [s for s in statuses if s != 202][:5]
        assert during_writes > 50 and state["files"] >= 2
        assert sink.totals["rejected"] == 0
    finally:
        assert sink.close()
    assert len(read_window(str(tmp_path))) == 150


def test_rejections_are_counted_on_metrics_when_memory_is_exhausted(tmp_path, traffic):
    from starlette.testclient import TestClient

    from monitoring.service import create_app

    # Given a 4-event sink whose store hangs, so the pairs a flush holds stay in memory
    gate = threading.Event()
    write, state = slow_writer(gate=gate)
    sink = PayloadSink(str(tmp_path), SinkSpec(root=str(tmp_path), buffer_events=4, flush_events=1), write=write)
    with TestClient(create_app(sink)) as client:  # closing the app closes the sink
        try:
            calls = [traffic.call(f"mem-{i}", traffic.records(1, start=i)) for i in range(3)]
            for event in (*calls[0], *calls[1]):
                assert client.post("/events", content=event[1], headers=event[0]).status_code == 202
            assert state["writing"].wait(5)
            # When a third call comes, Then it is refused whole, with a Retry-After
            request, response = calls[2]
            refused = client.post("/events", content=request[1], headers=request[0])
            assert refused.status_code == 503 and "full" in refused.json()["error"]
            assert int(refused.headers["retry-after"]) >= 1
            assert client.post("/events", content=response[1], headers=response[0]).status_code == 503
            # And /metrics counts both as rejected, with the reason, beside the memory held
            text = client.get("/metrics").text
            assert 'flywheel_monitor_rejected_events_total{reason="full",type="request"} 1.0' in text
            assert 'flywheel_monitor_rejected_events_total{reason="half_refused",type="response"} 1.0' in text
            held = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                    if line.startswith(("flywheel_monitor_flushing_events ", "flywheel_monitor_buffer_bytes "))}
            assert held["flywheel_monitor_flushing_events"] >= 2 and held["flywheel_monitor_buffer_bytes"] > 0
        finally:
            gate.set()
    assert sink.stats()["depth"] == 0
    assert sorted(set(read_window(str(tmp_path))["request_id"])) == ["mem-0", "mem-1"]


def test_a_byte_bound_refuses_too(tmp_path, traffic):
    # Given a sink that may hold 600 bytes of event bodies, and a store that hangs
    gate = threading.Event()
    write, _ = slow_writer(gate=gate)
    sink = PayloadSink(str(tmp_path), SinkSpec(root=str(tmp_path), buffer_bytes=600), write=write)
    try:
        # When calls of about 340 bytes each come, Then a new call is refused once 600 bytes are held
        statuses = [sink.accept(*event).status for i in range(3)
                    for event in traffic.call(f"b-{i}", traffic.records(1, start=i))]
        assert statuses[:2] == [202, 202] and statuses[-2:] == [503, 503], statuses
        assert sink.stats()["bytes"] >= 600
    finally:
        gate.set()
        assert sink.close()


def test_sigterm_during_an_in_flight_flush_loses_nothing(tmp_path, traffic):
    # Given a sink whose store hangs while it writes the first pairs
    gate = threading.Event()
    write, state = slow_writer(gate=gate)
    sink = PayloadSink(str(tmp_path), SinkSpec(root=str(tmp_path), flush_events=2), write=write)
    calls = [traffic.call(f"term-{i}", traffic.records(1 + i % 2, start=i)) for i in range(6)]
    for event in (*calls[0], *calls[1]):
        assert sink.accept(*event).status == 202
    assert state["writing"].wait(5)
    # When SIGTERM comes (drain) while that flush is in flight, Then events still arriving before
    # the server stops are taken (a 503 would be an event the KServe agent drops)
    sink.drain()
    for request, response in calls[2:5]:
        assert sink.accept(*request).status == 202 and sink.accept(*response).status == 202
    assert sink.accept(*calls[5][0]).status == 202  # a lone request: kept for the next start
    # And close() waits for the flush in flight, then writes the rest
    closer = threading.Thread(target=lambda: state.update(clean=sink.close()))
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive(), "close() returned with a flush still in flight"
    assert sink.accept(*calls[0][0]).status == 503  # closing: nothing more is taken
    gate.set()
    closer.join(30)
    assert state["clean"] is True
    window = read_window(str(tmp_path))
    assert sorted(set(window["request_id"])) == [f"term-{i}" for i in range(5)]
    assert len(window) == sum(1 + i % 2 for i in range(5))
    # And the lone request is spilled, and the next sink pairs it
    again = PayloadSink(str(tmp_path), SinkSpec(root=str(tmp_path)), start=False)
    assert again.stats()["pending"] == 1 and again.accept(*calls[5][1]).status == 202
    assert again.close() and "term-5" in set(read_window(str(tmp_path))["request_id"])


def test_no_acknowledged_event_is_lost_across_sigterm(tmp_path, traffic):
    # Given a monitor that flushes every 200 rows or second, and four senders streaming 150 calls each
    root = tmp_path / "windows"
    monitor = Monitor(root, tmp_path / "monitor.log", "--flush-events", "200", "--flush-seconds", "1")
    calls = {f"sig-{s}-{i}": traffic.call(f"sig-{s}-{i}", traffic.records(1 + i % 3, start=i % 500))
             for s in range(4) for i in range(150)}
    statuses: dict[str, list[int | None]] = {}
    lock = threading.Lock()

    def sender(ids: list[str]) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{monitor.port}", timeout=10) as client:
            for request_id in ids:
                codes = []
                for headers, body in calls[request_id]:
                    try:
                        codes.append(client.post("/events", content=body, headers=headers).status_code)
                    except httpx.HTTPError:
                        codes.append(None)
                with lock:
                    statuses[request_id] = codes

    ids = list(calls)
    threads = [threading.Thread(target=sender, args=(ids[s::4],)) for s in range(4)]
    for thread in threads:
        thread.start()
    # When SIGTERM comes mid-stream
    deadline = time.monotonic() + 60
    while len(statuses) < 150:
        assert time.monotonic() < deadline, monitor.tail()
        time.sleep(0.01)
    code = monitor.terminate()
    for thread in threads:
        thread.join(60)
    # Then the monitor exits cleanly, having refused (503) or not received whatever it did not take
    assert code == 0, monitor.tail()
    acknowledged = {i for i, codes in statuses.items() if codes == [202, 202]}
    half = {i: codes for i, codes in statuses.items() if codes.count(202) == 1}
    assert 150 <= len(acknowledged) < len(calls), "SIGTERM came after the stream ended"
    assert all(c in (202, 503, None) for codes in statuses.values() for c in codes)
    # And every acknowledged pair is on disk, row for row
    window = read_window(str(root))
    expected_rows = sum(len(json.loads(calls[i][0][1])["instances"]) for i in acknowledged)
    assert len(window) == expected_rows
    assert set(window["request_id"]) == acknowledged
    # And an acknowledged half waits in _pending/ for its other half, which a restart still pairs
    pending = [r["id"] for f in (root / windows.PENDING).glob("*.json") for r in json.loads(f.read_text())]
    assert sorted(pending) == sorted(half)
    if half:
        again = Monitor(root, tmp_path / "monitor.log", "--flush-seconds", "0.2")
        try:
            for request_id, codes in half.items():
                missing = calls[request_id][codes.index(202) ^ 1]
                assert again.send(missing).status_code == 202
            assert again.terminate() == 0
        finally:
            again.stop()
        assert set(read_window(str(root))["request_id"]) == acknowledged | set(half)


# ---- the sink in-process -------------------------------------------------------------------------

def test_unpaired_halves_expire_after_the_ttl_and_are_counted(tmp_path, traffic):
    # Given a sink whose halves wait 30 s, and a request whose response never comes (a refused call)
    sink = PayloadSink(str(tmp_path), SinkSpec(root=str(tmp_path)), pending_seconds=30, start=False)
    request, response = traffic.call("lonely", traffic.records(1))
    assert sink.accept(*request).status == 202
    other_request, other_response = traffic.call("late", traffic.records(2))
    assert sink.accept(*other_response).status == 202
    # When less than the TTL has passed nothing expires; when more has, both halves go and are counted
    assert sink.expire(time.monotonic() + 10) == 0
    assert sink.expire(time.monotonic() + 31) == 2
    samples = {(s.labels["type"], s.labels["reason"]): s.value
               for m in sink.metrics.registry.collect() if m.name == "flywheel_monitor_unpaired"
               for s in m.samples if s.name.endswith("_total")}
    assert samples == {("request", "expired"): 1.0, ("response", "expired"): 1.0}
    # And a duplicate of a paired event is acknowledged but not written twice
    twice = traffic.call("twice", traffic.records(1))
    for event in (*twice, twice[1]):
        assert sink.accept(*event).status == 202
    assert sink.flush() == 1
    # And a pair whose row counts differ is counted, not written
    bad_request = traffic.call("mismatch", traffic.records(2))[0]
    bad_response = traffic.call("mismatch", traffic.records(3))[1]
    assert sink.accept(*bad_request).status == 202 and sink.accept(*bad_response).status == 202
    assert sink.flush() == 0
    assert sink.close()


def test_a_full_buffer_refuses_pairs_whole_and_evicts_halves_that_will_never_pair(tmp_path, traffic):
    # Given a 4-event sink that does not flush by itself, holding two requests whose responses
    # never came (refused calls) and one pair
    sink = PayloadSink(str(tmp_path), SinkSpec(root=str(tmp_path), buffer_events=4, flush_events=100), start=False,
                       evict_seconds=0.3)
    for request_id in ("refused-1", "refused-2"):
        assert sink.accept(*traffic.call(request_id, traffic.records(1))[0]).status == 202
    for event in traffic.call("kept", traffic.records(1)):
        assert sink.accept(*event).status == 202
    # When a new call comes while the halves are young, Then its request is refused, and so is its
    # response, though a flush has made room meanwhile: a pair is taken whole or not at all
    request, response = traffic.call("new", traffic.records(1))
    assert sink.accept(*request).status == 503
    assert sink.flush() == 1
    refused = sink.accept(*response)
    assert refused.status == 503 and "request was refused" in refused.message
    # And a sender that retries gets both in
    assert sink.accept(*request).status == 202 and sink.accept(*response).status == 202
    # And once the lone halves have waited evict_seconds, a full buffer evicts them (counted) for new calls
    for i in range(2):
        assert sink.accept(*traffic.call(f"fill-{i}", traffic.records(1))[0]).status in (202, 503)
    time.sleep(0.35)
    later = traffic.call("later", traffic.records(1))
    assert sink.accept(*later[0]).status == 202 and sink.accept(*later[1]).status == 202
    assert sink.totals["evicted"] >= 1
    assert sink.close()
    assert {"kept", "new", "later"} <= set(read_window(str(tmp_path))["request_id"])


def test_an_event_over_the_size_limit_is_a_413(tmp_path, traffic, monkeypatch):
    from starlette.testclient import TestClient

    import monitoring.service as service

    monkeypatch.setattr(service, "MAX_EVENT_BYTES", 1000)
    sink = PayloadSink(str(tmp_path), SinkSpec(root=str(tmp_path)), start=False)
    headers, body = traffic.call("big", traffic.records(20))[0]
    assert len(body) > 1000
    with TestClient(service.create_app(sink)) as client:
        answer = client.post("/events", content=body, headers=headers)
        assert answer.status_code == 413 and "1000 bytes" in answer.json()["error"]
        small = traffic.call("small", traffic.records(1))[0]
        assert client.post("/events", content=small[1], headers=small[0]).status_code == 202


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


def test_ground_truth_is_joined_by_request_id_in_read_window(tmp_path, traffic):
    root = str(tmp_path / "windows")
    sink = PayloadSink(root, SinkSpec(root=root), start=False)
    # Given three calls written by the sink, one of them of two rows
    for request_id, n in (("a", 1), ("b", 2), ("c", 1)):
        for event in traffic.call(request_id, traffic.records(n)):
            assert sink.accept(*event).status == 202
    assert sink.flush() == 4
    # When ground truth arrives for a, for b's second row only, then corrects a
    write_ground_truth(root, pd.DataFrame({"request_id": ["a"], "truth": ["0"]}))
    write_ground_truth(root, pd.DataFrame({"request_id": ["b"], "truth": [1], "instance": [1]}))
    write_ground_truth(root, pd.DataFrame({"request_id": ["a"], "truth": ["1"]}))
    # Then read_window joins it by request id (and instance), the latest file winning
    window = read_window(root)
    truth = dict(zip(zip(window["request_id"], window["instance"]), window["truth"]))
    assert truth == {("a", 0): "1", ("b", 0): None, ("b", 1): "1", ("c", 0): None}
    # And rows / model_version / since select the most recent rows
    assert read_window(root, rows=2)["request_id"].tolist() == ["b", "c"]
    assert read_window(root, model_version="other").empty
    assert len(read_window(root, model_version=VERSION)) == 4
    assert read_window(root, since=datetime.now(UTC) + timedelta(hours=2)).empty
    assert len(read_window(root, since=datetime.now(UTC) - timedelta(hours=2))) == 4
    # And the service's POST /ground_truth writes the same files
    from starlette.testclient import TestClient

    from monitoring.service import create_app

    with TestClient(create_app(sink)) as client:
        assert client.post("/ground_truth", json=[{"request_id": "c", "truth": 0}]).status_code == 202
        assert client.post("/ground_truth", json=[{"request_id": "", "truth": 0}]).status_code == 422
        assert client.post("/ground_truth", content=b"[").status_code == 400
    assert read_window(root).set_index("request_id").loc["c", "truth"] == "0"


def test_ground_truth_joins_by_entity_id_where_the_request_id_gives_none(tmp_path, traffic):
    # Clients send the dataset's id column with each record (the transformer echoes it and the
    # sink logs it): labels known per customer, not per request, still reach the window
    root = str(tmp_path / "windows")
    sink = PayloadSink(root, SinkSpec(root=root), start=False)
    for request_id, customer in (("a", "c-1"), ("b", 7), ("c", "c-3")):
        rows = [{**traffic.records(1)[0], "customer_id": customer}]
        for event in traffic.call(request_id, rows):
            assert sink.accept(*event).status == 202
    assert sink.flush() == 3
    from starlette.testclient import TestClient

    from monitoring.service import create_app

    with TestClient(create_app(sink)) as client:
        assert client.post("/ground_truth", json=[{"entity_column": "customer_id", "entity_id": "c-1", "truth": 1},
                                                   {"entity_column": "customer_id", "entity_id": 7, "truth": 0},
                                                   {"request_id": "c", "truth": 0}]).status_code == 202
        # A request id wins over an entity's label; a bad entity row is a 422 naming it
        assert client.post("/ground_truth", json=[{"entity_column": "customer_id", "entity_id": "c-3",
                                                    "truth": 1}]).status_code == 202
        bad = client.post("/ground_truth", json=[{"entity_column": "customer_id", "truth": 1}])
        assert bad.status_code == 422 and "rows[0].entity_id" in bad.text
    truth = dict(zip(read_window(root)["request_id"], read_window(root)["truth"]))
    assert truth == {"a": "1", "b": "0", "c": "0"}


def test_windows_and_ground_truth_go_through_storage_to_s3(tmp_path, traffic, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t",
               "AWS_DEFAULT_REGION": "us-east-1"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
            Bucket="monitor")
        root = "s3://monitor/windows"
        # Given a sink writing to S3, two pairs and a lone request
        sink = PayloadSink(root, SinkSpec(root=root), start=False)
        for request_id in ("s1", "s2"):
            for event in traffic.call(request_id, traffic.records(1)):
                assert sink.accept(*event).status == 202
        assert sink.accept(*traffic.call("s3-lone", traffic.records(1))[0]).status == 202
        assert sink.close()
        write_ground_truth(root, pd.DataFrame({"request_id": ["s2"], "truth": ["1"]}))
        # Then read_window reads them back from the bucket, truth joined
        window = read_window(root)
        assert sorted(window["request_id"]) == ["s1", "s2"]
        assert window.set_index("request_id").loc["s2", "truth"] == "1"
        # And the lone request is kept in _pending/ and restored by the next sink
        again = PayloadSink(root, SinkSpec(root=root), start=False)
        assert again.stats()["pending"] == 1
        assert again.accept(*traffic.call("s3-lone", traffic.records(1))[1]).status == 202
        assert again.close() and len(read_window(root)) == 3
    finally:
        server.stop()


# ---- alerts --------------------------------------------------------------------------------------

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
