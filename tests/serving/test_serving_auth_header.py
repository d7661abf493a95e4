"""The caller's bearer token reaches the predictor through the transformer's hop, and nothing else
the client sent rides along. Istio's RequestAuthentication on the serving pods (fleet/auth.py) keeps
the token in the request (`forwardOriginalToken: true`), and a separate predictor's sidecar checks
it again: the transformer must forward `Authorization` on both hops (REST header; gRPC metadata
`authorization`), as KServe's own transformer does, and only the headers it means to.

Real servers on loopback: the predictor is `serving.predictor` with its received headers recorded
(tests/serving/header_spy.py), the transformer is `serving.transformer` unchanged. Those tests are
`slow` (three server processes and a model trained for them: ~25 s); the header selection itself
is checked fast below.
"""
import asyncio
import json
import uuid

import httpx
import pytest

from serving.hop import FORWARDED_HEADERS, forwarded
from tests.serving.header_spy import SPY_ENV
from tests.serving.servers import NAME, Server, kserve_inputs, records, v2_body

TOKEN = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzY29yaW5nIn0.c2lnbmF0dXJl"  # a made-up JWT, never verified here
# What a client may send that must not travel to the predictor: credentials of other kinds, its
# own routing/identity claims (a predictor trusting x-forwarded-* or a user header would be fooled).
PRIVATE = {"cookie": "session=s3cr3t-cookie", "x-api-key": "k3y-not-forwarded",
           "x-forwarded-for": "203.0.113.9", "x-user": "mallory", "proxy-authorization": "Basic bWFsbG9yeTpw"}


@pytest.fixture(scope="module")
def spied(trained, tmp_path_factory):
    """The spied predictor and two transformers in front of it: one per hop (grpc-v2, v2 REST)."""
    model_dir, _ = trained
    logs = tmp_path_factory.mktemp("auth-header")
    seen = logs / "seen.jsonl"
    with pytest.MonkeyPatch.context() as env:
        env.setenv(SPY_ENV, str(seen))
        predictor = Server("tests.serving.header_spy", logs / "predictor.log", "--model_dir", str(model_dir))
    hops = {"grpc-v2": f"127.0.0.1:{predictor.grpc_port}", "v2": f"127.0.0.1:{predictor.http_port}"}
    transformers = {hop: Server("serving.transformer", logs / f"transformer-{hop}.log", "--model_dir", str(model_dir),
                                "--predictor_host", host, "--predictor_protocol", hop) for hop, host in hops.items()}
    try:
        predictor.wait()
        for transformer in transformers.values():
            transformer.wait()
        yield transformers, seen
    finally:
        for server in (*transformers.values(), predictor):
            server.stop()


def received(seen, request_id: str) -> dict:
    """The headers the predictor got with the request `request_id` (exactly one such request)."""
    matches = [h for h in map(json.loads, seen.read_text().splitlines()) if h.get("x-request-id") == request_id]
    assert len(matches) == 1, f"the predictor got {len(matches)} requests with id {request_id}"
    return matches[0]


def assert_nothing_private(headers: dict) -> None:
    for name, value in PRIVATE.items():
        assert name not in headers, f"{name} leaked to the predictor"
        assert not any(value in v for v in headers.values()), f"the value of {name} leaked to the predictor"


@pytest.mark.slow
@pytest.mark.parametrize("hop", ["grpc-v2", "v2"])
@pytest.mark.parametrize("client", ["v1", "v2"])
def test_a_rest_callers_token_reaches_the_predictor_and_nothing_else(spied, trained, hop, client):
    transformers, seen = spied
    rows, request_id = records(trained[1], 2), uuid.uuid4().hex
    path, body = ((f"/v1/models/{NAME}:predict", {"instances": rows}) if client == "v1"
                  else (f"/v2/models/{NAME}/infer", v2_body(rows)))
    answer = httpx.post(transformers[hop].url + path, json=body,
                        headers={"authorization": TOKEN, "x-request-id": request_id, **PRIVATE})
    assert answer.status_code == 200, answer.text
    headers = received(seen, request_id)
    assert headers["authorization"] == TOKEN  # REST header on the v2 hop, gRPC metadata on grpc-v2
    assert_nothing_private(headers)


@pytest.mark.slow
def test_a_grpc_callers_token_metadata_reaches_the_predictor(spied, trained):
    from kserve import InferenceGRPCClient, InferRequest

    transformers, seen = spied
    rows = [r for r in records(trained[1], 40) if None not in r.values()][:2]  # binary tensors carry no nulls
    request_id = uuid.uuid4().hex

    async def call():
        client = InferenceGRPCClient(transformers["grpc-v2"].grpc, retries=0)
        try:
            return await client.infer(InferRequest(NAME, kserve_inputs(rows, binary=True), request_id=request_id),
                                      headers=[("authorization", TOKEN), ("x-request-id", request_id),
                                               *PRIVATE.items()])
        finally:
            await client.close()

    assert asyncio.run(call()).id == request_id
    headers = received(seen, request_id)
    assert headers["authorization"] == TOKEN
    assert_nothing_private(headers)


@pytest.mark.slow
@pytest.mark.parametrize("hop", ["grpc-v2", "v2"])
def test_a_token_does_not_outlive_its_request_on_the_persistent_hop(spied, trained, hop):
    transformers, seen = spied
    rows = records(trained[1], 1)
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    url = f"{transformers[hop].url}/v1/models/{NAME}:predict"
    # Given a call with a token, then one without, over the same persistent channel/client
    assert httpx.post(url, json={"instances": rows}, headers={"authorization": TOKEN, "x-request-id": first}
                      ).status_code == 200
    assert httpx.post(url, json={"instances": rows}, headers={"x-request-id": second}).status_code == 200
    # Then the second reaches the predictor without the first caller's token
    assert received(seen, first)["authorization"] == TOKEN
    assert "authorization" not in received(seen, second)


def test_the_forwarded_set_is_kserves():
    # KServe's own transformer forwards exactly these (kserve/model.py `_FORWARDABLE_HEADERS`, 0.21);
    # widening the set would leak client headers to the predictor.
    from kserve import model

    assert set(FORWARDED_HEADERS) == set(model._FORWARDABLE_HEADERS)


def test_only_the_forwardable_headers_are_picked():
    # KServe hands the model lower-cased REST headers and gRPC metadata as one dict.
    picked = dict(forwarded({"authorization": TOKEN, "x-request-id": "r-1", "content-type": "application/json",
                             **PRIVATE}))
    assert picked == {"authorization": TOKEN, "x-request-id": "r-1"}
    assert forwarded({"x-request-id": "r-2"}) == [("x-request-id", "r-2")]  # no token: none invented
    assert forwarded(None) == []
