"""The fitted preprocessing state, saved with the model and applied by training and serving alike.

One implementation: feature order, category vocabularies with an unknown bucket (index 0, also
used for missing), numeric medians for missing values plus a missing-indicator, and scaling.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import pandas as pd

UNKNOWN = 0


def category_key(value) -> str:
    """The vocabulary key of one category value, the same in fit and transform. Integral floats
    drop their ".0": int codes become float as soon as a batch holds a null (pandas has no NaN
    for int64), and 1 and 1.0 must be the same category. Everything else is str(value)."""
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


@dataclass
class Preprocessor:
    numeric: list[str]
    categorical: list[str]
    medians: dict[str, float]
    means: dict[str, float]
    stds: dict[str, float]
    vocabularies: dict[str, list[str]]
    # Columns that had missing values in the training data (the model learnt their imputation);
    # None for artifacts saved before this was recorded. Serving accepts nulls only in these.
    nullable: list[str] | None = None

    @classmethod
    def fit(cls, frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> Preprocessor:
        missing = [c for c in numeric + categorical if c not in frame.columns]
        if missing:
            raise ValueError(f"columns missing from the training data: {missing}")
        medians, means, stds = {}, {}, {}
        for column in numeric:
            values = pd.to_numeric(frame[column], errors="raise").astype("float64")
            median = float(values.median()) if values.notna().any() else 0.0
            filled = values.fillna(median)
            medians[column], means[column] = median, float(filled.mean())
            stds[column] = float(filled.std(ddof=0)) or 1.0
        vocabularies = {
            column: sorted({category_key(v) for v in frame[column].dropna().unique()}) for column in categorical
        }
        nullable = [column for column in numeric + categorical if frame[column].isna().any()]
        return cls(numeric, categorical, medians, means, stds, vocabularies, nullable)

    @property
    def numeric_width(self) -> int:
        return 2 * len(self.numeric)  # scaled value + missing indicator

    @property
    def cardinalities(self) -> list[int]:
        return [len(self.vocabularies[c]) + 1 for c in self.categorical]  # + unknown bucket

    def transform(self, frame: pd.DataFrame | Mapping[str, Sequence]) -> tuple[np.ndarray, np.ndarray]:
        """Return (numeric float32 [n, 2*len(numeric)], categorical int64 [n, len(categorical)]).

        `frame` is a DataFrame or a mapping of column name to equal-length values (serving's
        validated request columns: a one-row DataFrame costs more than the whole transform).
        """
        columns = frame.columns if isinstance(frame, pd.DataFrame) else frame
        missing = [c for c in self.numeric + self.categorical if c not in columns]
        if missing:
            raise ValueError(f"input is missing feature columns: {missing}")
        n = len(frame) if isinstance(frame, pd.DataFrame) else len(frame[(self.numeric + self.categorical)[0]])
        raw = np.empty((n, len(self.numeric)), dtype=np.float64)
        for i, column in enumerate(self.numeric):
            try:
                values = frame[column]
                raw[:, i] = (pd.to_numeric(values, errors="raise").to_numpy(dtype="float64", na_value=np.nan)
                             if isinstance(values, pd.Series) else np.asarray(values, dtype="float64"))
            except (TypeError, ValueError) as err:
                raise ValueError(f"column {column!r} must be numeric: {err}") from None
        # All numeric columns at once: the same float64 operations per value as column by column
        # (impute the median, then (value - mean) / std), in a handful of numpy calls instead of
        # six per column, which dominated a one-row request in the one-process server (issue 16).
        medians, means, stds, indexes = self._constants
        is_missing = ~np.isfinite(raw)
        numeric = np.empty((n, self.numeric_width), dtype=np.float32)
        numeric[:, 0::2] = (np.where(is_missing, medians, raw) - means) / stds
        numeric[:, 1::2] = is_missing
        categorical = np.empty((n, len(self.categorical)), dtype=np.int64)
        for j, column in enumerate(self.categorical):
            index = indexes[j]
            categorical[:, j] = [index.get(category_key(v), UNKNOWN) if pd.notna(v) else UNKNOWN for v in frame[column]]
        return numeric, categorical

    @cached_property
    def _constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, int]]]:
        """(medians, means, stds) in `numeric`'s order, and each categorical column's code per
        vocabulary key (0 is the unknown bucket): built once, not per call (the fields never change
        after fit or from_json)."""
        medians, means, stds = (np.asarray([table[c] for c in self.numeric], dtype=np.float64)
                                for table in (self.medians, self.means, self.stds))
        indexes = [{value: k + 1 for k, value in enumerate(self.vocabularies[c])} for c in self.categorical]
        return medians, means, stds, indexes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessor:
        return cls(**json.loads(text))
