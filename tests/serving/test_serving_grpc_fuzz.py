"""Fuzzing both servers' gRPC ports as real processes, as tests/serving/test_serving_fuzz.py does their REST
ports: `ModelInferRequest`s generated over KServe's v2 protocol buffer (inputs with any name,
datatype, shape and contents, `raw_input_contents` of any bytes, versions, parameters, requested
outputs; valid requests and valid requests with one part changed), and ModelReady / ModelMetadata
for any name and version, with the real model name most of the time. No client input may get
INTERNAL or UNKNOWN (a client's mistake is INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...),
and the servers stay ready. Deterministic (`derandomize`), bounded (100 calls per server)."""
from collections import Counter

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from tests.serving.servers import DATATYPES, NAME, kserve_inputs, records

EXAMPLES = 100
SERVER_FAULTS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
CONTENTS = {"bool_contents": st.booleans(), "int_contents": st.integers(-(2 ** 31), 2 ** 31 - 1),
            "int64_contents": st.integers(-(2 ** 63), 2 ** 63 - 1), "uint_contents": st.integers(0, 2 ** 32 - 1),
            "uint64_contents": st.integers(0, 2 ** 64 - 1), "fp32_contents": st.floats(width=32),
            "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=8)}
texts = st.text(max_size=8)


def parameters(draw, target) -> None:
    for key in draw(st.lists(st.sampled_from(["binary_data_size", "content_type", "binary_data_output"]) | texts,
                             max_size=2, unique=True)):
        kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param"]))
        value = {"bool_param": st.booleans(), "int64_param": st.integers(-(2 ** 63), 2 ** 63 - 1),
                 "string_param": texts}[kind]
        setattr(target[key], kind, draw(value))


def random_tensor(draw, names, tensor) -> None:
    tensor.name = draw(st.sampled_from(names) | texts)
    tensor.datatype = draw(st.sampled_from(DATATYPES) | st.text(max_size=6))
    tensor.shape.extend(draw(st.lists(st.integers(-2, 6) | st.sampled_from([2 ** 31, 2 ** 62, -(2 ** 63)]),
                                      max_size=3)))
    for field in draw(st.lists(st.sampled_from(sorted(CONTENTS)), max_size=2, unique=True)):
        getattr(tensor.contents, field).extend(draw(st.lists(CONTENTS[field], max_size=6)))
    parameters(draw, tensor.parameters)


def mutate(draw, names, request) -> None:
    """One part of a valid request changed: a tensor's name, datatype, shape or data, a raw buffer, an extra part."""
    change = draw(st.sampled_from(["name", "datatype", "shape", "raw", "drop_raw", "extra_raw", "contents", "drop",
                                   "extra", "outputs", "parameters", "version"]))
    index = draw(st.integers(0, len(request.inputs) - 1))
    tensor = request.inputs[index]
    if change == "name":
        tensor.name = draw(st.sampled_from(names) | texts)
    elif change == "datatype":
        tensor.datatype = draw(st.sampled_from(DATATYPES) | st.text(max_size=6))
    elif change == "shape":
        del tensor.shape[:]
        tensor.shape.extend(draw(st.lists(st.integers(-2, 6) | st.sampled_from([2 ** 31, -(2 ** 63)]), max_size=3)))
    elif change == "raw" and request.raw_input_contents:
        request.raw_input_contents[index % len(request.raw_input_contents)] = draw(st.binary(max_size=40))
    elif change == "drop_raw" and request.raw_input_contents:
        del request.raw_input_contents[-1]
    elif change == "extra_raw":
        request.raw_input_contents.append(draw(st.binary(max_size=16)))
    elif change == "contents":
        field = draw(st.sampled_from(sorted(CONTENTS)))
        getattr(tensor.contents, field).extend(draw(st.lists(CONTENTS[field], min_size=1, max_size=4)))
    elif change == "drop":
        del request.inputs[index]
    elif change == "extra":
        random_tensor(draw, names, request.inputs.add())
    elif change == "outputs":
        output = request.outputs.add()
        output.name = draw(st.sampled_from(["label", "probability", "predictions"]) | texts)
        parameters(draw, output.parameters)
    elif change == "parameters":
        parameters(draw, draw(st.sampled_from([request.parameters, tensor.parameters])))
    else:
        request.model_version = draw(texts)


@st.composite
def infer_requests(draw, names, version, valid: bytes):
    request = pb.ModelInferRequest()
    kind = draw(st.sampled_from(["valid", "mutated", "mutated", "mutated", "random", "random"]))
    if kind == "random":
        for _ in range(draw(st.integers(0, len(names) + 1))):
            random_tensor(draw, names, request.inputs.add())
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=24), max_size=len(names) + 1)))
        parameters(draw, request.parameters)
    else:
        request.ParseFromString(valid)
        if kind == "mutated":
            mutate(draw, names, request)
    request.model_name = draw(st.sampled_from([NAME, NAME, NAME]) | texts)  # mostly the real one
    if not request.model_version or draw(st.integers(0, 3)) == 0:
        request.model_version = draw(st.sampled_from(["", "", version]) | texts)
    request.id = draw(texts)
    return request


@st.composite
def calls(draw, names, version, valid: bytes):
    """(method name, request): mostly ModelInfer, also ModelReady and ModelMetadata for any name and version."""
    method = draw(st.sampled_from(["ModelInfer", "ModelInfer", "ModelInfer", "ModelReady", "ModelMetadata"]))
    if method == "ModelInfer":
        return method, draw(infer_requests(names, version, valid))
    message = pb.ModelReadyRequest if method == "ModelReady" else pb.ModelMetadataRequest
    return method, message(name=draw(st.sampled_from([NAME, NAME]) | texts),
                           version=draw(st.sampled_from(["", version]) | texts))


def valid_request(which: str, metadata: dict, frame) -> bytes:
    """A request the server answers, serialized (each example parses its own copy)."""
    from kserve import InferInput, InferRequest

    if which == "predictor":
        inputs = []
        for tensor in metadata["inputs"]:
            width = tensor["shape"][1]
            array = np.zeros((2, width), dtype=np.float32 if tensor["datatype"] == "FP32" else np.int64)
            infer_input = InferInput(tensor["name"], [2, width], tensor["datatype"])
            infer_input.set_data_from_numpy(array, binary_data=True)
            inputs.append(infer_input)
    else:
        rows = [r for r in records(frame, 40) if None not in r.values()][:2]  # binary tensors carry no nulls
        inputs = kserve_inputs(rows, binary=True)
    return InferRequest(NAME, inputs, request_id="fuzz").to_grpc().SerializeToString()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["predictor", "transformer", "single"])
def test_no_grpc_call_gets_internal_or_unknown(servers, trained, which):
    server = servers[which]
    metadata = httpx.get(f"{server.url}/v2/models/{NAME}").json()
    names, version = [t["name"] for t in metadata["inputs"]], metadata["versions"][0]
    valid = valid_request(which, metadata, trained[1])
    channel, seen = grpc.insecure_channel(server.grpc), Counter()
    stub = GRPCInferenceServiceStub(channel)
    assert stub.ModelInfer(pb.ModelInferRequest.FromString(valid), timeout=10).outputs  # the template is valid

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(calls(names, version, valid))
    def no_server_fault(call):
        method, request = call
        try:
            getattr(stub, method)(request, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            assert code not in SERVER_FAULTS, (f"{method} {request!r:.1500} -> {code} {error.details()[:500]}\n"
                                               f"{server.tail(3000)}")
        seen[method, code] += 1

    try:
        no_server_fault()
    finally:
        channel.close()
    # The fuzzer reached the model (answers) and its checks (refusals), and the server is still up
    assert seen["ModelInfer", grpc.StatusCode.OK] and sum(
        n for (method, code), n in seen.items() if method == "ModelInfer" and code != grpc.StatusCode.OK), seen
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
