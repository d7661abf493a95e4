"""The transformer's call to its predictor, made cheap.

KServe's own hop turns the tensors into an `InferRequest`, re-encodes them per request (JSON lists
over REST; proto `contents` over gRPC, then back through `InferResponse`), and turns every predictor
error into a 500. Here the tensors go as they are:

* grpc-v2 (the default): one persistent `grpc.aio` channel, `ModelInfer` with the two tensors'
  bytes in `raw_input_contents` and the probabilities read from `raw_output_contents`
  (`np.frombuffer`, no per-value work). Collocated, that is a localhost HTTP/2 stream.
* v2 REST: one persistent httpx client, the binary tensor extension (JSON header plus raw bytes,
  `inference-header-content-length`) both ways.
* v1 REST: one persistent httpx client, JSON rows (v1 has no binary form).

A predictor error keeps its status (our predictor's error body travels in the gRPC details or
the REST body); a predictor that cannot be reached is a 503, one that times out a 504. Torch-free.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from serving.contract import CATEGORICAL, CATEGORICAL_DATATYPE, NUMERIC, NUMERIC_DATATYPE, PROBABILITY
from serving.errors import INTERNAL, TIMEOUT, UNAVAILABLE, RequestError, from_body
from serving.transform import Features

FORWARDED_HEADERS = ("x-request-id", "x-b3-traceid", "authorization")  # what KServe forwards too
BINARY_HEADER = "inference-header-content-length"


@dataclass(frozen=True)
class Prediction:
    """What the predictor answered: P(positive class) per row and the version that answered."""

    probabilities: np.ndarray
    model_version: str | None


def forwarded(headers: dict | None) -> list[tuple[str, str]]:
    """The request headers that travel to the predictor."""
    headers = headers or {}
    return [(name, str(headers[name])) for name in FORWARDED_HEADERS if headers.get(name)]


def _probabilities(raw: bytes | list, rows: int) -> np.ndarray:
    values = np.frombuffer(raw, dtype=np.float32) if isinstance(raw, (bytes, bytearray)) \
        else np.asarray(raw, dtype=np.float32)
    if values.shape != (rows,):
        raise RequestError(INTERNAL, None, f"the predictor answered {values.size} probabilities for {rows} rows")
    return values


class Hop(ABC):
    """A connection to the predictor serving `model_name` at `host` (`HOST:PORT`)."""

    protocol: str

    def __init__(self, host: str, model_name: str, timeout: float = 60.0, use_ssl: bool = False):
        self.host, self.model_name, self.timeout, self.use_ssl = host, model_name, float(timeout), use_ssl

    @abstractmethod
    async def infer(self, features: Features, request_id: str | None, headers: list[tuple[str, str]]) -> Prediction:
        """Send one batch; raise `RequestError` with the predictor's status when it refuses."""

    @abstractmethod
    async def ready(self) -> bool:
        """Whether the predictor's model is ready (False, never an exception, when unreachable)."""

    @abstractmethod
    async def metadata(self) -> dict:
        """The predictor's v2 model metadata (inputs, outputs)."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connection."""


class GrpcHop(Hop):
    """grpc-v2 with raw tensor contents over one persistent channel."""

    protocol = "grpc-v2"
    # Reconnect fast after the predictor restarts: gRPC's default backoff waits up to 2 minutes.
    OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
               ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.enable_retries", 0)]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._channel = self._stub = None

    def _client(self):
        """The stub, on a channel made in the running event loop (grpc.aio binds to it)."""
        if self._stub is None:
            import grpc
            from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

            host = self.host if ":" in self.host else f"{self.host}:{443 if self.use_ssl else 80}"
            self._channel = (grpc.aio.secure_channel(host, grpc.ssl_channel_credentials(), options=self.OPTIONS)
                             if self.use_ssl else grpc.aio.insecure_channel(host, options=self.OPTIONS))
            self._stub = GRPCInferenceServiceStub(self._channel)
        return self._stub

    def _request(self, features: Features, request_id: str | None):
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        tensor = pb.ModelInferRequest.InferInputTensor
        return pb.ModelInferRequest(
            model_name=self.model_name, id=request_id or "",
            inputs=[tensor(name=NUMERIC, datatype=NUMERIC_DATATYPE, shape=features.numeric.shape),
                    tensor(name=CATEGORICAL, datatype=CATEGORICAL_DATATYPE, shape=features.categorical.shape)],
            raw_input_contents=[features.numeric.tobytes(), features.categorical.tobytes()])

    async def infer(self, features, request_id, headers) -> Prediction:
        import grpc

        try:
            response = await self._client().ModelInfer(self._request(features, request_id), metadata=headers,
                                                       timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None
        names = [output.name for output in response.outputs]
        if PROBABILITY not in names:
            raise RequestError(INTERNAL, None, f"the predictor answered {names}, not {PROBABILITY!r}")
        k = names.index(PROBABILITY)
        raw = (response.raw_output_contents[k] if response.raw_output_contents
               else response.outputs[k].contents.fp32_contents)
        return Prediction(_probabilities(raw, features.rows), response.model_version or None)

    @staticmethod
    def _error(err) -> RequestError:
        import grpc

        from serving.rpc_errors import HTTP_STATUSES

        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE and not (err.details() or "").startswith("{"):
            return RequestError(UNAVAILABLE, None, f"the predictor is unavailable: {err.details()}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RequestError(TIMEOUT, None, "the predictor did not answer in time")
        return from_body(err.details() or "", HTTP_STATUSES.get(code, INTERNAL))

    async def ready(self) -> bool:
        import grpc
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        try:
            answer = await self._client().ModelReady(pb.ModelReadyRequest(name=self.model_name), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.ready)

    async def metadata(self) -> dict:
        from google.protobuf.json_format import MessageToDict
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        answer = await self._client().ModelMetadata(pb.ModelMetadataRequest(name=self.model_name), timeout=2.0)
        metadata = MessageToDict(answer, preserving_proto_field_name=True)
        for tensor in metadata.get("inputs", []) + metadata.get("outputs", []):
            tensor["shape"] = [int(d) for d in tensor.get("shape", [])]  # int64 comes back as strings
        return metadata

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


class RestHop(Hop):
    """v2 REST with binary tensors, or v1 REST with JSON rows, over one persistent httpx client."""

    def __init__(self, *args, protocol: str = "v2", **kwargs):
        super().__init__(*args, **kwargs)
        self.protocol = protocol
        scheme = "https" if self.use_ssl else "http"
        self.base = f"{scheme}://{self.host}"
        self._http = None

    def _client(self):
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(base_url=self.base, timeout=self.timeout,
                                           limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return self._http

    def _v2_body(self, features: Features, request_id: str | None) -> tuple[bytes, dict]:
        numeric, categorical = features.numeric.tobytes(), features.categorical.tobytes()
        header = json.dumps({
            "id": request_id or "", "parameters": {"binary_data_output": True},
            "inputs": [
                {"name": NUMERIC, "datatype": NUMERIC_DATATYPE, "shape": list(features.numeric.shape),
                 "parameters": {"binary_data_size": len(numeric)}},
                {"name": CATEGORICAL, "datatype": CATEGORICAL_DATATYPE, "shape": list(features.categorical.shape),
                 "parameters": {"binary_data_size": len(categorical)}}]}).encode()
        headers = {BINARY_HEADER: str(len(header)), "content-type": "application/octet-stream"}
        return header + numeric + categorical, headers

    @staticmethod
    def _v1_body(features: Features) -> tuple[bytes, dict]:
        rows = [{NUMERIC: n, CATEGORICAL: c} for n, c in zip(features.numeric.tolist(), features.categorical.tolist())]
        return json.dumps({"instances": rows}).encode(), {"content-type": "application/json"}

    async def infer(self, features, request_id, headers) -> Prediction:
        import httpx

        v2 = self.protocol == "v2"
        body, extra = self._v2_body(features, request_id) if v2 else self._v1_body(features)
        path = f"/v2/models/{self.model_name}/infer" if v2 else f"/v1/models/{self.model_name}:predict"
        try:
            answer = await self._client().post(path, content=body, headers={**dict(headers), **extra})
        except httpx.TimeoutException:
            raise RequestError(TIMEOUT, None, "the predictor did not answer in time") from None
        except httpx.TransportError as err:
            raise RequestError(UNAVAILABLE, None, f"the predictor is unavailable: {err}") from None
        if answer.status_code >= 400:
            raise from_body(answer.content, answer.status_code)
        return self._v2_prediction(answer, features.rows) if v2 else self._v1_prediction(answer, features.rows)

    @staticmethod
    def _v2_prediction(answer, rows: int) -> Prediction:
        length = int(answer.headers.get(BINARY_HEADER, len(answer.content)))
        header = json.loads(answer.content[:length])
        offset, raw = length, None
        for output in header.get("outputs", []):
            size = (output.get("parameters") or {}).get("binary_data_size")
            if output.get("name") == PROBABILITY:
                raw = answer.content[offset:offset + size] if size is not None else output.get("data", [])
                break
            offset += size or 0
        if raw is None:
            raise RequestError(INTERNAL, None, f"the predictor's answer has no {PROBABILITY!r} output")
        return Prediction(_probabilities(raw, rows), header.get("model_version"))

    @staticmethod
    def _v1_prediction(answer, rows: int) -> Prediction:
        data = answer.json()
        return Prediction(_probabilities(data.get("predictions", []), rows), data.get("model_version"))

    async def ready(self) -> bool:
        import httpx

        path = f"/v2/models/{self.model_name}/ready" if self.protocol == "v2" else f"/v1/models/{self.model_name}"
        try:
            return (await self._client().get(path, timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def metadata(self) -> dict:
        # KServe serves v2 metadata next to v1, on the same port.
        answer = await self._client().get(f"/v2/models/{self.model_name}", timeout=2.0)
        answer.raise_for_status()
        return answer.json()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def hop_for(protocol: str, host: str, model_name: str, timeout: float = 60.0, use_ssl: bool = False) -> Hop:
    """The hop for KServe's `--predictor_protocol` value."""
    if protocol == "grpc-v2":
        return GrpcHop(host, model_name, timeout, use_ssl)
    if protocol in ("v1", "v2"):
        return RestHop(host, model_name, timeout, use_ssl, protocol=protocol)
    raise ValueError(f"unknown predictor protocol {protocol!r}: expected grpc-v2, v2 or v1")
