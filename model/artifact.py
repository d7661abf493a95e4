"""The model artifact format, torch-free: what a model directory holds and how to read its metadata.

    model.pt            state dict + architecture (read by `model.loader`, which needs torch)
    preprocessor.json   the fitted preprocessing state (`model.preprocessing`)
    metadata.json       framework, features, label mapping, hyperparameters, metrics, lineage,
                        and the reference profile that monitoring compares live traffic with

Serving's transformer, monitoring and the launchers read a model directory through here without
importing torch.
"""
from __future__ import annotations

import json

import storage
from model.labels import LabelMapping
from model.preprocessing import Preprocessor

MODEL_FILE, PREPROCESSOR_FILE, METADATA_FILE = "model.pt", "preprocessor.json", "metadata.json"
FILES = (MODEL_FILE, PREPROCESSOR_FILE, METADATA_FILE)
PROFILE_KEY = "reference_profile"  # filled at training time once monitoring computes one


def read_metadata(model_dir: str) -> dict:
    with storage.open_uri(storage.join(model_dir, METADATA_FILE)) as handle:
        return json.load(handle)


def read_preprocessor(model_dir: str) -> Preprocessor:
    with storage.open_uri(storage.join(model_dir, PREPROCESSOR_FILE)) as handle:
        return Preprocessor.from_json(handle.read().decode())


def write_json(model_dir: str, name: str, data: dict) -> None:
    storage.write_atomic(storage.join(model_dir, name), json.dumps(data, indent=1, default=str).encode())


def feature_columns(metadata: dict) -> list[str]:
    features = metadata.get("features") or {}
    return list(features.get("numeric", [])) + list(features.get("categorical", []))


def label_mapping(metadata: dict) -> LabelMapping:
    return LabelMapping.from_dict(metadata.get("labels"))


def reference_profile(metadata: dict) -> dict | None:
    return metadata.get(PROFILE_KEY)
