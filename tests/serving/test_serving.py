"""The servers clients call as real KServe processes on loopback, both topologies (`chain`: the
transformer in front of the predictor; `single`: the one-process server) held to one contract: v1,
v2 REST and v2 gRPC round trips (KServe's own SDK clients and raw HTTP), every bad input answered
with its status and field while the servers stay up, request ids end to end, payload events and
Prometheus metrics. The chain's own: the tensor contract between the two, a predictor's 4xx kept a
4xx, the REST hops (readiness tied to the predictor: test_serving_readiness.py)."""
import asyncio
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest

from model.loader import load_model
from serving.contract import model_version
from serving.transform import FeatureCodec
from tests.serving.servers import (
    COLUMNS,
    NAME,
    TOPOLOGIES,
    Receiver,
    Server,
    expected,
    kserve_inputs,
    records,
    start_entry,
    stop_all,
    v2_body,
)
from tests.support import mlflow_store

PREDICTOR_ROWS = 50  # the predictor's max_batch_rows, below the transformer's 1000: its 413 must come through
TRANSFORMER_BODY_LIMIT = 1_000_000


@pytest.fixture(scope="module", params=TOPOLOGIES)
def stack(request, trained, tmp_path_factory):
    """(predictor, entry, receiver): the chain's predictor and transformer (gRPC hop), or the
    one-process server as both; payload events to a receiver, the model process logging latencies
    (with the request id)."""
    model_dir, _ = trained
    logs = tmp_path_factory.mktemp(f"logs-{request.param}")
    receiver = Receiver()
    latency = ("--enable_latency_logging", "true")
    predictor, entry, servers = start_entry(
        request.param, model_dir, logs,
        entry_args=("--max_body_bytes", str(TRANSFORMER_BODY_LIMIT), "--payload_log_url", receiver.url),
        predictor_args=("--max_batch_rows", str(PREDICTOR_ROWS), *latency), single_args=latency)
    try:
        yield predictor, entry, receiver
    finally:
        stop_all(servers)
        receiver.server.shutdown()


CHAIN_ONLY = pytest.mark.parametrize("stack", ["chain"], indirect=True)


def still_up(*servers: Server) -> None:
    for server in servers:
        assert httpx.get(server.url + "/v2/health/ready", timeout=5).status_code == 200, server.tail()


# ---- round trips ------------------------------------------------------------------------------

def test_v1_and_v2_rest_round_trips_with_raw_http(stack, trained):
    _, transformer, _ = stack
    rows = records(trained[1], 6)
    rows[0]["income"], rows[1]["housing"] = None, "castle"  # a null the model imputes, an unseen category
    want = expected(trained, rows)
    # v1: original labels, positive-class probabilities, the model version
    answer = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json={"instances": rows})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["probabilities"] == pytest.approx(want.tolist(), abs=1e-6)
    assert body["predictions"] == [int(p >= 0.5) for p in body["probabilities"]]
    assert body["model_version"] == model_version(str(trained[0]), load_model(str(trained[0])).metadata)
    # v2: per-column tensors in, label and probability tensors out
    answer = httpx.post(f"{transformer.url}/v2/models/{NAME}/infer", json=v2_body(rows))
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert outputs["probability"]["data"] == pytest.approx(want.tolist(), abs=1e-6)
    assert outputs["label"]["datatype"] == "INT64" and len(outputs["label"]["data"]) == 6
    assert answer.json()["model_version"] == body["model_version"]


def test_round_trips_with_the_kserve_sdk_clients(stack, trained):
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferRequest, RESTConfig

    _, transformer, _ = stack
    rows = [r for r in records(trained[1], 40) if None not in r.values()][:5]  # binary tensors carry no nulls
    want = expected(trained, rows)

    async def calls():
        async with InferenceRESTClient(RESTConfig(protocol="v1")) as v1:
            v1_answer = await v1.infer(transformer.url, {"instances": rows}, model_name=NAME)
        async with InferenceRESTClient(RESTConfig(protocol="v2")) as v2:
            v2_answer = await v2.infer(transformer.url, InferRequest(NAME, kserve_inputs(rows, binary=False)),
                                       model_name=NAME)
        grpc = InferenceGRPCClient(transformer.grpc, retries=0)
        try:
            grpc_answer = await grpc.infer(InferRequest(NAME, kserve_inputs(rows, binary=True), request_id="grpc-1"))
        finally:
            await grpc.close()
        return v1_answer, v2_answer, grpc_answer

    v1_answer, v2_answer, grpc_answer = asyncio.run(calls())
    assert v1_answer["probabilities"] == pytest.approx(want.tolist(), abs=1e-6)
    for answer in (v2_answer, grpc_answer):
        assert answer.get_output_by_name("probability").as_numpy() == pytest.approx(want, abs=1e-6)
        assert answer.get_output_by_name("label").as_numpy().tolist() == v1_answer["predictions"]
    assert grpc_answer.id == "grpc-1" and grpc_answer.model_version == v1_answer["model_version"]


@CHAIN_ONLY
def test_the_transformer_emits_exactly_what_the_predictor_declares(stack, trained):
    predictor, transformer, _ = stack
    model_dir, frame = trained
    # Given the predictor's v2 model metadata
    declared = httpx.get(f"{predictor.url}/v2/models/{NAME}").json()
    # When the transformer's preprocess encodes a batch
    features = FeatureCodec.from_model_dir(str(model_dir)).from_v1({"instances": records(frame, 3)})
    # Then its tensors are the declared inputs: names, datatypes and widths
    emitted = [{"name": "numeric", "datatype": {"float32": "FP32"}[features.numeric.dtype.name],
                "shape": [-1, features.numeric.shape[1]]},
               {"name": "categorical", "datatype": {"int64": "INT64"}[features.categorical.dtype.name],
                "shape": [-1, features.categorical.shape[1]]}]
    assert declared["inputs"] == emitted
    assert declared["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": [-1]}]
    assert declared["versions"] == [model_version(str(model_dir), load_model(str(model_dir)).metadata)]
    # And the predictor fed those exact tensors answers what the chain answers
    direct = httpx.post(f"{predictor.url}/v2/models/{NAME}/infer", json={"inputs": [
        {"name": "numeric", "datatype": "FP32", "shape": list(features.numeric.shape),
         "data": features.numeric.reshape(-1).tolist()},
        {"name": "categorical", "datatype": "INT64", "shape": list(features.categorical.shape),
         "data": features.categorical.reshape(-1).tolist()}]}).json()
    chained = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json={"instances": records(frame, 3)}).json()
    assert direct["outputs"][0]["data"] == pytest.approx(chained["probabilities"], abs=1e-6)
    # And the transformer's own metadata names the raw columns it takes
    mine = httpx.get(f"{transformer.url}/v2/models/{NAME}").json()
    assert [t["name"] for t in mine["inputs"]] == COLUMNS


def test_the_entry_declares_the_raw_columns_labels_and_probabilities(stack, trained):
    _, entry, _ = stack
    declared = httpx.get(f"{entry.url}/v2/models/{NAME}").json()
    assert [t["name"] for t in declared["inputs"]] == COLUMNS
    assert [(t["name"], t["datatype"]) for t in declared["outputs"]] == [("label", "INT64"), ("probability", "FP32")]
    assert declared["versions"] == [model_version(str(trained[0]), load_model(str(trained[0])).metadata)]


# ---- bad inputs -------------------------------------------------------------------------------

def _row(rows, **changes):
    return {"instances": [{**rows[0], **changes}]}


BAD_V1 = [
    ("not JSON", lambda rows: b"{'instances': ", 400, None),
    ("NaN literal (not JSON)", lambda rows: json.dumps(_row(rows, age=float("nan"))).encode(), 400, None),
    ("no instances", lambda rows: {"rows": rows}, 400, "instances"),
    ("missing column", lambda rows: {"instances": [{k: v for k, v in rows[0].items() if k != "region"}]}, 422,
     "instances[0].region"),
    ("unknown column", lambda rows: _row(rows, planet="mars"), 422, "instances[0].planet"),
    ("string in a numeric column", lambda rows: _row(rows, age="forty"), 422, "instances[0].age"),
    ("'NaN' string", lambda rows: _row(rows, utilization="NaN"), 422, "instances[0].utilization"),
    ("'inf' string", lambda rows: _row(rows, credit_limit="inf"), 422, "instances[0].credit_limit"),
    ("null where training had none", lambda rows: _row(rows, late_payments=None), 422,
     "instances[0].late_payments"),
    ("float category", lambda rows: _row(rows, housing=0.5), 422, "instances[0].housing"),
    ("empty batch", lambda rows: {"instances": []}, 422, "instances"),
    ("over max_batch_rows", lambda rows: {"instances": rows[:1] * 1001}, 413, "instances"),
    ("body over max_body_bytes", lambda rows: {"instances": rows[:1], "pad": "x" * TRANSFORMER_BODY_LIMIT}, 413,
     None),
]


@pytest.mark.parametrize("what, body, status, field", BAD_V1, ids=[c[0] for c in BAD_V1])
def test_bad_v1_requests_get_their_status_and_field(stack, trained, what, body, status, field):
    predictor, transformer, _ = stack
    content = body(records(trained[1], 2))
    content = content if isinstance(content, bytes) else json.dumps(content).encode()
    answer = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", content=content,
                        headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["status"] == status and answer.json()["error"]["field"] == field, answer.text
    assert answer.json()["error"]["message"]
    still_up(transformer, predictor)


def _tensor(body, k, **changes):
    body["inputs"][k].update(changes)
    return body


BAD_V2 = [
    ("malformed JSON", lambda b: b'{"inputs": [', 400, None),
    ("inputs not a list", lambda b: {"inputs": 3}, 400, "inputs"),
    ("data not filling its shape", lambda b: _tensor(b, 3, data=[0.5]), 400, "inputs[3].data"),
    ("NaN literal", lambda b: _tensor(b, 1, data=[1.0, float("nan")]), 422, "inputs[1].data[1]"),
    ("'NaN' string", lambda b: _tensor(b, 2, data=["NaN", 1.0]), 422, "inputs[2].data[0]"),
    ("unknown column", lambda b: _tensor(b, 0, name="planet"), 422, "inputs[0].name"),
    ("wrong datatype", lambda b: _tensor(b, 0, datatype="BYTES"), 422, "inputs[0].datatype"),
    ("rows differ", lambda b: _tensor(b, 5, shape=[1], data=[3]), 422, "inputs[5].shape"),
    ("empty batch", lambda b: {"inputs": [{**t, "shape": [0], "data": []} for t in b["inputs"]]}, 422,
     "inputs[0].shape"),
]


@pytest.mark.parametrize("what, body, status, field", BAD_V2, ids=[c[0] for c in BAD_V2])
def test_bad_v2_requests_get_their_status_and_field(stack, trained, what, body, status, field):
    predictor, transformer, _ = stack
    content = body(v2_body(records(trained[1], 2)))
    # json.dumps writes NaN as the bare literal, which FastAPI's parser (v2 REST) accepts: it must
    # still be refused.
    content = content if isinstance(content, bytes) else json.dumps(content).encode()
    answer = httpx.post(f"{transformer.url}/v2/models/{NAME}/infer", content=content,
                        headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == {**answer.json()["error"], "status": status, "field": field}, answer.text
    still_up(transformer, predictor)


def test_bad_grpc_requests_get_the_status_in_their_details(stack, trained):
    import grpc
    from kserve import InferenceGRPCClient, InferRequest

    predictor, transformer, _ = stack
    rows = [r for r in records(trained[1], 40) if None not in r.values()][:2]
    inputs = kserve_inputs(rows, binary=False)
    inputs[0].data[1] = float("inf")

    async def call():
        client = InferenceGRPCClient(transformer.grpc, retries=0)
        try:
            await client.infer(InferRequest(NAME, inputs))
        finally:
            await client.close()

    with pytest.raises(grpc.RpcError) as caught:
        asyncio.run(call())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = json.loads(caught.value.details())["error"]
    assert (error["status"], error["field"]) == (422, "inputs[0].data[1]") and "finite" in error["message"]
    still_up(transformer, predictor)


@CHAIN_ONLY
def test_the_predictor_has_the_same_limits_and_error_body(stack):
    predictor, _, _ = stack
    answer = httpx.post(f"{predictor.url}/v2/models/{NAME}/infer", json={"inputs": [
        {"name": "numeric", "datatype": "FP32", "shape": [1, 3], "data": [1.0]}]})
    assert answer.status_code == 400 and answer.json()["error"]["field"] == "inputs[0].data"
    answer = httpx.post(f"{predictor.url}/v1/models/{NAME}:predict", content=b"x" * (5 << 20),
                        headers={"content-type": "application/json"})
    assert answer.status_code == 413 and answer.json()["error"]["status"] == 413
    answer = httpx.post(f"{predictor.url}/v1/models/nothing:predict", json={"instances": []})
    assert answer.status_code == 404 and answer.json()["error"]["status"] == 404
    still_up(predictor)


@CHAIN_ONLY
def test_a_predictor_4xx_stays_a_4xx(stack, trained):
    predictor, transformer, _ = stack
    # Given a batch the transformer accepts (1000 rows allowed) but the predictor refuses (50)
    rows = records(trained[1], 1) * (PREDICTOR_ROWS + 10)
    rows = [{**r, "income": 1000.0, "employment": "salaried"} for r in rows]
    answer = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json={"instances": rows})
    # Then the client gets the predictor's 413 and its error, not a 500
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"]["status"] == 413 and "50" in answer.json()["error"]["message"]
    still_up(transformer, predictor)


# ---- request ids, payload events, metrics ----------------------------------------------------

def test_request_ids_travel_end_to_end(stack, trained):
    predictor, transformer, _ = stack
    rows = records(trained[1], 2)
    # Given a client id, it comes back and the predictor saw it
    answer = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json={"instances": rows},
                        headers={"x-request-id": "client-id-42"})
    assert answer.headers["x-request-id"] == "client-id-42"
    # And without one, the transformer makes one, returns it and forwards it
    answer = httpx.post(f"{transformer.url}/v2/models/{NAME}/infer", json=v2_body(rows))
    generated = answer.headers["x-request-id"]
    assert len(generated) == 32 and answer.json()["id"] == generated
    # And errors carry the id too
    assert httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json={},
                      headers={"x-request-id": "bad-1"}).headers["x-request-id"] == "bad-1"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(i in predictor.tail(200_000) for i in ("client-id-42", generated)):
        time.sleep(0.1)
    log = predictor.tail(200_000)
    assert "requestId: client-id-42" in log and f"requestId: {generated}" in log


def test_payload_events_reach_the_sink_as_the_kserve_logger_sends_them(stack, trained):
    _, transformer, receiver = stack
    rows = records(trained[1], 2)
    request_id = uuid.uuid4().hex
    request = json.dumps({"instances": rows}).encode()
    answer = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", content=request,
                        headers={"content-type": "application/json", "x-request-id": request_id})
    events = {headers["ce-type"]: (headers, body) for headers, body in receiver.wait_for(2, request_id)}
    (req_headers, req_body) = events["org.kubeflow.serving.inference.request"]
    (res_headers, res_body) = events["org.kubeflow.serving.inference.response"]
    # Binary-mode CloudEvents: attributes in ce- headers, the raw JSON as the body
    for headers in (req_headers, res_headers):
        assert headers["ce-specversion"] == "1.0" and headers["ce-id"] == request_id
        assert headers["ce-source"].endswith(f"/v1/models/{NAME}:predict") and headers["ce-time"]
        assert headers["ce-inferenceservicename"] == NAME and headers["content-type"] == "application/json"
    assert req_body == request and json.loads(res_body) == answer.json()
    # ce-component: the KServe component that took the request (the logger agent's value)
    component = "predictor" if stack[0] is stack[1] else "transformer"
    assert req_headers["ce-component"] == res_headers["ce-component"] == component
    # And a refused request logs its request only (the agent logs responses for 200s)
    bad_id = uuid.uuid4().hex
    httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json={"instances": []}, headers={"x-request-id": bad_id})
    assert [h["ce-type"] for h, _ in receiver.wait_for(1, bad_id)] == ["org.kubeflow.serving.inference.request"]


def test_metrics_count_requests_by_code_and_time_stages_and_the_hop(stack, trained):
    predictor, entry, _ = stack
    single = predictor is entry
    component = "single" if single else "transformer"
    httpx.post(f"{entry.url}/v1/models/{NAME}:predict", json={"instances": records(trained[1], 2)})
    httpx.post(f"{entry.url}/v1/models/{NAME}:predict", json={"instances": []})
    text = httpx.get(f"{entry.url}/metrics").text
    version = model_version(str(trained[0]), load_model(str(trained[0])).metadata)
    for code in ("200", "422"):
        assert any(line.startswith("flywheel_serving_requests_total{") and f'code="{code}"' in line
                   and f'component="{component}"' in line and f'model_version="{version}"' in line
                   and 'protocol="v1"' in line for line in text.splitlines()), code
    assert "flywheel_serving_request_seconds_bucket{" in text
    for stage in ("preprocess", "postprocess"):  # prometheus_client writes the labels sorted, `le` among them
        assert any(line.startswith(f'flywheel_serving_stage_seconds_bucket{{component="{component}"')
                   and f'stage="{stage}"' in line for line in text.splitlines()), stage
    assert "request_preprocess_seconds" in text  # KServe's own stay
    if single:  # the forward pass is a stage of the one process, and there is no hop
        assert any(line.startswith('flywheel_serving_stage_seconds_bucket{component="single"')
                   and 'stage="predict"' in line for line in text.splitlines())
        assert "flywheel_serving_hop_seconds_bucket{" not in text
        return
    assert 'flywheel_serving_hop_seconds_bucket{' in text and 'protocol="grpc-v2"' in text
    text = httpx.get(f"{predictor.url}/metrics").text
    assert any(line.startswith("flywheel_serving_requests_total{") and 'component="predictor"' in line
               and 'protocol="grpc"' in line for line in text.splitlines())
    assert 'stage="predict"' in text


# ---- the REST hops ---------------------------------------------------------------------------

@CHAIN_ONLY
@pytest.mark.parametrize("protocol", ["v2", "v1"])
def test_the_rest_hops_answer_and_keep_predictor_errors(stack, trained, tmp_path, protocol):
    predictor, _, _ = stack
    transformer = Server("serving.transformer", tmp_path / f"transformer-{protocol}.log", "--model_dir",
                         str(trained[0]), "--predictor_host", f"127.0.0.1:{predictor.http_port}",
                         "--predictor_protocol", protocol)
    try:
        transformer.wait()
        rows = records(trained[1], 3)
        answer = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json={"instances": rows})
        assert answer.status_code == 200, answer.text
        assert answer.json()["probabilities"] == pytest.approx(expected(trained, rows).tolist(), abs=1e-6)
        too_many = [{**rows[0], "income": 1.0, "employment": "retired"}] * (PREDICTOR_ROWS + 1)
        answer = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json={"instances": too_many})
        assert answer.status_code == 413 and answer.json()["error"]["status"] == 413, answer.text
    finally:
        transformer.stop()


def test_a_registry_uri_resolves_to_the_logged_model_dir(trained, tmp_path):
    from serving.source import resolve
    from stages.registry import register_model

    model_dir, frame = trained
    tracking = mlflow_store(tmp_path / "mlflow.db")
    version = register_model(tracking, "credit-default", str(model_dir), None, {"data_hash": "sha256:abc"},
                             frame[COLUMNS].head(5), experiment="serving")
    # Given the champion alias in the registry, When the servers resolve models:/NAME@champion
    source = resolve("models:/credit-default@champion", tracking, download_dir=str(tmp_path / "download"))
    # Then they load the model directory logged with that version, and report its number
    assert source.version == version == "1"
    assert sorted(p.name for p in Path(source.model_dir).iterdir()) >= ["metadata.json", "model.pt",
                                                                         "preprocessor.json"]
    assert resolve(str(model_dir)).model_dir == str(model_dir)
    with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
        resolve("models:/credit-default")
