"""The binary label mapping: which target value is the positive class, saved with the model.

Targets come as 0/1, booleans, or two strings/categories (`yes`/`no`, `bad`/`good`). Training and
evaluation see codes (1 = positive); reports and serving show the original values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# Pairs whose positive class is obvious, compared case-insensitively as text: (negative, positive).
KNOWN_PAIRS = (("0", "1"), ("false", "true"), ("no", "yes"), ("n", "y"), ("negative", "positive"))


class LabelError(ValueError):
    """The target column cannot be a binary label as configured; the message names the values."""


def _plain(value):
    """A JSON-able Python scalar: numpy types unboxed, integral floats (0.0 from a CSV column with
    a null) as int."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _same(a, b) -> bool:
    """Config says `positive_label: 1` or `"yes"`; the data may hold 1, 1.0, True or "yes"."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or str(a).lower() == str(b).lower()
    return a == b or str(a) == str(b)


@dataclass(frozen=True)
class LabelMapping:
    negative: bool | int | str
    positive: bool | int | str

    @property
    def classes(self) -> list:
        """Class values in code order: index 0 is the negative class, 1 the positive."""
        return [self.negative, self.positive]

    @classmethod
    def infer(cls, values: pd.Series, positive_label=None, column: str = "target") -> LabelMapping:
        """The mapping for a target column; `positive_label` (config's `dataset.positive_label`) is
        required unless the values are 0/1, booleans or a yes/no-like pair."""
        if values.isna().any():
            raise LabelError(f"target column {column!r} has {int(values.isna().sum())} missing values")
        found = sorted({_plain(v) for v in pd.unique(values)}, key=str)
        if len(found) != 2:
            kind = "one class" if len(found) == 1 else f"{len(found)} classes"
            raise LabelError(f"target column {column!r} must hold exactly two classes, found {kind}: "
                             f"{found[:10]}")
        if positive_label is not None:
            matches = [v for v in found if _same(v, positive_label)]
            if not matches:
                raise LabelError(f"dataset.positive_label {positive_label!r} is not a value of target column "
                                 f"{column!r}; values found: {found}")
            positive = matches[0]
            return cls(next(v for v in found if v != positive), positive)
        text = [str(v).lower() for v in found]
        for negative, positive in KNOWN_PAIRS:
            if sorted(text) == sorted((negative, positive)):
                return cls(found[text.index(negative)], found[text.index(positive)])
        raise LabelError(f"cannot tell the positive class of target column {column!r} (values found: {found}); "
                         f"set dataset.positive_label to one of them")

    def encode(self, values: pd.Series, column: str = "target") -> np.ndarray:
        """0/1 codes (int64) for target values; unknown values and nulls are errors that name them."""
        positive = np.array([_same(v, self.positive) for v in values], dtype=bool)
        negative = np.array([_same(v, self.negative) for v in values], dtype=bool)
        unknown = ~(positive | negative)
        if unknown.any():
            seen = sorted({str(v) for v in values[unknown]})[:10]
            raise LabelError(f"target column {column!r} holds {int(unknown.sum())} values that are neither "
                             f"{self.negative!r} nor {self.positive!r}: {seen}")
        return positive.astype(np.int64)

    def decode(self, codes) -> list:
        return [self.positive if int(c) else self.negative for c in np.asarray(codes).reshape(-1)]

    def to_dict(self) -> dict:
        return {"negative": self.negative, "positive": self.positive}

    @classmethod
    def from_dict(cls, data: dict | None) -> LabelMapping:
        """Models saved before labels were mapped were trained on 0/1. Integral floats come back as
        ints: a mapping that travelled through KFP metadata (protobuf Struct) has only doubles."""
        return cls(_plain(data["negative"]), _plain(data["positive"])) if data else cls(0, 1)
