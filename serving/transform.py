"""Raw feature records to the model's tensors and the model's scores back to labels.

Pure Python (no kserve, no torch): the transformer process calls it, tests call it directly. The
tensors come from the preprocessing state saved at training time through
`model.preprocessing.Preprocessor.transform`, the one implementation training uses too; the labels
from the model's `model.labels.LabelMapping`.

Requests (every violation is a `serving.errors.RequestError` naming the field):

* v1: `{"instances": [{column: value, ...}, ...]}`, one object per row.
* v2: one tensor per column, `{"name": column, "datatype": ..., "shape": [n], "data": [...]}`
  (shape `[n, 1]` is accepted too). Numeric columns take FP*/INT*/UINT* tensors, categorical
  columns BYTES (INT*/UINT* too where training's categories were integer codes).

Rules:

* Columns: exactly the model's feature columns; a missing or an unknown one is a 422. The
  dataset's id column (`dataset.id_column`, e.g. `customer_id`) may come along: it is not a
  feature, it is echoed with the predictions (v1: a list named after it beside `predictions`;
  v2: an output tensor named after it), so clients need not strip their join key and the logged
  payload carries it. Its values are strings or integers, in every row or in none.
* Numeric values: JSON numbers (int or float, not bool). NaN and infinities, as literals or as
  strings ("NaN", "inf"), and any string are a 422: a number sent as text is a client bug to
  surface, not to guess around.
* Categorical values: a string. An integer is accepted only in a column whose training
  categories were integer codes (every vocabulary key an integer's text: int-coded tables read
  from CSV), where `Preprocessor` keys 3 and "3" alike; in a column of text categories a number
  is a 422 naming the field, not a silent unknown category (`"housing": 3` would otherwise score
  as an unseen housing). Floats, bools, lists are a 422 everywhere. A string never seen in
  training is not an error: it goes to the unknown bucket, as in training.
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
import re
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
V1_KEYS = frozenset({"predictions", "probabilities", "model_name", "model_version"})  # the v1 response's own keys
INTEGER_CODE = re.compile(r"-?[0-9]+")


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
    """The model's input tensors for one batch: numeric FP32 [n, w] and categorical INT64 [n, c],
    and the rows' ids when the request carried the id column (echoed, never a feature)."""

    numeric: np.ndarray
    categorical: np.ndarray
    ids: list | None = None

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


def category_problem(values: Sequence, nullable: bool, int_coded: bool = False) -> tuple[int, str] | None:
    """The first value of a categorical column that breaks the rules, as (index, message).
    Integers pass only where `int_coded` (training's categories were integer codes)."""
    for i, value in enumerate(values):
        kind = type(value)
        if kind is str or (kind is int and int_coded):
            continue
        if value is None:
            problem = _null_problem(nullable)
            if problem:
                return i, problem
        elif kind is int:
            return i, f"must be a category as a string (\"{value}\"), not the number {value}: its categories are text"
        else:
            kinds = "a string or an integer code" if int_coded else "a string"
            return i, f"must be a category ({kinds}), not {_describe(value)}"
    return None


def id_problem(values: Sequence) -> tuple[int, str] | None:
    """The first id that is not a string or an integer, as (index, message)."""
    for i, value in enumerate(values):
        if type(value) is not str and not (type(value) is int and -(1 << 63) <= value < 1 << 63):
            return i, f"must be an id (a string or a 64-bit integer), not {_describe(value)}"
    return None


def integer_coded(vocabulary: Sequence[str]) -> bool:
    """Whether training's categories of a column were integer codes (keys "1", "2", ...)."""
    return bool(vocabulary) and all(INTEGER_CODE.fullmatch(key) for key in vocabulary)


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
        id_column: The dataset's id column (`dataset.id_column`): accepted, echoed, not a feature.

    Raises:
        ValueError: When `id_column` is a feature or one of the response's own names.
    """

    def __init__(self, preprocessor: Preprocessor, labels: LabelMapping, max_batch_rows: int = 1000,
                 decision_threshold: float = 0.5, id_column: str | None = None):
        self.preprocessor, self.labels = preprocessor, labels
        self.max_batch_rows, self.decision_threshold = int(max_batch_rows), float(decision_threshold)
        self.columns = list(preprocessor.numeric) + list(preprocessor.categorical)
        self._numeric = frozenset(preprocessor.numeric)
        self._column_set = frozenset(self.columns)
        self._nullable = frozenset(self.columns if preprocessor.nullable is None else preprocessor.nullable)
        self._int_coded = frozenset(c for c in preprocessor.categorical if integer_coded(preprocessor.vocabularies[c]))
        if id_column and (id_column in self._column_set or id_column in V1_KEYS | {LABEL, PROBABILITY}):
            raise ValueError(f"id column {id_column!r} is a feature or a name the response uses "
                             f"({sorted(V1_KEYS | {LABEL, PROBABILITY})})")
        self.id_column = id_column or None
        self.metadata: dict = {}

    @classmethod
    def from_model_dir(cls, model_dir: str, id_column: str | None = None, **options) -> FeatureCodec:
        """The codec for a model directory (local path or storage URI), read without torch. The id
        column is `id_column`, else the one the model's metadata.json records (`id_column`)."""
        metadata = read_metadata(model_dir)
        codec = cls(read_preprocessor(model_dir), label_mapping(metadata),
                    id_column=id_column or metadata.get("id_column"), **options)
        codec.metadata = metadata
        return codec

    # ---- requests -------------------------------------------------------------------------------

    def from_v1(self, body) -> Features:
        """Validate a v1 body `{"instances": [{column: value}, ...]}` and encode it."""
        rows = self._v1_rows(body)
        columns: dict[str, list] = {column: [] for column in self.columns}
        key = self.id_column
        ids = [] if key is not None and isinstance(rows[0], dict) and key in rows[0] else None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise RequestError(BAD_REQUEST, f"instances[{i}]", "each instance must be an object of column: value")
            names = row.keys()
            if ids is not None and key in row:
                ids.append(row[key])
                names = names - {key}
            elif ids is not None or (key is not None and key in row):
                raise RequestError(UNPROCESSABLE, f"instances[{i}].{key}", f"the id column {key!r} must be in "
                                   "every row or in none")
            if names != self._column_set:
                self._columns_error(names, lambda c, i=i: f"instances[{i}].{c}")
            for column, values in columns.items():
                values.append(row[column])
        self._check_values(columns, lambda column, i: f"instances[{i}].{column}")
        self._check_ids(ids, lambda i: f"instances[{i}].{key}")
        return self.encode(columns, ids)

    def from_v2(self, tensors: Sequence[Tensor]) -> Features:
        """Validate v2 per-column tensors and encode them."""
        by_name = self._v2_names(tensors)
        ids, rows = None, None
        for k, tensor in enumerate(tensors):
            n = self._v2_rows(k, tensor)
            if rows is not None and n != rows:
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].shape",
                                   f"column {tensor.name!r} has {n} rows, {tensors[0].name!r} has {rows}")
            rows = n
        self._check_rows(rows, "inputs[0].shape")
        columns = {}
        for column in [*self.columns, self.id_column] if self.id_column in by_name else self.columns:
            k = by_name[column]
            try:
                columns[column] = _flat(tensors[k].data)
            except UnicodeDecodeError:
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].data", "BYTES values must be UTF-8 text") from None
        if self.id_column in by_name:
            ids = columns.pop(self.id_column)
            self._check_ids(ids, lambda i: f"inputs[{by_name[self.id_column]}].data[{i}]")
        self._check_values(columns, lambda column, i: f"inputs[{by_name[column]}].data[{i}]")
        return self.encode(columns, ids)

    def encode(self, columns: Mapping[str, Sequence], ids: list | None = None) -> Features:
        """Validated columns to the model's tensors, through the training-time `Preprocessor`."""
        try:
            numeric, categorical = self.preprocessor.transform(columns)
        except ValueError as err:  # validation above should make this unreachable; never a 500
            raise RequestError(UNPROCESSABLE, None, str(err)) from None
        return Features(numeric, categorical, ids)

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
        raise RequestError(UNPROCESSABLE, where(unknown[0]), f"unknown column {unknown[0]!r}; {self._accepted()}")

    def _accepted(self) -> str:
        also = f", and the id column {self.id_column!r}" if self.id_column else ""
        return f"the model's columns are {self.columns}{also}"

    def _check_values(self, columns: Mapping[str, list], where) -> None:
        for column, values in columns.items():
            if column in self._numeric:
                problem = number_problem(values, column in self._nullable)
            else:
                problem = category_problem(values, column in self._nullable, column in self._int_coded)
            if problem:
                i, message = problem
                raise RequestError(UNPROCESSABLE, where(column, i), f"{column}: {message}")

    def _check_ids(self, ids: list | None, where) -> None:
        problem = id_problem(ids) if ids is not None else None
        if problem:
            i, message = problem
            raise RequestError(UNPROCESSABLE, where(i), f"{self.id_column}: {message}")

    def _v2_names(self, tensors: Sequence[Tensor]) -> dict[str, int]:
        by_name: dict[str, int] = {}
        for k, tensor in enumerate(tensors):
            if tensor.name not in self._column_set and tensor.name != self.id_column:
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].name", f"unknown column {tensor.name!r}; "
                                   f"{self._accepted()}")
            if tensor.name in by_name:
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].name", f"column {tensor.name!r} is sent twice")
            kind, allowed = self._kind(tensor.name)
            if str(tensor.datatype).upper() not in allowed:
                raise RequestError(UNPROCESSABLE, f"inputs[{k}].datatype", f"{tensor.datatype!r} is not a datatype "
                                   f"for {kind} column {tensor.name!r}; use one of {sorted(allowed)}")
            by_name[tensor.name] = k
        if len(by_name) - (self.id_column in by_name) < len(self.columns):
            self._columns_error(by_name.keys(), lambda c: "inputs")
        return by_name

    def _kind(self, column: str) -> tuple[str, frozenset]:
        """What a column is and the v2 datatypes it takes."""
        if column in self._numeric:
            return "numeric", NUMERIC_TYPES
        if column == self.id_column:
            return "id", CATEGORICAL_TYPES
        if column in self._int_coded:
            return "integer-coded categorical", CATEGORICAL_TYPES
        return "text categorical", frozenset({"BYTES"})

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

    def to_v1(self, probabilities: np.ndarray, model_name: str, model_version: str | None,
              ids: list | None = None) -> dict:
        """The v1 response: labels, positive-class probabilities, the request's ids (a list named
        after the id column, row for row, when the request carried it) and the model that answered."""
        body = {"predictions": self.predictions(probabilities),
                "probabilities": np.asarray(probabilities, dtype=np.float64).tolist()}
        if ids is not None:
            body[self.id_column] = ids
        return {**body, "model_name": model_name, "model_version": model_version}

    def to_v2(self, probabilities: np.ndarray, ids: list | None = None) -> list[Tensor]:
        """The v2 output tensors: `label` (original values) and `probability` (FP32) per row, and
        the request's ids as a tensor named after the id column when it carried them."""
        n = int(np.asarray(probabilities).shape[0])
        outputs = [Tensor(LABEL, self.label_datatype, [n], self.predictions(probabilities)),
                   Tensor(PROBABILITY, "FP32", [n], np.asarray(probabilities, dtype=np.float32))]
        if ids is not None:
            numbers = all(type(i) is int for i in ids)
            outputs.append(Tensor(self.id_column, "INT64" if numbers else "BYTES", [n],
                                  np.asarray(ids, dtype=np.int64) if numbers else list(map(str, ids))))
        return outputs

    @property
    def label_datatype(self) -> str:
        positive = self.labels.positive
        if isinstance(positive, bool):
            return "BOOL"
        return "INT64" if isinstance(positive, int) else "BYTES"
