"""The real predictor (`serving.predictor`), with the headers of every inference request it gets
appended as a JSON line to the file named by $FLYWHEEL_HEADER_SPY: what the transformer's hop
actually put on the wire, as KServe hands it to the model (REST headers, gRPC metadata).

    FLYWHEEL_HEADER_SPY=/tmp/seen.jsonl python -m tests.serving.header_spy --model_dir ... (predictor args)
"""
from __future__ import annotations

import json
import os

from serving import predictor

SPY_ENV = "FLYWHEEL_HEADER_SPY"
_preprocess = predictor.FlywheelPredictor.preprocess


def _recording_preprocess(self, payload, headers=None):
    with open(os.environ[SPY_ENV], "a", encoding="utf-8") as out:
        out.write(json.dumps({str(k).lower(): str(v) for k, v in (headers or {}).items()}) + "\n")
    return _preprocess(self, payload, headers)


predictor.FlywheelPredictor.preprocess = _recording_preprocess

if __name__ == "__main__":
    predictor.main()
