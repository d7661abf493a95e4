"""Property-based fuzzing of a real monitor service process (`python -m monitoring.service`) over
its endpoints: CloudEvents with random headers and bodies on /events, random JSON on /ground_truth,
/drift and /alerts, unknown paths and methods. Whatever comes in, the answer is never a 5xx (the
buffer is far larger than the examples, so a 503 would not be backpressure: it fails too), and
afterwards the service still pairs and writes a good call (no event wedged the flush)."""
import json
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitoring.windows import read_window
from serving.payload import REQUEST_TYPE, RESPONSE_TYPE
from tests.monitoring.payloads import Monitor, Traffic

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Header values as HTTP carries them: visible ASCII and inner spaces.
header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
names = st.one_of(st.sampled_from(["age", "income", "region", "request_id", "model_version", "", "a b", "é"]),
                  st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(names, inner, max_size=4), max_leaves=12)
times = st.one_of(st.just("2026-03-01T10:00:00Z"), st.datetimes().map(lambda d: d.isoformat()),
                  st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00", "0999-01-01",
                                   "2026-13-01", "yesterday", ""]), header_text)


def tensors(names_, data):
    return st.lists(st.fixed_dictionaries({"name": names_, "shape": st.lists(st.integers(-1, 3), max_size=3),
                                           "datatype": st.sampled_from(["FP64", "BYTES", "INT64"]),
                                           "data": data}), max_size=4)


requests = st.one_of(
    st.fixed_dictionaries({"instances": st.lists(st.dictionaries(names, json_values, max_size=5), max_size=4)}),
    st.fixed_dictionaries({"instances": json_values}),
    st.fixed_dictionaries({"inputs": tensors(names, st.lists(st.one_of(scalars, st.lists(scalars, max_size=2)),
                                                             max_size=4))}),
    json_values)
responses = st.one_of(
    st.fixed_dictionaries({"predictions": st.lists(scalars, max_size=4)},
                          optional={"probabilities": st.lists(scalars, max_size=4),
                                    "model_name": json_values, "model_version": st.one_of(json_values, st.text())}),
    st.fixed_dictionaries({"outputs": tensors(st.one_of(st.sampled_from(["label", "probability"]), json_values),
                                              st.one_of(json_values, st.lists(scalars, max_size=4)))},
                          optional={"model_version": st.one_of(scalars, st.text(max_size=300))}),
    json_values)


@st.composite
def cloud_events(draw):
    """(headers, body) of an event: mostly the KServe agent's shape with random parts, sometimes
    attributes missing or random, sometimes a body that is not JSON."""
    kind = draw(st.sampled_from([REQUEST_TYPE, RESPONSE_TYPE]))
    headers = {"ce-specversion": "1.0", "ce-type": kind, "ce-id": draw(st.sampled_from(["a", "b", "c"])),
               "ce-source": "http://transformer/v1/models/m:predict", "content-type": "application/json",
               "ce-time": draw(times), "ce-inferenceservicename": draw(header_text)}
    if draw(st.integers(0, 3)) == 0:  # a quarter: some attributes left out (None) or random
        for name in draw(st.lists(st.sampled_from(sorted(headers)), max_size=3, unique=True)):
            headers[name] = draw(st.one_of(st.none(), header_text))
    headers = {k: v for k, v in headers.items() if v is not None}
    data = json.dumps(draw(requests if kind == REQUEST_TYPE else responses)).encode()
    mangle = draw(st.integers(0, 7))  # an eighth each: random bytes, or JSON cut short
    data = draw(st.binary(max_size=40)) if mangle == 0 else data[: draw(st.integers(0, 30))] if mangle == 1 else data
    return headers, data


@pytest.fixture(scope="module")
def monitor(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    server = Monitor(tmp / "windows", tmp / "monitor.log", "--flush-seconds", "0.2", "--pending-seconds", "5")
    yield server
    server.stop()


def no_5xx(monitor, answer) -> None:
    assert answer.status_code < 500, f"{answer.request.method} {answer.request.url.path} -> {answer.status_code} " \
                                     f"{answer.text[:300]}\n{monitor.tail(2000)}"
    if answer.status_code >= 400 and answer.headers.get("content-type", "").startswith("application/json"):
        assert "error" in answer.json() or "detail" in answer.json(), answer.text


@FUZZ
@given(event=cloud_events())
def test_events_never_get_a_5xx(monitor, event):
    headers, body = event
    # the ids pair across examples; a fresh suffix per run keeps runs apart
    headers = {**headers, "ce-id": f"{headers['ce-id']}-{monitor.port}"} if "ce-id" in headers else headers
    no_5xx(monitor, monitor.client.post("/events", content=body, headers=headers))


instances = st.one_of(st.integers(-5, 5), st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1]),
                      json_values)
ground_truth = st.one_of(
    st.lists(st.fixed_dictionaries({"request_id": st.text(min_size=1, max_size=10),
                                    "truth": st.one_of(st.text(max_size=5), st.integers(), json_values)},
                                   optional={"instance": instances}),
             max_size=2),
    st.fixed_dictionaries({"rows": json_values}), json_values)
metric_names = st.one_of(st.sampled_from(["psi_age", "rows", "psi_", "p_value_x"]), st.text(max_size=10))
drift = st.one_of(
    st.fixed_dictionaries({"metrics": st.dictionaries(metric_names, json_values, max_size=5)},
                          optional={"model_version": json_values}),
    json_values)
alert = st.fixed_dictionaries({"status": st.sampled_from(["firing", "resolved", "x"]),
                               "labels": st.dictionaries(st.sampled_from(["alertname", "flywheel_action", "x"]),
                                                         st.one_of(st.just("retrain"), json_values), max_size=3),
                               "startsAt": st.one_of(st.just("2026-01-01T00:00:00Z"), json_values)},
                              optional={"annotations": json_values, "fingerprint": json_values})
alerts = st.one_of(
    st.fixed_dictionaries({"version": st.sampled_from(["4", "3"]), "status": st.sampled_from(["firing", "resolved"]),
                           "receiver": st.text(max_size=5), "groupKey": st.text(max_size=5),
                           "alerts": st.one_of(st.lists(alert, max_size=3), json_values)},
                          optional={"groupLabels": json_values, "commonLabels": json_values}),
    json_values)


@pytest.mark.parametrize("path", ["/ground_truth", "/drift", "/alerts"])
@FUZZ
@given(data=st.data())
def test_json_endpoints_never_get_a_5xx(monitor, path, data):
    body = json.dumps(data.draw({"/ground_truth": ground_truth, "/drift": drift, "/alerts": alerts}[path])).encode()
    if data.draw(st.integers(0, 7)) == 0:  # an eighth: not JSON
        body = data.draw(st.binary(max_size=30))
    no_5xx(monitor, monitor.client.post(path, content=body, headers={"content-type": "application/json"}))


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.one_of(st.sampled_from(["/events", "/ground_truth", "/drift", "/alerts", "/healthz", "/metrics",
                                       "/events/", "/", "/v1/models/x:predict"]),
                      st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)
                      .map(lambda p: "/" + p.lstrip("/"))),
       body=st.binary(max_size=20))
def test_any_path_and_method_never_gets_a_5xx(monitor, method, path, body):
    answer = monitor.client.request(method, path, content=body if method not in ("GET", "HEAD") else None)
    no_5xx(monitor, answer)


def test_after_the_fuzz_the_service_still_pairs_and_writes(monitor):
    # (runs last in this module: a fuzzed event that could not be written would fail every flush)
    from stages.dataset import ReferenceTask

    traffic = Traffic(ReferenceTask(rows=20, seed=3).generate())
    request_id = uuid.uuid4().hex
    for event in traffic.call(request_id, traffic.records(2)):
        assert monitor.send(event).status_code == 202
    deadline = time.monotonic() + 20
    while request_id not in set(read_window(str(Path(monitor.root)))["request_id"]):
        assert time.monotonic() < deadline, monitor.tail()
        time.sleep(0.2)
    assert monitor.metric("flywheel_monitor_flush_errors_total") == 0, monitor.tail()
    assert monitor.metric("flywheel_monitor_rejected_events_total", reason="full") == 0
    assert monitor.terminate() == 0, monitor.tail()
