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
import time

from kserve.predictor_config import PredictorConfig

from serving import records, server
from serving.contract import input_types, model_version
from serving.errors import UNAVAILABLE, RequestError
from serving.hop import Hop, forwarded, hop_for
from serving.readiness import PredictorReadiness
from serving.records import Call
from serving.server_metrics import ServerMetrics
from serving.source import resolve
from serving.transform import FeatureCodec
from specs.serving import ServingSpec

log = logging.getLogger("flywheel.serving")


class FlywheelTransformer(records.RecordsModel):
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
        super().__init__(name, ServerMetrics("transformer", name), model_dir, spec, decision_threshold, version,
                         id_column)
        self.hop = hop
        self.readiness: PredictorReadiness | None = None

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

    def _answered_by(self, version: str | None) -> None:
        if version and version != self.metrics.model_version:
            log.warning("the predictor serves version %s, this transformer's model_dir is %s", version, self.version)
            self.metrics.model_version = version


def cli():
    parser = records.parser("Flywheel transformer: raw features in, labels and probabilities out.")
    parser.set_defaults(predictor_protocol=ServingSpec().hop_protocol)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = cli().parse_args(argv)
    if not args.predictor_host:
        raise SystemExit("--predictor_host is required")
    spec = records.serving_spec(args, hop_protocol=args.predictor_protocol)
    source = resolve(args.model_dir, args.tracking_uri)
    hop = hop_for(args.predictor_protocol, args.predictor_host, args.model_name,
                  args.predictor_request_timeout_seconds, args.predictor_use_ssl)
    model = FlywheelTransformer(args.model_name, source.model_dir, hop, spec, args.decision_threshold,
                                args.model_version or source.version, args.id_column)
    records.load(model)
    config = PredictorConfig(args.predictor_host, args.predictor_protocol, args.predictor_use_ssl,
                             args.predictor_request_timeout_seconds)
    server.start(model, args, spec, model.metrics, predictor_config=config,
                 extra=records.payload_middleware(spec, args, "transformer"))


if __name__ == "__main__":
    main()
