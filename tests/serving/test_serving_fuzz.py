"""Fuzzing both servers as real processes: requests generated over the v1/v2 request schema (and
garbage bodies, query strings, headers, methods and the versioned and management paths), with the
real model name. No client input may get a 5xx, and the servers stay ready. Deterministic
(`derandomize`), bounded (150 requests per server)."""
import json
from collections import Counter
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving.servers import DATATYPES, NAME, records, v2_body

EXAMPLES = 150
PATHS = ["/v1/models/{m}:predict", "/v1/models/{m}:explain", "/v1/models/{m}", "/v1/models",
         "/v2/models/{m}/infer", "/v2/models/{m}/versions/{v}/infer", "/v2/models/{m}/ready",
         "/v2/models/{m}/versions/{v}/ready", "/v2/models/{m}", "/v2/models/{m}/versions/{v}", "/v2/models",
         "/v2/health/ready", "/v2/health/live", "/v2", "/v2/repository/models/{m}/load",
         "/v2/repository/models/{m}/unload", "/v2/repository/index", "/metrics", "/", "/{m}"]
INFERENCE = [p for p in PATHS if p.endswith((":predict", "/infer"))]
# Printable ASCII without edge spaces: what HTTP allows in a header value (h11 refuses the rest client-side)
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24).map(str.strip)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(),
                    st.text(max_size=10), st.sampled_from(["NaN", "inf", "-Infinity", "", "1e400", "0x10"]))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


@st.composite
def v1_bodies(draw, names):
    row = draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=8), scalars | anything, max_size=len(names)))
    rows = draw(st.lists(st.just(row) | st.dictionaries(st.sampled_from(names), scalars), max_size=5))
    body = {"instances": rows if draw(st.booleans()) else draw(anything)}
    if draw(st.booleans()):
        body[draw(st.sampled_from(["parameters", "inputs", "signature_name", "id"]))] = draw(anything)
    return body


@st.composite
def v2_bodies(draw, names):
    def tensor():
        shape = draw(st.lists(st.integers(-2, 6) | st.sampled_from([2 ** 31, 2 ** 63, -(2 ** 63)]), max_size=3))
        tensor = {"name": draw(st.sampled_from(names) | st.text(max_size=8)),
                  "datatype": draw(st.sampled_from(DATATYPES) | st.text(max_size=6)),
                  "shape": shape, "data": draw(st.lists(scalars, max_size=8) | anything)}
        if draw(st.booleans()):
            tensor["parameters"] = draw(st.dictionaries(st.sampled_from(["binary_data_size", "content_type"])
                                                        | st.text(max_size=6), scalars, max_size=2))
        return tensor

    body = {"inputs": [tensor() for _ in range(draw(st.integers(0, len(names) + 1)))]}
    for key in draw(st.lists(st.sampled_from(["id", "parameters", "outputs"]), max_size=2, unique=True)):
        body[key] = draw(anything)
    return body


@st.composite
def mutated(draw, body: dict):
    """A valid body with one value somewhere in it replaced."""
    body = json.loads(json.dumps(body))
    node = body
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        if not isinstance(node[key], (dict, list)) or not node[key]:
            node[key] = draw(scalars)
            return body
        node = node[key]
    if isinstance(node, dict):
        node[draw(st.sampled_from(sorted(node) or ["x"]))] = draw(anything)
    elif isinstance(node, list):
        node.append(draw(anything))
    return body


@st.composite
def requests(draw, names, version, valid):
    template = draw(st.sampled_from(INFERENCE) | st.sampled_from(PATHS))
    model = draw(st.one_of(st.just(NAME), st.just(NAME), st.just(NAME), st.text(max_size=8)))  # mostly the real one
    path = template.format(m=quote(model, safe=""), v=quote(draw(st.just(version) | st.text(max_size=6)), safe=""))
    usual = "POST" if template in INFERENCE else "GET"
    method = usual if draw(st.integers(0, 3)) else draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH",
                                                                          "HEAD", "OPTIONS"]))
    params = draw(st.dictionaries(st.sampled_from(["model_version", "id", "x"]) | st.text(min_size=1, max_size=6),
                                  st.just(version) | st.text(max_size=6), max_size=2))
    kind = draw(st.sampled_from(["valid", "valid", "mutated", "mutated", "v1", "v2", "json", "bytes", "empty"]))
    good = valid["v1" if path.endswith(":predict") else "v2"]
    body = {"valid": lambda: json.dumps(good).encode(), "mutated": lambda: json.dumps(draw(mutated(good))).encode(),
            "v1": lambda: json.dumps(draw(v1_bodies(names))).encode(),
            "v2": lambda: json.dumps(draw(v2_bodies(names))).encode(),
            "json": lambda: json.dumps(draw(anything)).encode(), "bytes": lambda: draw(st.binary(max_size=64)),
            "empty": lambda: b""}[kind]()
    json_type = st.just("application/json")
    others = ["application/octet-stream", "application/cloudevents+json", "text/plain", "application/json; q=1"]
    headers = {"content-type": draw(st.one_of(json_type, json_type, HEADER_TEXT, st.sampled_from(others)))}
    extra = {} if draw(st.integers(0, 2)) else draw(st.dictionaries(st.sampled_from(
        ["x-request-id", "inference-header-content-length", "ce-specversion", "ce-id", "ce-type", "content-encoding",
         "accept"]), HEADER_TEXT, min_size=1, max_size=3))
    return method, path, params, {**headers, **extra}, body


@pytest.mark.slow
@pytest.mark.parametrize("which", ["predictor", "transformer", "single"])
def test_no_request_gets_a_5xx(servers, trained, which):
    server = servers[which]
    metadata = httpx.get(f"{server.url}/v2/models/{NAME}").json()
    names, version = [t["name"] for t in metadata["inputs"]], metadata["versions"][0]
    if which == "predictor":
        widths = {t["name"]: t["shape"][1] for t in metadata["inputs"]}
        valid = {"v1": {"instances": [{n: [0] * w for n, w in widths.items()}]},
                 "v2": {"inputs": [{**t, "shape": [1, t["shape"][1]], "data": [0] * t["shape"][1]}
                                   for t in metadata["inputs"]]}}
    else:
        rows = [r for r in records(trained[1], 40) if None not in r.values()][:2]
        valid = {"v1": {"instances": rows}, "v2": v2_body(rows)}
    client, seen = httpx.Client(base_url=server.url, timeout=10), Counter()

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(requests(names, version, valid))
    def no_5xx(request):
        method, path, params, headers, body = request
        answer = client.request(method, path, params=params, headers=headers,
                                content=None if method in ("GET", "HEAD") else body)
        seen[answer.status_code, method == "POST" and path in paths_of_inference] += 1
        assert answer.status_code < 500, (f"{method} {path} params={params} headers={headers} body={body[:300]!r} "
                                          f"-> {answer.status_code} {answer.text[:500]}\n{server.tail(3000)}")

    paths_of_inference = {p.format(m=NAME, v=version) for p in INFERENCE}
    try:
        no_5xx()
    finally:
        client.close()
    # The fuzzer reached the model (answers) and its checks (refusals), and the server is still up
    assert seen[200, True] and sum(n for (code, inference), n in seen.items() if inference and code >= 400), seen
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
