"""The tensor contract between the transformer and the predictor, and the model version.

The predictor declares it in its v2 model metadata; the transformer emits exactly it and checks the
predictor's declaration before it calls itself ready. Torch-free.
"""
from __future__ import annotations

import hashlib

import storage
from model.artifact import MODEL_FILE
from model.preprocessing import Preprocessor

NUMERIC, CATEGORICAL, PROBABILITY = "numeric", "categorical", "probability"
NUMERIC_DATATYPE, CATEGORICAL_DATATYPE, PROBABILITY_DATATYPE = "FP32", "INT64", "FP32"
VERSION_KEY = "model_version"  # a version recorded in metadata.json wins over the content hash


def input_types(preprocessor: Preprocessor) -> list[dict]:
    """The predictor's inputs: `numeric` FP32 [n, w] and `categorical` INT64 [n, c] (-1 = any rows)."""
    return [
        {"name": NUMERIC, "datatype": NUMERIC_DATATYPE, "shape": [-1, preprocessor.numeric_width]},
        {"name": CATEGORICAL, "datatype": CATEGORICAL_DATATYPE, "shape": [-1, len(preprocessor.categorical)]},
    ]


def output_types() -> list[dict]:
    """The predictor's output: `probability` FP32 [n], P(positive class) per row."""
    return [{"name": PROBABILITY, "datatype": PROBABILITY_DATATYPE, "shape": [-1]}]


def model_version(model_dir: str, metadata: dict, override: str | None = None) -> str:
    """The version a server reports: `override` (the CLI's or the registry's), else the one
    recorded in the metadata, else a content hash of the weights, so that two different models
    never report the same version.

    Args:
        model_dir: The model directory (local path or storage URI).
        metadata: Its metadata.json.
        override: A version known from outside (MLflow registry version, `--model_version`).
    """
    if override:
        return str(override)
    if metadata.get(VERSION_KEY):
        return str(metadata[VERSION_KEY])
    digest = hashlib.sha256()
    with storage.open_uri(storage.join(model_dir, MODEL_FILE)) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256-{digest.hexdigest()[:12]}"
