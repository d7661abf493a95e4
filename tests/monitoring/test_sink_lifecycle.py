"""What becomes of the payload sink's events over time and across a restart: unpaired halves
expire after their TTL (counted), duplicates are written once, mismatched pairs are counted; a
SIGTERM during an in-flight flush loses nothing, and no acknowledged event is lost across SIGTERM
(a lone half is spilled to `_pending/` and paired by the next start)."""
import json
import threading
import time

import httpx
import pytest

from monitoring import windows
from monitoring.sink import PayloadSink
from monitoring.windows import read_window
from specs.monitoring import SinkSpec
from tests.monitoring.payloads import Monitor
from tests.monitoring.sink_fixtures import frame, slow_writer, traffic  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


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

