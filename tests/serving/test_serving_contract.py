"""The request contract on the wire, against the servers clients call (the transformer in front of
the predictor, and the one-process server), as real processes: the
dataset's id column accepted and echoed (never a feature), categoricals as strings, the Open
Inference Protocol's request id echoed (REST and gRPC), GET on an inference path a 405,
gzip-encoded bodies (and gzip bombs) handled, KServe's own clients working unchanged."""
import asyncio
import gzip
import json
import uuid

import httpx
import numpy as np
import pytest

from tests.serving.servers import COLUMNS, NAME, NUMERIC, TOPOLOGIES, Receiver, expected, records, start_entry, stop_all

ID = "customer_id"  # config/base.yaml dataset.id_column, the reference task's id
BODY_LIMIT = 200_000


@pytest.fixture(scope="module", params=TOPOLOGIES)
def stack(request, trained, tmp_path_factory):
    """The entry (transformer in front of a predictor, or the one-process server) told the id
    column, with payload events to a receiver."""
    model_dir, _ = trained
    logs = tmp_path_factory.mktemp(f"contract-logs-{request.param}")
    receiver = Receiver()
    _, entry, servers = start_entry(request.param, model_dir, logs, entry_args=(
        "--id_column", ID, "--max_body_bytes", str(BODY_LIMIT), "--payload_log_url", receiver.url))
    try:
        yield entry, receiver
    finally:
        stop_all(servers)
        receiver.server.shutdown()


def rows_with_ids(frame, n: int = 3, complete: bool = False) -> tuple[list[dict], list[str]]:
    """Rows as a client holds them, the id column included (complete: no nulls, for binary tensors)."""
    part = frame.dropna() if complete else frame
    rows = records(part, n)
    ids = part[ID].head(n).tolist()
    return [{ID: i, **row} for i, row in zip(ids, rows)], ids


def v2_body(rows: list[dict], with_id: bool = True) -> dict:
    columns = ([ID] if with_id else []) + COLUMNS
    return {"inputs": [{"name": c, "datatype": "FP64" if c in NUMERIC else "BYTES", "shape": [len(rows)],
                        "data": [r[c] for r in rows]} for c in columns]}


def post(transformer, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{transformer.url}{path}", timeout=30, **kwargs)


V1, V2 = f"/v1/models/{NAME}:predict", f"/v2/models/{NAME}/infer"


# ---- the id column -----------------------------------------------------------------------------

def test_the_id_column_is_accepted_echoed_and_not_a_feature(stack, trained):
    transformer, _ = stack
    rows, ids = rows_with_ids(trained[1], 4)
    want = expected(trained, [{c: r[c] for c in COLUMNS} for r in rows])
    # v1: the rows keep their join key and each prediction comes back with its id, row for row
    answer = post(transformer, V1, json={"instances": rows})
    assert answer.status_code == 200, answer.text
    assert answer.json()[ID] == ids and answer.json()["probabilities"] == pytest.approx(want.tolist(), abs=1e-6)
    # v2: an input tensor named after the id column, echoed as an output tensor of that name
    answer = post(transformer, V2, json=v2_body(rows))
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert (outputs[ID]["datatype"], outputs[ID]["shape"], outputs[ID]["data"]) == ("BYTES", [4], ids)
    assert outputs["probability"]["data"] == pytest.approx(want.tolist(), abs=1e-6)
    # And integer ids come back as INT64
    body = v2_body(rows)
    body["inputs"][0] = {"name": ID, "datatype": "INT64", "shape": [4], "data": [7, 8, 9, 10]}
    outputs = {o["name"]: o for o in post(transformer, V2, json=body).json()["outputs"]}
    assert (outputs[ID]["datatype"], outputs[ID]["data"]) == ("INT64", [7, 8, 9, 10])
    # And requests without it are answered as before, with no id in the answer
    answer = post(transformer, V1, json={"instances": [{c: r[c] for c in COLUMNS} for r in rows]})
    assert answer.status_code == 200 and ID not in answer.json()


@pytest.mark.parametrize("what, change, field", [
    ("in some rows only", lambda rows: [rows[0], {c: v for c, v in rows[1].items() if c != ID}], "instances[1]."),
    ("a float id", lambda rows: [{**rows[0], ID: 1.5}], "instances[0]."),
    ("a null id", lambda rows: [{**rows[0], ID: None}], "instances[0]."),
], ids=["in some rows only", "a float id", "a null id"])
def test_bad_ids_are_a_422_naming_the_field(stack, trained, what, change, field):
    transformer, _ = stack
    rows, _ = rows_with_ids(trained[1], 2)
    answer = post(transformer, V1, json={"instances": change(rows)})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == field + ID


def test_payload_events_carry_the_id_column(stack, trained):
    transformer, receiver = stack
    rows, ids = rows_with_ids(trained[1], 2)
    request_id = uuid.uuid4().hex
    post(transformer, V1, json={"instances": rows}, headers={"x-request-id": request_id})
    events = {h["ce-type"].rsplit(".", 1)[1]: json.loads(body) for h, body in receiver.wait_for(2, request_id)}
    # The sink can join ground truth by entity id: the request rows and the response both carry it
    assert [row[ID] for row in events["request"]["instances"]] == ids
    assert events["response"][ID] == ids


# ---- categoricals are strings ------------------------------------------------------------------

def test_a_number_in_a_text_categorical_column_is_a_422(stack, trained):
    transformer, _ = stack
    rows = records(trained[1], 2)
    k = COLUMNS.index("housing")
    # v1: "housing": 3 would score as an unseen housing; it is refused, naming the field
    answer = post(transformer, V1, json={"instances": [{**rows[0], "housing": 3}]})
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "instances[0].housing", answer.text
    assert '"3"' in answer.json()["error"]["message"]
    # v2: a number inside a BYTES tensor, and an integer tensor for a text column
    body = v2_body(rows, with_id=False)
    body["inputs"][k]["data"] = [rows[0]["housing"], 3]
    answer = post(transformer, V2, json=body)
    assert answer.status_code == 422 and answer.json()["error"]["field"] == f"inputs[{k}].data[1]", answer.text
    body["inputs"][k].update(datatype="INT64", data=[1, 3])
    answer = post(transformer, V2, json=body)
    assert answer.status_code == 422 and answer.json()["error"]["field"] == f"inputs[{k}].datatype", answer.text


# ---- the request id (Open Inference Protocol) --------------------------------------------------

def test_v2_responses_echo_the_request_id_over_rest_and_grpc(stack, trained):
    from kserve import InferenceGRPCClient, InferRequest

    transformer, _ = stack
    rows = records(trained[1].dropna(), 2)
    # REST: the body's id comes back in the body, whatever the tracing header says
    body = v2_body(rows, with_id=False)
    answer = post(transformer, V2, json={"id": "oip-42", **body}, headers={"x-request-id": "trace-1"})
    assert answer.json()["id"] == "oip-42" and answer.headers["x-request-id"] == "trace-1"
    assert post(transformer, V2, json={"id": "oip-43", **body}).json()["id"] == "oip-43"

    # gRPC: the same with the tracing id in the call's metadata
    async def grpc_call():
        client = InferenceGRPCClient(transformer.grpc, retries=0)
        try:
            return await client.infer(InferRequest(NAME, kserve_inputs(rows, binary=True), request_id="oip-44"),
                                      headers=[("x-request-id", "trace-2")])
        finally:
            await client.close()

    assert asyncio.run(grpc_call()).id == "oip-44"


# ---- methods and encodings ---------------------------------------------------------------------

def test_get_on_an_inference_path_is_a_405_in_the_error_shape(stack):
    transformer, _ = stack
    for path in (V1, V2, f"/v2/models/{NAME}/versions/1/infer"):
        answer = httpx.get(transformer.url + path)
        assert answer.status_code == 405, (path, answer.text)
        assert answer.json()["error"]["status"] == 405 and answer.headers["allow"] == "POST"
        assert answer.headers["x-request-id"]
    # The model's status routes next to them still answer GET
    assert httpx.get(f"{transformer.url}/v1/models/{NAME}").status_code == 200


def test_gzip_bodies_are_decompressed_within_the_body_limit(stack, trained):
    transformer, receiver = stack
    rows = records(trained[1], 3)
    plain = post(transformer, V1, json={"instances": rows}).json()
    request_id = uuid.uuid4().hex
    content = json.dumps({"instances": rows}).encode()
    zipped = {"content-type": "application/json", "content-encoding": "gzip", "x-request-id": request_id}
    # A gzip body answers what the plain one does, over v1 and v2
    answer = post(transformer, V1, content=gzip.compress(content), headers=zipped)
    assert answer.status_code == 200 and answer.json() == plain, answer.text
    v2 = post(transformer, V2, content=gzip.compress(json.dumps(v2_body(rows, with_id=False)).encode()),
              headers={**zipped, "x-request-id": "v2-gz"})
    assert v2.status_code == 200 and v2.json()["outputs"][1]["data"] == pytest.approx(plain["probabilities"]), v2.text
    # And the payload event holds the decompressed JSON the sink parses
    request = [body for h, body in receiver.wait_for(2, request_id) if h["ce-type"].endswith("request")]
    assert json.loads(request[0]) == {"instances": rows}
    # A small body that decompresses past the limit is a 413, not memory
    bomb = gzip.compress(b" " * (BODY_LIMIT * 50))
    assert len(bomb) < BODY_LIMIT // 10
    answer = post(transformer, V1, content=bomb, headers=zipped)
    assert answer.status_code == 413 and answer.json()["error"]["status"] == 413, answer.text
    # Not gzip at all is a 400; another encoding a 415
    answer = post(transformer, V1, content=content, headers=zipped)
    assert answer.status_code == 400 and "gzip" in answer.json()["error"]["message"], answer.text
    answer = post(transformer, V1, content=content, headers={**zipped, "content-encoding": "br"})
    assert answer.status_code == 415 and answer.json()["error"]["status"] == 415, answer.text


# ---- KServe's own clients and the protocol's reference shapes ----------------------------------

def kserve_inputs(rows: list[dict], binary: bool, with_id: bool = False):
    from kserve import InferInput

    inputs = []
    for column in ([ID] if with_id else []) + COLUMNS:
        values = [r[column] for r in rows]
        numeric = column in NUMERIC
        tensor = InferInput(column, [len(rows)], "FP64" if numeric else "BYTES")
        tensor.set_data_from_numpy(np.asarray(values, dtype=np.float64 if numeric else object), binary_data=binary)
        inputs.append(tensor)
    return inputs


def test_kserve_clients_send_the_id_column_and_get_it_back(stack, trained):
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferRequest, RESTConfig

    transformer, _ = stack
    rows, ids = rows_with_ids(trained[1], 4, complete=True)
    want = expected(trained, [{c: r[c] for c in COLUMNS} for r in rows])

    async def calls():
        async with InferenceRESTClient(RESTConfig(protocol="v1")) as v1:
            v1_answer = await v1.infer(transformer.url, {"instances": rows}, model_name=NAME)
        async with InferenceRESTClient(RESTConfig(protocol="v2")) as v2:
            v2_answer = await v2.infer(transformer.url, InferRequest(
                NAME, kserve_inputs(rows, binary=False, with_id=True), request_id="rest-9"), model_name=NAME)
        grpc = InferenceGRPCClient(transformer.grpc, retries=0)
        try:
            grpc_answer = await grpc.infer(InferRequest(NAME, kserve_inputs(rows, binary=True, with_id=True),
                                                        request_id="grpc-9"))
        finally:
            await grpc.close()
        return v1_answer, v2_answer, grpc_answer

    v1_answer, v2_answer, grpc_answer = asyncio.run(calls())
    assert v1_answer[ID] == ids and v1_answer["probabilities"] == pytest.approx(want.tolist(), abs=1e-6)
    for answer, request_id in ((v2_answer, "rest-9"), (grpc_answer, "grpc-9")):
        assert answer.id == request_id
        assert [str(i, "utf-8") if isinstance(i, bytes) else i
                for i in answer.get_output_by_name(ID).as_numpy().tolist()] == ids
        assert answer.get_output_by_name("probability").as_numpy() == pytest.approx(want, abs=1e-6)


def test_the_protocols_reference_request_shape_is_answered(stack, trained):
    transformer, _ = stack
    rows, _ = rows_with_ids(trained[1], 2, complete=True)
    # The Open Inference Protocol's request: an id, parameters, [n, 1] tensors, requested outputs
    body = {"id": "42", "parameters": {}, "outputs": [{"name": "label"}, {"name": "probability"}],
            "inputs": [{**t, "shape": [2, 1], "parameters": {}} for t in v2_body(rows, with_id=False)["inputs"]]}
    answer = post(transformer, V2, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["id"] == "42" and answer.json()["model_name"] == NAME
    assert {o["name"] for o in answer.json()["outputs"]} >= {"label", "probability"}
