"""The predictor: a KServe model server answering the preprocessed tensors with one forward pass
per batch (`TrainedModel.predict_arrays`).

    python -m serving.predictor --model_dir URI --model_name NAME [--http_port 8080 --grpc_port 8081]

Inputs `numeric` FP32 [n, w] and `categorical` INT64 [n, c], output `probability` FP32 [n], over
v1 REST (`{"instances": [{"numeric": [...], "categorical": [...]}, ...]}`), v2 REST and v2 gRPC;
KServe's ModelServer speaks the protocols. `--model_dir` is a path (`/mnt/models`, which KServe's
storage initializer fills), a storage URI, or `models:/NAME@champion` (resolved in the registry).
"""
from __future__ import annotations

import os

# The thread count is set at import (and through OMP_NUM_THREADS, which child processes inherit),
# not in load(): a count set in load() does not reach processes KServe spawns. One thread suits a
# small tabular network; more only add contention between concurrent requests.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from kserve import InferRequest  # noqa: E402
from kserve.predictor_config import PredictorConfig  # noqa: E402

from model.loader import TrainedModel, load_model  # noqa: E402
from serving import server  # noqa: E402
from serving.contract import CATEGORICAL, NUMERIC, PROBABILITY, input_types, model_version, output_types  # noqa: E402
from serving.errors import BAD_REQUEST, TOO_LARGE, UNPROCESSABLE, RequestError  # noqa: E402
from serving.server_metrics import ServerMetrics  # noqa: E402
from serving.source import resolve  # noqa: E402
from serving.tensors import response, to_array  # noqa: E402
from serving.transform import Tensor  # noqa: E402
from specs.serving import ServingSpec  # noqa: E402


class Call:
    """One request on its way through preprocess, predict and postprocess."""

    __slots__ = ("request", "request_id", "numeric", "categorical", "probabilities")

    def __init__(self, request, request_id, numeric, categorical):
        self.request, self.request_id = request, request_id
        self.numeric, self.categorical, self.probabilities = numeric, categorical, None


class FlywheelPredictor(server.ServingModel):
    """Serves one model directory.

    Args:
        name: The model name on the endpoints.
        model_dir: A loadable model directory (path or storage URI; `serving.source` resolves
            registry URIs first).
        spec: The serving limits (`max_batch_rows`).
        version: The version to report, when known from outside (registry, command line).
    """

    def __init__(self, name: str, model_dir: str, spec: ServingSpec, version: str | None = None):
        super().__init__(name, ServerMetrics("predictor", name))
        self.model_dir, self.spec, self._version = model_dir, spec, version
        self.model: TrainedModel | None = None
        self.version: str | None = None
        self._limits: np.ndarray | None = None  # codes per categorical column, unknown bucket included

    def load(self) -> bool:
        if self.model is None:  # KServe calls load() again for a request to a model it finds not ready
            self.model = load_model(self.model_dir)
            # Once, not per request: the property builds a list (~1% of a request's CPU, py-spy).
            self._limits = np.asarray(self.model.preprocessor.cardinalities, dtype=np.int64)
            self.version = model_version(self.model_dir, self.model.metadata, self._version)
            self.metrics.model_version = self.version
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        return input_types(self.model.preprocessor)

    def get_output_types(self) -> list[dict]:
        return output_types()

    def preprocess(self, payload, headers=None) -> Call:
        with self.metrics.stage("preprocess"):
            request_id = (headers or {}).get("x-request-id")
            if isinstance(payload, InferRequest):
                numeric, categorical = self._v2_arrays(payload)
                request_id = payload.id or request_id
            else:
                numeric, categorical = self._v1_arrays(payload)
            self._check(numeric, categorical)
            return Call(payload, request_id, numeric, categorical)

    def predict(self, call: Call, headers=None) -> Call:
        with self.metrics.stage("predict"):
            call.probabilities = self.model.predict_arrays(call.numeric, call.categorical).astype(np.float32)
            return call

    def postprocess(self, call: Call, headers=None):
        with self.metrics.stage("postprocess"):
            if isinstance(call.request, InferRequest):
                n = len(call.probabilities)
                return response(call.request, self.name, self.version, call.request_id,
                                [Tensor(PROBABILITY, "FP32", [n], call.probabilities)])
            return {"predictions": call.probabilities.astype(np.float64).tolist(), "model_name": self.name,
                    "model_version": self.version}

    # ---- request checks -------------------------------------------------------------------------

    def _v2_arrays(self, request: InferRequest) -> tuple[np.ndarray, np.ndarray]:
        arrays = {}
        for k, infer_input in enumerate(request.inputs):
            expected = {NUMERIC: "FP32", CATEGORICAL: "INT64"}.get(infer_input.name)
            if expected is None:
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].name", f"unknown input {infer_input.name!r}; "
                                   f"inputs are {NUMERIC!r} and {CATEGORICAL!r}")
            if str(infer_input.datatype).upper() != expected:
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].datatype", f"{infer_input.name!r} is {expected}, "
                                   f"not {infer_input.datatype}")
            arrays[infer_input.name] = (k, to_array(infer_input, k))
        for name in (NUMERIC, CATEGORICAL):
            if name not in arrays:
                raise RequestError(UNPROCESSABLE, "inputs", f"input {name!r} is missing")
        (k_num, numeric), (k_cat, categorical) = arrays[NUMERIC], arrays[CATEGORICAL]
        self._check_shape(numeric, self.model.preprocessor.numeric_width, f"inputs[{k_num}].shape")
        self._check_shape(categorical, len(self.model.preprocessor.categorical), f"inputs[{k_cat}].shape")
        return numeric, categorical

    def _v1_arrays(self, body) -> tuple[np.ndarray, np.ndarray]:
        rows = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise RequestError(BAD_REQUEST, "instances",
                               'expected {"instances": [{"numeric": [...], "categorical": [...]}, ...]}')
        self._check_rows(len(rows), "instances")
        try:
            numeric = np.asarray([r.get(NUMERIC) for r in rows], dtype=np.float32)
            categorical = np.asarray([r.get(CATEGORICAL) for r in rows], dtype=np.int64)
        except (TypeError, ValueError) as err:
            raise RequestError(UNPROCESSABLE, "instances", f"rows must hold equal-length number lists: {err}") from None
        self._check_shape(numeric, self.model.preprocessor.numeric_width, f"instances[].{NUMERIC}")
        self._check_shape(categorical, len(self.model.preprocessor.categorical), f"instances[].{CATEGORICAL}")
        return numeric, categorical

    def _check_rows(self, rows: int, field: str) -> None:
        if rows == 0:
            raise RequestError(UNPROCESSABLE, field, "the batch is empty")
        if rows > self.spec.max_batch_rows:
            raise RequestError(TOO_LARGE, field, f"{rows} rows is more than the {self.spec.max_batch_rows} allowed")

    @staticmethod
    def _check_shape(array: np.ndarray, width: int, field: str) -> None:
        if array.ndim != 2 or array.shape[1] != width:
            raise RequestError(UNPROCESSABLE, field, f"expected shape [n, {width}], got {list(array.shape)}")

    def _check(self, numeric: np.ndarray, categorical: np.ndarray) -> None:
        """Rows within limits and equal; finite numbers; codes inside each vocabulary."""
        rows = numeric.shape[0]
        if categorical.shape[0] != rows:
            raise RequestError(UNPROCESSABLE, CATEGORICAL, f"{categorical.shape[0]} rows, {NUMERIC} has {rows}")
        self._check_rows(rows, NUMERIC)
        if not np.isfinite(numeric).all():
            row = int(np.argwhere(~np.isfinite(numeric))[0][0])
            raise RequestError(UNPROCESSABLE, f"{NUMERIC}[{row}]", "values must be finite numbers")
        limits = self._limits
        bad = (categorical < 0) | (categorical >= limits)
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            raise RequestError(UNPROCESSABLE, f"{CATEGORICAL}[{row}][{column}]",
                               f"code {int(categorical[row, column])} is outside 0..{int(limits[column]) - 1}")


def main(argv: list[str] | None = None) -> None:
    cli = server.parser("Flywheel predictor: preprocessed tensors in, P(positive class) out.")
    args = cli.parse_args(argv)
    spec = server.serving_spec(args)
    source = resolve(args.model_dir, args.tracking_uri)
    model = FlywheelPredictor(args.model_name, source.model_dir, spec, args.model_version or source.version)
    model.load()
    server.start(model, args, spec, model.metrics, predictor_config=PredictorConfig(predictor_host=None))


if __name__ == "__main__":
    main()
