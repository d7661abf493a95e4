"""Stock KServe baselines for benchmarks/serving.py: the same model and preprocessing as
`serving/`, served the way a plain KServe model would be, so that only the server and the hop
differ. Benchmark-only code; nothing in `serving/` imports it.

    python benchmarks/stock_kserve.py predictor   --model_dir DIR --model_name NAME --http_port P --grpc_port G
    python benchmarks/stock_kserve.py transformer --model_dir DIR --model_name NAME --http_port P --grpc_port G \\
        --predictor_host 127.0.0.1:PORT --predictor_protocol v1|v2|grpc-v2

* predictor: a minimal `kserve.Model` whose `predict` is the same forward pass
  (`TrainedModel.predict_arrays`) on the same tensors (`numeric` FP32 [n, w], `categorical`
  INT64 [n, c]). KServe's default handling decodes the request: a v1 dict
  (`{"instances": [{"numeric": [...], "categorical": [...]}]}`) or a v2 `InferRequest` (REST
  JSON or gRPC), answered as `{"predictions": [...]}` or an `InferResponse`. No input checks
  beyond numpy's, no middlewares, KServe's defaults for everything else (latency logging on,
  the timing middleware, gRPC interceptor logging).
* transformer: a minimal `kserve.Model` transformer whose preprocess and postprocess are the same
  `serving.transform.FeatureCodec` our transformer uses (so the validation and encoding work is
  identical), and whose predict is KServe's default predictor client (`Model.predict`:
  `InferenceRESTClient` over v1/v2 REST, `InferenceGRPCClient` over grpc-v2), configured through
  KServe's own `--predictor_host` / `--predictor_protocol` arguments. It takes v1 raw records.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from kserve import InferInput, InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.predictor_config import PredictorConfig


class StockPredictor(Model):
    """The forward pass behind KServe's default request handling."""

    def __init__(self, name: str, model_dir: str):
        super().__init__(name)
        self.model_dir, self.model = model_dir, None

    def load(self) -> bool:
        from model.loader import load_model

        self.model = load_model(self.model_dir)
        self.ready = True
        return self.ready

    def predict(self, payload, headers=None):
        if isinstance(payload, InferRequest):
            numeric = payload.get_input_by_name("numeric").as_numpy().astype(np.float32, copy=False)
            categorical = payload.get_input_by_name("categorical").as_numpy().astype(np.int64, copy=False)
            probabilities = self.model.predict_arrays(numeric, categorical).astype(np.float32)
            output = InferOutput("probability", list(probabilities.shape), "FP32")
            output.set_data_from_numpy(probabilities, binary_data=False)
            return InferResponse(payload.id, self.name, [output], from_grpc=payload.from_grpc)
        rows = payload["instances"]
        numeric = np.asarray([r["numeric"] for r in rows], dtype=np.float32)
        categorical = np.asarray([r["categorical"] for r in rows], dtype=np.int64)
        return {"predictions": self.model.predict_arrays(numeric, categorical).tolist()}


class StockTransformer(Model):
    """Our preprocessing and postprocessing around KServe's default predictor client."""

    def __init__(self, name: str, model_dir: str, protocol: str):
        super().__init__(name)
        self.model_dir, self.protocol, self.codec = model_dir, protocol, None

    def load(self) -> bool:
        from serving.transform import FeatureCodec

        self.codec = FeatureCodec.from_model_dir(self.model_dir)
        self.ready = True
        return self.ready

    def preprocess(self, payload, headers=None):
        features = self.codec.from_v1(payload)
        if self.protocol == "v1":
            return {"instances": [{"numeric": n, "categorical": c}
                                  for n, c in zip(features.numeric.tolist(), features.categorical.tolist())]}
        numeric = InferInput("numeric", list(features.numeric.shape), "FP32")
        numeric.set_data_from_numpy(features.numeric, binary_data=False)
        categorical = InferInput("categorical", list(features.categorical.shape), "INT64")
        categorical.set_data_from_numpy(features.categorical, binary_data=False)
        return InferRequest(self.name, [numeric, categorical], request_id=(headers or {}).get("x-request-id"))

    def postprocess(self, result, headers=None, response_headers=None):
        if isinstance(result, InferResponse):
            probabilities = result.get_output_by_name("probability").as_numpy()
        else:
            probabilities = np.asarray(result["predictions"], dtype=np.float64)
        return self.codec.to_v1(probabilities, self.name, None)


def main(argv: list[str] | None = None) -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[model_server.parser])
    cli.add_argument("role", choices=["predictor", "transformer"])
    cli.add_argument("--model_dir", required=True)
    args = cli.parse_args(argv)
    if args.role == "predictor":
        model, config = StockPredictor(args.model_name, args.model_dir), None
    else:
        if not args.predictor_host:
            raise SystemExit("--predictor_host is required for the transformer")
        model = StockTransformer(args.model_name, args.model_dir, args.predictor_protocol)
        config = PredictorConfig(args.predictor_host, args.predictor_protocol, args.predictor_use_ssl,
                                 args.predictor_request_timeout_seconds)
    model.load()
    # Every other ModelServer argument keeps KServe's default (they are read from the command line).
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, predictor_config=config).start([model])


if __name__ == "__main__":
    main()
