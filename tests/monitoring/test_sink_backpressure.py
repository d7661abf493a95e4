"""The payload sink's backpressure: memory, not flushing, refuses. A full buffer (events or bytes)
answers 503 with a Retry-After, counted by reason on /metrics, and nothing accepted is lost; a
flush in flight never makes the buffer look full; a pair is refused whole; halves that will never
pair are evicted to make room; an event over the size limit is a 413."""
import threading
import time
import uuid

import pytest

from monitoring.sink import PayloadSink
from monitoring.windows import read_window
from specs.monitoring import SinkSpec
from tests.monitoring.payloads import VERSION, Monitor
from tests.monitoring.sink_fixtures import frame, slow_writer, traffic  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


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

