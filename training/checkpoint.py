"""Checkpoints a restarted worker group resumes from (training/train.py explains why resuming is exact).

Rank 0 writes them atomically (temp file + rename locally, a single PUT on object stores); each
carries a fingerprint of the data and the spec, so a checkpoint another run left in the same model
directory is never resumed from.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging

import torch

import storage

log = logging.getLogger("flywheel.train")  # the entry point's logger: operators and tests watch its lines
CHECKPOINT = "checkpoints/last.pt"  # under the model directory unless the spec names checkpoint_uri
CHECKPOINT_FORMAT = 1


def fingerprint(data: bytes, spec: dict) -> str:
    """What a checkpoint must match to be resumed from: the data's bytes, its schema, hyperparameters."""
    digest = hashlib.sha256(data)
    digest.update(json.dumps({k: spec.get(k) for k in ("dataset", "hyperparameters")}, sort_keys=True).encode())
    return "sha256:" + digest.hexdigest()


def load_checkpoint(uri: str, device: torch.device) -> dict | None:
    if not storage.exists(uri):
        return None
    with storage.open_uri(uri) as handle:
        return torch.load(io.BytesIO(handle.read()), map_location=device, weights_only=True)


def save_checkpoint(uri: str, checkpoint: dict) -> None:
    """Rank 0 only: write atomically, then say so (the log line is what operators and tests watch)."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    storage.write_atomic(uri, buffer.getvalue())
    log.info("checkpoint written after epoch %d (%s)", checkpoint["state"]["epoch"], uri)
