"""The transformer: raw feature records in, labels and probabilities out; the predictor in between.

    python -m serving.transformer --model_name NAME --predictor_host HOST:PORT \\
        --predictor_protocol grpc-v2|v2|v1 --model_dir URI [--http_port 8080 --grpc_port 8081]

A KServe transformer (KServe's ModelServer and its arguments, so it deploys as one, collocated as
`transformer-container` or as its own component) whose preprocess and postprocess are
`serving.transform` and whose predict is the cheap hop of `serving.hop`. It never imports torch:
`--model_dir` is read for the preprocessing state and the labels only.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from urllib.parse import quote

from kserve import InferRequest
from kserve.predictor_config import PredictorConfig

from serving import server
from serving.contract import input_types, model_version
from serving.errors import UNAVAILABLE, RequestError
from serving.hop import Hop, forwarded, hop_for
from serving.payload import PayloadLogger, PayloadMiddleware
from serving.readiness import PredictorReadiness
from serving.server_metrics import ServerMetrics
from serving.source import resolve
from serving.tensors import response, to_tensor
from serving.transform import LABEL, PROBABILITY, FeatureCodec
from specs.serving import PayloadLogging, ServingSpec

log = logging.getLogger("flywheel.serving")
# A header value both hops carry: gRPC metadata takes printable ASCII only (the aio call fails with
# INTERNAL otherwise: grpc/grpc doc/PROTOCOL-HTTP2.md, ASCII-Value), httpx/h11 no edge whitespace.
HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


class Call:
    """One request on its way through preprocess, predict and postprocess."""

    __slots__ = ("request", "request_id", "features", "prediction")

    def __init__(self, request, request_id, features):
        self.request, self.request_id, self.features, self.prediction = request, request_id, features, None


class FlywheelTransformer(server.ServingModel):
    """Preprocess with the model's saved state, call the predictor, postprocess to labels.

    Args:
        name: The model name (the predictor serves the same name).
        model_dir: The model directory, for the preprocessing state, labels and version.
        hop: The connection to the predictor.
        spec: The serving limits.
        decision_threshold: Probability at or above which the positive label is predicted.
        version: The version to report until the predictor says which one answered.
        id_column: The dataset's id column, accepted and echoed (default: the model's metadata.json).
    """

    def __init__(self, name: str, model_dir: str, hop: Hop, spec: ServingSpec, decision_threshold: float = 0.5,
                 version: str | None = None, id_column: str | None = None):
        super().__init__(name, ServerMetrics("transformer", name))
        self.model_dir, self.hop, self.spec = model_dir, hop, spec
        self.decision_threshold, self._version, self.id_column = decision_threshold, version, id_column
        self.codec: FeatureCodec | None = None
        self.readiness: PredictorReadiness | None = None
        self.version: str | None = None

    def load(self) -> bool:
        if self.codec is None:  # KServe calls load() again for a request to a model it finds not ready
            self.codec = FeatureCodec.from_model_dir(self.model_dir, max_batch_rows=self.spec.max_batch_rows,
                                                     decision_threshold=self.decision_threshold,
                                                     id_column=self.id_column)
            self.version = model_version(self.model_dir, self.codec.metadata, self._version)
            self.metrics.model_version = self.version
            self.readiness = PredictorReadiness(self.hop, input_types(self.codec.preprocessor))
        self.ready = True
        return self.ready

    async def healthy(self) -> bool:
        return self.ready and await self.readiness.check()

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

    async def predict(self, call: Call, headers=None) -> Call:
        started = time.perf_counter()
        try:
            call.prediction = await self.hop.infer(call.features, call.request_id, forwarded(headers))
        except RequestError as error:
            if error.status == UNAVAILABLE:
                self.readiness.lost()
            raise
        self.metrics.hop(self.hop.protocol, time.perf_counter() - started)
        self._answered_by(call.prediction.model_version)
        return call

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
        request's own id, or a new one; written back so that predict forwards it."""
        headers = headers if headers is not None else {}
        request_id = headers.get("x-request-id") or getattr(payload, "id", None) or uuid.uuid4().hex
        # A v2 gRPC `id` is any string; the header forwarded to the predictor carries it
        # percent-encoded when it is not header-safe, the answer's `id` stays the request's own.
        headers["x-request-id"] = request_id if HEADER_SAFE.fullmatch(request_id) else quote(request_id, safe="")
        return request_id

    def _answered_by(self, version: str | None) -> None:
        if version and version != self.metrics.model_version:
            log.warning("the predictor serves version %s, this transformer's model_dir is %s", version, self.version)
            self.metrics.model_version = version


def cli():
    parser = server.parser("Flywheel transformer: raw features in, labels and probabilities out.")
    payload = PayloadLogging()
    parser.add_argument("--decision_threshold", type=float, default=0.5,
                        help="P(positive) at or above which the positive label is predicted (evaluation's)")
    parser.add_argument("--id_column", default=None,
                        help="the dataset's id column (dataset.id_column): accepted in requests, echoed with the "
                             "predictions, not a feature (default: the model's metadata.json id_column)")
    parser.add_argument("--payload_log_url", "--payload_url", dest="payload_log_url", default=payload.url,
                        help="CloudEvents sink (serving.payload_logging.url); unset = no payload events")
    parser.add_argument("--payload_log_mode", default=payload.mode, choices=["all", "request", "response"])
    parser.add_argument("--payload_sample_rate", type=float, default=payload.sample_rate)
    parser.add_argument("--payload_queue_size", type=int, default=1000, help="events held before dropping")
    parser.set_defaults(predictor_protocol=ServingSpec().hop_protocol)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = cli().parse_args(argv)
    if not args.predictor_host:
        raise SystemExit("--predictor_host is required")
    spec = server.serving_spec(args, hop_protocol=args.predictor_protocol, payload_logging=PayloadLogging(
        url=args.payload_log_url, mode=args.payload_log_mode, sample_rate=args.payload_sample_rate))
    source = resolve(args.model_dir, args.tracking_uri)
    hop = hop_for(args.predictor_protocol, args.predictor_host, args.model_name,
                  args.predictor_request_timeout_seconds, args.predictor_use_ssl)
    model = FlywheelTransformer(args.model_name, source.model_dir, hop, spec, args.decision_threshold,
                                args.model_version or source.version, args.id_column)
    try:
        model.load()
    except ValueError as err:  # an id column that is a feature: a configuration error, not a traceback
        raise SystemExit(f"--id_column: {err}") from None
    extra = []
    if spec.payload_logging.url:
        extra.append((PayloadMiddleware, {"logger": PayloadLogger(
            spec.payload_logging.url, spec.payload_logging.mode, spec.payload_logging.sample_rate, args.model_name,
            queue_size=args.payload_queue_size)}))
    config = PredictorConfig(args.predictor_host, args.predictor_protocol, args.predictor_use_ssl,
                             args.predictor_request_timeout_seconds)
    server.start(model, args, spec, model.metrics, predictor_config=config, extra=extra)


if __name__ == "__main__":
    main()
