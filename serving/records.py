"""What the two servers that take raw feature records share: the transformer (`serving.transformer`,
the model's forward pass behind a hop) and the one-process server (`serving.single`, the forward
pass in process). Both validate and encode with the same `FeatureCodec`, answer with the same
labels, probabilities and ids, carry the request id the same way, take the same command-line
arguments for the codec and the payload events, and differ only in `load`, `predict` and readiness.
Torch-free.
"""
from __future__ import annotations

import argparse
import re
import uuid
from urllib.parse import quote

from kserve import InferRequest

from serving import server
from serving.payload import PayloadLogger, PayloadMiddleware
from serving.tensors import response, to_tensor
from serving.transform import LABEL, PROBABILITY, FeatureCodec
from specs.evaluation import SHADOW_SUFFIX
from specs.serving import PayloadLogging, ServingSpec

# A header value both hops carry: gRPC metadata takes printable ASCII only (the aio call fails with
# INTERNAL otherwise: grpc/grpc doc/PROTOCOL-HTTP2.md, ASCII-Value), httpx/h11 no edge whitespace.
HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


class Call:
    """One request on its way through preprocess, predict and postprocess; `prediction` is a
    `serving.hop.Prediction` (probabilities and the version that answered)."""

    __slots__ = ("request", "request_id", "features", "prediction")

    def __init__(self, request, request_id, features):
        self.request, self.request_id, self.features, self.prediction = request, request_id, features, None


class RecordsModel(server.ServingModel):
    """Raw records in (v1 rows, v2 one tensor per column), labels and probabilities out; subclasses
    set `codec`, `version` and the metrics' version in `load` and fill `call.prediction` in `predict`.

    Args:
        name: The model name on the endpoints.
        metrics: The server's `ServerMetrics`.
        model_dir: The model directory.
        spec: The serving limits.
        decision_threshold: Probability at or above which the positive label is predicted.
        version: The version to report, when known from outside (registry, command line).
        id_column: The dataset's id column, accepted and echoed (default: the model's metadata.json).
    """

    def __init__(self, name: str, metrics, model_dir: str, spec: ServingSpec, decision_threshold: float = 0.5,
                 version: str | None = None, id_column: str | None = None):
        super().__init__(name, metrics)
        self.model_dir, self.spec = model_dir, spec
        self.decision_threshold, self._version, self.id_column = decision_threshold, version, id_column
        self.codec: FeatureCodec | None = None
        self.version: str | None = None

    def get_input_types(self) -> list[dict]:
        numeric = set(self.codec.preprocessor.numeric)
        return [{"name": c, "datatype": "FP64" if c in numeric else "BYTES", "shape": [-1]} for c in self.codec.columns]

    def get_output_types(self) -> list[dict]:
        return [{"name": LABEL, "datatype": self.codec.label_datatype, "shape": [-1]},
                {"name": PROBABILITY, "datatype": "FP32", "shape": [-1]}]

    def preprocess(self, payload, headers=None) -> Call:
        request_id = self._request_id(payload, headers)
        with self.metrics.stage("preprocess"):
            if isinstance(payload, InferRequest):
                features = self.codec.from_v2([to_tensor(t, k) for k, t in enumerate(payload.inputs)])
            else:
                features = self.codec.from_v1(payload)
        return Call(payload, request_id, features)

    def postprocess(self, call: Call, headers=None, response_headers=None):
        with self.metrics.stage("postprocess"):
            probabilities, version = call.prediction.probabilities, call.prediction.model_version or self.version
            ids = call.features.ids
            if isinstance(call.request, InferRequest):
                return response(call.request, self.name, version, call.request_id,
                                self.codec.to_v2(probabilities, ids))
            return self.codec.to_v1(probabilities, self.name, version, ids)

    @staticmethod
    def _request_id(payload, headers) -> str:
        """The request's id: the header (REST always has one, see RequestIdMiddleware), the v2
        request's own id, or a new one; written back so that a hop forwards it."""
        headers = headers if headers is not None else {}
        request_id = headers.get("x-request-id") or getattr(payload, "id", None) or uuid.uuid4().hex
        # A v2 gRPC `id` is any string; the header forwarded to the predictor carries it
        # percent-encoded when it is not header-safe, the answer's `id` stays the request's own.
        headers["x-request-id"] = request_id if HEADER_SAFE.fullmatch(request_id) else quote(request_id, safe="")
        return request_id


def parser(description: str) -> argparse.ArgumentParser:
    """`server.parser` plus what a records server adds: the decision threshold, the id column and
    the payload events."""
    cli = server.parser(description)
    payload = PayloadLogging()
    cli.add_argument("--decision_threshold", type=float, default=0.5,
                     help="P(positive) at or above which the positive label is predicted (evaluation's)")
    cli.add_argument("--id_column", default=None,
                     help="the dataset's id column (dataset.id_column): accepted in requests, echoed with the "
                          "predictions, not a feature (default: the model's metadata.json id_column)")
    cli.add_argument("--payload_log_url", "--payload_url", dest="payload_log_url", default=payload.url,
                     help="CloudEvents sink (serving.payload_logging.url); unset = no payload events")
    cli.add_argument("--payload_log_mode", default=payload.mode, choices=["all", "request", "response"])
    cli.add_argument("--payload_sample_rate", type=float, default=payload.sample_rate)
    cli.add_argument("--payload_queue_size", type=int, default=1000, help="events held before dropping")
    return cli


def serving_spec(args: argparse.Namespace, **fields) -> ServingSpec:
    """`server.serving_spec` with the payload settings of the command line."""
    return server.serving_spec(args, payload_logging=PayloadLogging(
        url=args.payload_log_url, mode=args.payload_log_mode, sample_rate=args.payload_sample_rate), **fields)


def load(model: RecordsModel) -> None:
    """`model.load()`, an id column that is a feature ending the process in one line."""
    try:
        model.load()
    except ValueError as err:  # an id column that is a feature: a configuration error, not a traceback
        raise SystemExit(f"--id_column: {err}") from None


def payload_middleware(spec: ServingSpec, args: argparse.Namespace, component: str) -> list:
    """The payload logger as `server.start`'s `extra` (none without a url). `component` is the
    events' `ce-component`: the KServe component that takes the client's request."""
    if not spec.payload_logging.url:
        return []
    # A challenger reports a shadow version (monitoring/shadow.py); its events get shadow ids too.
    shadow = str(args.model_version or "").endswith(SHADOW_SUFFIX)
    return [(PayloadMiddleware, {"logger": PayloadLogger(
        spec.payload_logging.url, spec.payload_logging.mode, spec.payload_logging.sample_rate, args.model_name,
        component=component, queue_size=args.payload_queue_size, shadow=shadow)})]
