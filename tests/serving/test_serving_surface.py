"""The servers' management surface as real processes: what they bind (127.0.0.1 unless --host says
otherwise), the model repository extension not served (REST and gRPC), model versions served or
404 naming the served one (REST path, `?model_version=`, gRPC), readiness false whenever the
served model cannot answer, and a taken port ending in one line."""
import asyncio
import ipaddress
import os
import socket
import subprocess
import sys

import grpc
import httpx
import psutil
import pytest

from tests.serving.servers import NAME, Server, kserve_inputs, records, v2_body
from tests.support import ROOT, free_port


def served_version(server: Server) -> str:
    return httpx.get(f"{server.url}/v2/models/{NAME}").json()["versions"][0]


def answers(server: Server, frame, suffix: str = "", **params) -> httpx.Response:
    """A v2 inference on `server` (the predictor gets its tensors, the transformer raw columns)."""
    if server.log.name.startswith("predictor"):
        declared = httpx.get(f"{server.url}/v2/models/{NAME}").json()["inputs"]
        body = {"inputs": [{"name": t["name"], "datatype": t["datatype"], "shape": [1, t["shape"][1]],
                            "data": [0] * t["shape"][1]} for t in declared]}
    else:
        body = v2_body(records(frame, 1))
    return httpx.post(f"{server.url}/v2/models/{NAME}{suffix}/infer", json=body, params=params)


# ---- where they listen --------------------------------------------------------------------------

def ipv4(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    return str(getattr(address, "ipv4_mapped", None) or address)


def test_every_server_listens_on_loopback_only(servers):
    for server in servers.values():
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(server.process.pid).connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        # Both ports, and nothing on 0.0.0.0 or [::] (KServe 0.21 binds both there); gRPC's
        # dual-stack socket shows 127.0.0.1 as ::ffff:127.0.0.1, which accepts loopback only
        assert {server.http_port, server.grpc_port} <= {port for _, port in listening}, listening
        assert {ipv4(ip) for ip, _ in listening} == {"127.0.0.1"}, listening


def test_a_taken_port_ends_in_one_line(trained, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for module in ("serving.predictor", "serving.single"):
            done = subprocess.run([sys.executable, "-m", module, "--model_name", NAME, "--model_dir",
                                   str(trained[0]), "--http_port", str(port), "--grpc_port", str(free_port())],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode != 0, module
            assert (done.stdout + done.stderr).strip() == f"port {port} on 127.0.0.1 is in use", module
        # And the local deployer (`flywheel serve --port`) says the same before starting anything
        from deployment.loopback import LocalServing, ServingFailed
        from specs import ServingSpec

        with pytest.raises(ServingFailed, match=f"^port {port} on 127.0.0.1 is in use$"):
            LocalServing(str(trained[0]), NAME, ServingSpec(deployer="local"), tmp_path, http_port=port).start()
        assert not list(tmp_path.glob("*.log"))


# ---- the model repository extension is not served ----------------------------------------------

def test_unload_and_load_are_not_served_and_inference_goes_on(servers, trained):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    for server in servers.values():
        for action in ("unload", "load"):
            answer = httpx.post(f"{server.url}/v2/repository/models/{NAME}/{action}")
            assert answer.status_code == 404, (server.log.name, action, answer.text)
            assert answer.json()["error"]["status"] == 404
        with grpc.insecure_channel(server.grpc) as channel:
            stub = GRPCInferenceServiceStub(channel)
            for call, request in ((stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=NAME)),
                                  (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=NAME))):
                with pytest.raises(grpc.RpcError) as caught:
                    call(request)
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Then the model is still there: ready, and answering
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        assert httpx.get(f"{server.url}/v2/models/{NAME}/ready").json()["ready"] is True
        answer = answers(server, trained[1])
        assert answer.status_code == 200, (server.log.name, answer.text)


# ---- model versions -----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["predictor", "transformer", "single"])
def test_the_served_version_is_served_and_another_is_a_404_naming_it(servers, trained, which):
    server = servers[which]
    version = served_version(server)
    base = f"{server.url}/v2/models/{NAME}"
    # The served version: ready, metadata, inference by path and by query
    assert httpx.get(f"{base}/versions/{version}/ready").json() == {"name": NAME, "ready": True}
    assert httpx.get(f"{base}/ready", params={"model_version": version}).status_code == 200
    assert httpx.get(f"{base}/versions/{version}").json()["versions"] == [version]
    for answer in (answers(server, trained[1], f"/versions/{version}"),
                   answers(server, trained[1], model_version=version)):
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == version
    # Another version: 404 everywhere, naming the one served
    other = f"{version}-other"
    for answer in (httpx.get(f"{base}/versions/{other}/ready"), httpx.get(f"{base}/ready?model_version={other}"),
                   httpx.get(f"{base}/versions/{other}"), httpx.get(base, params={"model_version": other}),
                   answers(server, trained[1], f"/versions/{other}"),
                   answers(server, trained[1], model_version=other)):
        assert answer.status_code == 404, answer.text
        error = answer.json()["error"]
        assert error["field"] == "model_version" and repr(version) in error["message"], error
    # And an unknown model is a 404 too, never a 5xx
    assert httpx.get(f"{server.url}/v2/models/nothing/versions/1/ready").status_code == 404


@pytest.mark.parametrize("which", ["transformer", "single"])
def test_grpc_checks_the_version_too(servers, trained, which):
    from kserve import InferRequest
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    transformer = servers[which]
    version = served_version(transformer)
    rows = [r for r in records(trained[1], 40) if None not in r.values()][:2]
    request = InferRequest(NAME, kserve_inputs(rows, binary=True)).to_grpc()
    with grpc.insecure_channel(transformer.grpc) as channel:
        stub = GRPCInferenceServiceStub(channel)
        request.model_version = version
        assert stub.ModelInfer(request).model_version == version
        assert stub.ModelReady(pb.ModelReadyRequest(name=NAME, version=version)).ready
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name=NAME, version=version)).name == NAME
        request.model_version = "7"
        for call, message in ((stub.ModelInfer, request),
                              (stub.ModelReady, pb.ModelReadyRequest(name=NAME, version="7")),
                              (stub.ModelMetadata, pb.ModelMetadataRequest(name=NAME, version="7"))):
            with pytest.raises(grpc.RpcError) as caught:
                call(message)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND and repr(version) in caught.value.details()


# ---- readiness ----------------------------------------------------------------------------------

def test_readiness_is_false_when_the_served_model_is_gone():
    """KServe's stop() unloads every model while requests still drain; a registry without the
    served model must not read as ready (it did: readiness over no models was vacuously true)."""
    from kserve import Model
    from kserve.errors import ModelNotFound
    from kserve.model_repository import ModelRepository

    from serving.server import ready_dataplane

    model = Model(NAME)
    model.ready = True
    registry = ModelRepository()
    registry.update(model)
    dataplane = ready_dataplane(registry, served=[NAME])

    async def readiness():
        return await dataplane.ready(), await dataplane.model_ready(NAME), await dataplane.model_ready(NAME, True)

    assert asyncio.run(readiness()) == (True, True, True)
    model.ready = False
    assert asyncio.run(readiness()) == (False, False, False)
    model.ready = True
    registry.unload(NAME)
    assert asyncio.run(readiness()) == (False, False, False)  # 503 on /v2/health/ready, model ready and infer
    with pytest.raises(ModelNotFound):  # a name never served stays a 404
        asyncio.run(dataplane.model_ready("other"))
