"""The training table: read once as bytes (the same bytes fingerprint the checkpoint, so a
checkpoint of other data is never resumed from), parsed, and split into training and validation
rows per class, reproducibly from the seed.
"""
from __future__ import annotations

import io

import numpy as np

import storage
from storage.tables import read_table


def read_bytes(uri: str) -> bytes:
    """The file at `uri` (a local path or an object-store URI), whole."""
    with storage.open_uri(uri) as handle:
        return handle.read()


def read_training_frame(data: bytes):
    """The training table from its bytes (read once: they also fingerprint the checkpoint)."""
    return read_table(io.BytesIO(data))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows): `fraction` of each class held out (at least one row each)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == value))
        held[index[: max(1, int(round(len(index) * fraction)))]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)
