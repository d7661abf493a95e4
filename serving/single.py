"""The one-process server: raw feature records in, labels and probabilities out, the model's forward
pass in the same process (`serving.topology: single`).

    python -m serving.single --model_name NAME --model_dir URI [--http_port 8080 --grpc_port 8081]

One KServe `ModelServer` whose model validates and encodes the records with the transformer's
`FeatureCodec` (preprocess), runs the predictor's forward pass (`TrainedModel.predict_arrays`, the
one `serving.predictor` runs) and answers with the transformer's labels (postprocess): the chain's
API, errors, metrics, payload events and request ids without its hop. On one CPU the chain's two
processes pay two servers' request handling per request (issue 16); this one pays one. Deployed
as the predictor's `kserve-container` with no transformer (deployment/inferenceservice.py).
"""
from __future__ import annotations

import os

# As serving/predictor.py: the thread count is set at import (and through OMP_NUM_THREADS, which
# child processes inherit); one thread suits a small tabular network under concurrent requests.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from kserve.predictor_config import PredictorConfig  # noqa: E402

from model.loader import TrainedModel, load_model  # noqa: E402
from serving import records, server  # noqa: E402
from serving.contract import model_version  # noqa: E402
from serving.hop import Prediction  # noqa: E402
from serving.records import Call  # noqa: E402
from serving.server_metrics import ServerMetrics  # noqa: E402
from serving.source import resolve  # noqa: E402
from serving.transform import FeatureCodec  # noqa: E402
from specs.serving import ServingSpec  # noqa: E402

COMPONENT = "single"  # the metrics' `component` label; payload events say "predictor", the KServe component


class FlywheelServer(records.RecordsModel):
    """Preprocess with the model's saved state, one forward pass per batch, postprocess to labels.

    Args:
        name: The model name on the endpoints.
        model_dir: A loadable model directory (path or storage URI; `serving.source` resolves
            registry URIs first).
        spec: The serving limits.
        decision_threshold: Probability at or above which the positive label is predicted.
        version: The version to report, when known from outside (registry, command line).
        id_column: The dataset's id column, accepted and echoed (default: the model's metadata.json).
    """

    def __init__(self, name: str, model_dir: str, spec: ServingSpec, decision_threshold: float = 0.5,
                 version: str | None = None, id_column: str | None = None):
        super().__init__(name, ServerMetrics(COMPONENT, name), model_dir, spec, decision_threshold, version,
                         id_column)
        self.model: TrainedModel | None = None

    def load(self) -> bool:
        if self.model is None:  # KServe calls load() again for a request to a model it finds not ready
            model = load_model(self.model_dir)
            # The codec from the loaded model's own preprocessor and labels: one read of the directory.
            codec = FeatureCodec(model.preprocessor, model.labels, max_batch_rows=self.spec.max_batch_rows,
                                 decision_threshold=self.decision_threshold,
                                 id_column=self.id_column or model.metadata.get("id_column"))
            codec.metadata = model.metadata
            self.model, self.codec = model, codec
            self.version = model_version(self.model_dir, model.metadata, self._version)
            self.metrics.model_version = self.version
        self.ready = True
        return self.ready

    def predict(self, call: Call, headers=None) -> Call:
        with self.metrics.stage("predict"):
            features = call.features
            probabilities = self.model.predict_arrays(features.numeric, features.categorical).astype(np.float32)
            call.prediction = Prediction(probabilities, self.version)
        return call


def cli():
    return records.parser("Flywheel one-process server: raw features in, labels and probabilities out, "
                          "the model's forward pass in process.")


def main(argv: list[str] | None = None) -> None:
    args = cli().parse_args(argv)
    spec = records.serving_spec(args)
    source = resolve(args.model_dir, args.tracking_uri)
    model = FlywheelServer(args.model_name, source.model_dir, spec, args.decision_threshold,
                           args.model_version or source.version, args.id_column)
    records.load(model)
    server.start(model, args, spec, model.metrics, predictor_config=PredictorConfig(predictor_host=None),
                 extra=records.payload_middleware(spec, args, "predictor"))


if __name__ == "__main__":
    main()
