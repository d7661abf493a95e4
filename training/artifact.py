"""The model artifact: a directory holding everything needed to serve the model.

    model.pt            state dict + architecture
    preprocessor.json   the fitted preprocessing state (training.preprocessing)
    metadata.json       framework, features, hyperparameters, metrics, data hash, job

Serving and evaluation load it with `load_model`; nothing re-implements preprocessing.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from training import storage
from training.model import TabularNet
from training.preprocessing import Preprocessor

MODEL_FILE, PREPROCESSOR_FILE, METADATA_FILE = "model.pt", "preprocessor.json", "metadata.json"


def save_model(model_dir: str, model: TabularNet, architecture: dict, preprocessor: Preprocessor,
               metadata: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "architecture": architecture}, buffer)
    storage.write_atomic(storage.join(model_dir, MODEL_FILE), buffer.getvalue())
    storage.write_atomic(storage.join(model_dir, PREPROCESSOR_FILE), preprocessor.to_json().encode())
    storage.write_atomic(storage.join(model_dir, METADATA_FILE), json.dumps(metadata, indent=1).encode())


def read_metadata(model_dir: str) -> dict:
    with storage.open_uri(storage.join(model_dir, METADATA_FILE)) as handle:
        return json.load(handle)


@dataclass
class TrainedModel:
    network: TabularNet
    preprocessor: Preprocessor
    metadata: dict

    @torch.inference_mode()
    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """P(target = 1) for each row of `frame` (raw feature columns, as in the training data)."""
        numeric, categorical = self.preprocessor.transform(frame)
        logits = self.network(torch.from_numpy(numeric), torch.from_numpy(categorical))
        return torch.sigmoid(logits).numpy().astype(np.float64)


def load_model(model_dir: str) -> TrainedModel:
    with storage.open_uri(storage.join(model_dir, MODEL_FILE)) as handle:
        saved = torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
    with storage.open_uri(storage.join(model_dir, PREPROCESSOR_FILE)) as handle:
        preprocessor = Preprocessor.from_json(handle.read().decode())
    network = TabularNet(**saved["architecture"])
    network.load_state_dict(saved["state_dict"])
    network.eval()
    return TrainedModel(network, preprocessor, read_metadata(model_dir))
