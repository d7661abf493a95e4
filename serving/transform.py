"""Raw feature records to the model's tensors and the model's scores back to labels.

Pure Python (no kserve, no torch): the transformer process calls it, tests call it directly. The
tensors come from the preprocessing state saved at training time through
`model.preprocessing.Preprocessor.transform`, the one implementation training uses too; the labels
from the model's `model.labels.LabelMapping`.

Requests (every violation is a `serving.errors.RequestError` naming the field):

* v1: `{"instances": [{column: value, ...}, ...]}`, one object per row.
* v2: one tensor per column, `{"name": column, "datatype": ..., "shape": [n], "data": [...]}`
  (shape `[n, 1]` is accepted too). Numeric columns take FP*/INT*/UINT* tensors, categorical
  columns BYTES or INT*/UINT*.

Rules:

* Columns: exactly the model's feature columns; a missing or an unknown one is a 422.
* Numeric values: JSON numbers (int or float, not bool). NaN and infinities, as literals or as
  strings ("NaN", "inf"), and any string are a 422: a number sent as text is a client bug to
  surface, not to guess around.
* Categorical values: a string or an integer code (int-coded categories are common in tables
  read from CSV; `Preprocessor` keys 1 and 1.0 alike). Floats, bools, lists are a 422. A value
  never seen in training is not an error: it goes to the unknown bucket, as in training.
* Nulls (JSON null): allowed only in columns the training data had missing values in
  (`Preprocessor.nullable`), where the model imputes them as it learnt to (median plus a
  missing-indicator, or the unknown bucket); anywhere else a 422, because the model never saw a
  missing value there. Artifacts saved before `nullable` was recorded accept nulls everywhere.
* Batches: 1 to `max_batch_rows` rows. Empty is a 422, more is a 413.
* Structure (not an object, `instances` not a list, a row not an object, a tensor whose data does
  not fill its shape) is a 400.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from model.artifact import label_mapping, read_metadata, read_preprocessor
from model.labels import LabelMapping
from model.preprocessing import Preprocessor
from serving.errors import BAD_REQUEST, TOO_LARGE, UNPROCESSABLE, RequestError

NUMERIC_TYPES = frozenset({"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
                           "UINT64"})
CATEGORICAL_TYPES = frozenset({"BYTES", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
LABEL, PROBABILITY = "label", "probability"


@dataclass
class Tensor:
    """A v2 tensor as plain data: what the transformer hands over from KServe's `InferInput`, and
    what postprocess hands back. `data` is flat (row-major), a list or a numpy array."""

    name: str
    datatype: str
    shape: list[int]
    data: list | np.ndarray = field(default_factory=list)


@dataclass(frozen=True)
class Features:
    """The model's input tensors for one batch: numeric FP32 [n, w] and categorical INT64 [n, c]."""

    numeric: np.ndarray
    categorical: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.numeric.shape[0])


def _describe(value) -> str:
    """How a wrong value reads in a message: the type, and the value when it is short."""
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    return f"{type(value).__name__} {value!r}"[:60]


def _null_problem(nullable: bool) -> str | None:
    return None if nullable else "is null, but the training data had no missing values in this column"


def number_problem(values: Sequence, nullable: bool) -> tuple[int, str] | None:
    """The first value of a numeric column that breaks the rules, as (index, message)."""
    for i, value in enumerate(values):
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                return i, f"must be a finite number, not {value!r}"
        elif kind is int:
            continue
        elif value is None:
            problem = _null_problem(nullable)
            if problem:
                return i, problem
        else:
            return i, f"must be a number, not {_describe(value)}"
    return None


def category_problem(values: Sequence, nullable: bool) -> tuple[int, str] | None:
    """The first value of a categorical column that breaks the rules, as (index, message)."""
    for i, value in enumerate(values):
        kind = type(value)
        if kind is str or kind is int:
            continue
        if value is None:
            problem = _null_problem(nullable)
            if problem:
                return i, problem
        else:
            return i, f"must be a category (a string or an integer code), not {_describe(value)}"
    return None


def _flat(data) -> list:
    """Tensor data as a flat Python list; bytes (gRPC BYTES contents) as text."""
    values = data.reshape(-1).tolist() if isinstance(data, np.ndarray) else data
    if any(isinstance(v, bytes) for v in values):
        values = [v.decode("utf-8", errors="strict") if isinstance(v, bytes) else v for v in values]
    return values


class FeatureCodec:
    """Validates requests against the model's features and turns them into `Features`; turns the
    model's probabilities into the response.

    Args:
        preprocessor: The preprocessing state saved with the model.
        labels: The model's label mapping (which target value is the positive class).
        max_batch_rows: Rows per request; more is a 413.
        decision_threshold: Probability at or above which a row is labelled the positive class.
    """

    def __init__(self, preprocessor: Preprocessor, labels: LabelMapping, max_batch_rows: int = 1000,
                 decision_threshold: float = 0.5):
        self.preprocessor, self.labels = preprocessor, labels
        self.max_batch_rows, self.decision_threshold = int(max_batch_rows), float(decision_threshold)
        self.columns = list(preprocessor.numeric) + list(preprocessor.categorical)
        self._numeric = frozenset(preprocessor.numeric)
        self._column_set = frozenset(self.columns)
        self._nullable = frozenset(self.columns if preprocessor.nullable is None else preprocessor.nullable)
        self.metadata: dict = {}

    @classmethod
    def from_model_dir(cls, model_dir: str, **options) -> FeatureCodec:
        """The codec for a model directory (local path or storage URI), read without torch."""
        metadata = read_metadata(model_dir)
        codec = cls(read_preprocessor(model_dir), label_mapping(metadata), **options)
        codec.metadata = metadata
        return codec

    # ---- requests -------------------------------------------------------------------------------

    def from_v1(self, body) -> Features:
        """Validate a v1 body `{"instances": [{column: value}, ...]}` and encode it."""
        rows = self._v1_rows(body)
        columns: dict[str, list] = {column: [] for column in self.columns}
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise RequestError(BAD_REQUEST, f"instances[{i}]", "each instance must be an object of column: value")
            if row.keys() != self._column_set:
                self._columns_error(row.keys(), lambda c, i=i: f"instances[{i}].{c}")
            for column, values in columns.items():
                values.append(row[column])
        self._check_values(columns, lambda column, i: f"instances[{i}].{column}")
        return self.encode(columns)

    def from_v2(self, tensors: Sequence[Tensor]) -> Features:
        """Validate v2 per-column tensors and encode them."""
        by_name = self._v2_names(tensors)
        rows = None
        for k, tensor in enumerate(tensors):
            n = self._v2_rows(k, tensor)
            if rows is not None and n != rows:
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].shape",
                                   f"column {tensor.name!r} has {n} rows, {tensors[0].name!r} has {rows}")
            rows = n
        self._check_rows(rows, "inputs[0].shape")
        columns = {}
        for column in self.columns:
            k = by_name[column]
            try:
                columns[column] = _flat(tensors[k].data)
            except UnicodeDecodeError:
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].data", "BYTES values must be UTF-8 text") from None
        self._check_values(columns, lambda column, i: f"inputs[{by_name[column]}].data[{i}]")
        return self.encode(columns)

    def encode(self, columns: Mapping[str, Sequence]) -> Features:
        """Validated columns to the model's tensors, through the training-time `Preprocessor`."""
        try:
            numeric, categorical = self.preprocessor.transform(columns)
        except ValueError as err:  # validation above should make this unreachable; never a 500
            raise RequestError(UNPROCESSABLE, None, str(err)) from None
        return Features(numeric, categorical)

    def _v1_rows(self, body) -> list:
        if not isinstance(body, dict):
            raise RequestError(BAD_REQUEST, None, 'the body must be a JSON object {"instances": [...]}')
        rows = body.get("instances")
        if not isinstance(rows, list):
            problem = "is missing" if rows is None else "must be a list of row objects"
            raise RequestError(BAD_REQUEST, "instances", f"'instances' {problem}")
        self._check_rows(len(rows), "instances")
        return rows

    def _check_rows(self, rows: int | None, where: str) -> None:
        if not rows:
            raise RequestError(UNPROCESSABLE, where, "the batch is empty: send at least one row")
        if rows > self.max_batch_rows:
            raise RequestError(TOO_LARGE, where,
                               f"{rows} rows is more than the {self.max_batch_rows} allowed per request")

    def _columns_error(self, names, where) -> None:
        """Raise for the first missing, then the first unknown column."""
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise RequestError(UNPROCESSABLE, where(missing[0]), f"column {missing[0]!r} is missing"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unknown = sorted(str(c) for c in names if c not in self._column_set)
        raise RequestError(UNPROCESSABLE, where(unknown[0]), f"unknown column {unknown[0]!r}; the model's columns "
                           f"are {self.columns}")

    def _check_values(self, columns: Mapping[str, list], where) -> None:
        for column, values in columns.items():
            check = number_problem if column in self._numeric else category_problem
            problem = check(values, column in self._nullable)
            if problem:
                i, message = problem
                raise RequestError(UNPROCESSABLE, where(column, i), f"{column}: {message}")

    def _v2_names(self, tensors: Sequence[Tensor]) -> dict[str, int]:
        by_name: dict[str, int] = {}
        for k, tensor in enumerate(tensors):
            if tensor.name not in self._column_set:
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].name", f"unknown column {tensor.name!r}; the model's "
                                   f"columns are {self.columns}")
            if tensor.name in by_name:
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].name", f"column {tensor.name!r} is sent twice")
            allowed = NUMERIC_TYPES if tensor.name in self._numeric else CATEGORICAL_TYPES
            if str(tensor.datatype).upper() not in allowed:
                kind = "numeric" if tensor.name in self._numeric else "categorical"
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].datatype", f"{tensor.datatype!r} is not a datatype "
                                   f"for {kind} column {tensor.name!r}; use one of {sorted(allowed)}")
            by_name[tensor.name] = k
        if len(by_name) < len(self.columns):
            self._columns_error(by_name.keys(), lambda c: "inputs")
        return by_name

    @staticmethod
    def _v2_rows(k: int, tensor: Tensor) -> int:
        """The rows of one column tensor, after checking that its data fills its shape."""
        shape = tensor.shape
        if not (isinstance(shape, (list, tuple)) and shape and all(type(d) is int and d >= 0 for d in shape)):
            raise RequestError(BAD_REQUEST, f"inputs[{k}].shape", f"shape must be a list of sizes, got {shape!r}")
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise RequestError(UNPROCESSABLE, f"inputs[{k}].shape",
                               f"a column tensor has shape [n] (or [n, 1]), got {list(shape)}")
        size = tensor.data.size if isinstance(tensor.data, np.ndarray) else len(tensor.data)
        if size != shape[0]:
            raise RequestError(BAD_REQUEST, f"inputs[{k}].data",
                               f"{size} values do not fill shape {list(shape)} ({shape[0]} values)")
        return shape[0]

    # ---- responses ------------------------------------------------------------------------------

    def predictions(self, probabilities: np.ndarray) -> list:
        """Original label values: the positive class where the probability reaches the threshold."""
        return self.labels.decode(np.asarray(probabilities) >= self.decision_threshold)

    def to_v1(self, probabilities: np.ndarray, model_name: str, model_version: str | None) -> dict:
        """The v1 response: labels, positive-class probabilities and the model that answered."""
        return {"predictions": self.predictions(probabilities),
                "probabilities": np.asarray(probabilities, dtype=np.float64).tolist(),
                "model_name": model_name, "model_version": model_version}

    def to_v2(self, probabilities: np.ndarray) -> list[Tensor]:
        """The v2 output tensors: `label` (original values) and `probability` (FP32) per row."""
        n = int(np.asarray(probabilities).shape[0])
        return [Tensor(LABEL, self.label_datatype, [n], self.predictions(probabilities)),
                Tensor(PROBABILITY, "FP32", [n], np.asarray(probabilities, dtype=np.float32))]

    @property
    def label_datatype(self) -> str:
        positive = self.labels.positive
        if isinstance(positive, bool):
            return "BOOL"
        return "INT64" if isinstance(positive, int) else "BYTES"
