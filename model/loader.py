"""Save and load a trained model directory (`model.artifact` describes the files); needs torch."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

import storage
from model.artifact import (
    METADATA_FILE,
    MODEL_FILE,
    PREPROCESSOR_FILE,
    label_mapping,
    read_metadata,
    read_preprocessor,
    write_json,
)
from model.labels import LabelMapping
from model.network import TabularNet
from model.preprocessing import Preprocessor


def save_model(model_dir: str, model: TabularNet, architecture: dict, preprocessor: Preprocessor,
               metadata: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "architecture": architecture}, buffer)
    storage.write_atomic(storage.join(model_dir, MODEL_FILE), buffer.getvalue())
    storage.write_atomic(storage.join(model_dir, PREPROCESSOR_FILE), preprocessor.to_json().encode())
    write_json(model_dir, METADATA_FILE, metadata)


@dataclass
class TrainedModel:
    network: TabularNet
    preprocessor: Preprocessor
    metadata: dict

    @property
    def labels(self) -> LabelMapping:
        return label_mapping(self.metadata)

    @torch.inference_mode()
    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """P(positive class) for each row of `frame` (raw feature columns, as in the training data)."""
        numeric, categorical = self.preprocessor.transform(frame)
        return self.predict_arrays(numeric, categorical)

    @torch.inference_mode()
    def predict_arrays(self, numeric: np.ndarray, categorical: np.ndarray) -> np.ndarray:
        """P(positive class) from already preprocessed tensors, one forward pass for the batch."""
        logits = self.network(torch.from_numpy(numeric), torch.from_numpy(categorical))
        return torch.sigmoid(logits).numpy().astype(np.float64)


def load_model(model_dir: str) -> TrainedModel:
    with storage.open_uri(storage.join(model_dir, MODEL_FILE)) as handle:
        saved = torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
    network = TabularNet(**saved["architecture"])
    network.load_state_dict(saved["state_dict"])
    network.eval()
    return TrainedModel(network, read_preprocessor(model_dir), read_metadata(model_dir))
