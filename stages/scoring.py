"""Batch scoring, pure: which rows of a table may be scored (the training suite's row-level
expectations and the model's own input contract), the row ranges the partitions score, and one
partition scored with the champion in process.

The forward pass is serving's: `Preprocessor.transform` (what `serving.transform.FeatureCodec`
encodes a request with), `TrainedModel.predict_arrays` (what `serving.predictor` answers with),
the probability rounded to FP32 as the predictor returns it, and the label as the transformer
decides it (`probability >= decision_threshold`, in the dataset's own label values). So a row
scored here and the same row sent to the served champion get the same probability.

Row rules: an expectation quarantines rows only when it is blocking, row-level (a value per row
is right or wrong: not null, between, in set, type, unique, column pair) and on the model's
feature columns or the id column; one with `mostly` < 1 tolerates its unexpected rows (as
training did), so they are scored. Batch-level expectations (means, quantiles, row counts) are
the monitoring check's business: the drift step runs the suite on the scored rows in GX.

Joining back: every clean row keeps `input_row`, its 0-based position in the input table (as the
quarantine file has it), through the partitions into the predictions, so prediction k joins
input row `input_row` whether or not the table has an id column and whatever was quarantined.
A table whose columns would collide with what scoring adds is refused up front (ColumnClashError).
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from model.labels import LabelMapping
from model.preprocessing import Preprocessor

ROW, REASON = "input_row", "quarantine_reason"
LINEAGE = ("model_name", "model_version", "run_id", "scored_at")
PREDICTION, PROBABILITY = "prediction", "probability"
FORWARD_ROWS = 65_536  # rows per forward pass: bounds the tensors' memory inside a partition
NUMERIC_TYPE_PREFIXES = ("int", "uint", "float", "number", "decimal", "double")
COPY_BYTES = 8 << 20  # chunk size when the predictions are copied to their destination


class QuarantineError(ValueError):
    """More rows broke the rules than `scoring.max_quarantine_share` allows; the message says which."""


class ColumnClashError(ValueError):
    """A column of the input has a name scoring adds itself; the message (one line) names it and why."""


def check_columns(columns: Sequence[str], id_column: str | None = None) -> None:
    """ColumnClashError when the table cannot be scored without losing a column: an input column
    named like the ones screening adds (`input_row`, `quarantine_reason`), or an id column (the
    one input column the predictions carry) named like a prediction or lineage column."""
    present = set(columns)
    for name, why in ((ROW, "each row's 0-based position in the input"), (REASON, "why a row was quarantined")):
        if name in present:
            raise ColumnClashError(f"the input has a column named {name!r}, which scoring adds itself ({why}) "
                                   "to the predictions and the quarantine file: rename that column")
    if id_column and id_column in present:
        _check_id(id_column)


def _check_id(id_column: str) -> None:
    if id_column in (ROW, PREDICTION, PROBABILITY, *LINEAGE):
        raise ColumnClashError(f"the id column {id_column!r} has the name of a column the predictions carry "
                               f"({', '.join((ROW, PREDICTION, PROBABILITY, *LINEAGE))}): "
                               "rename it in the input and in dataset.id_column")


@dataclass(frozen=True)
class Screened:
    """A table split into the rows to score and the quarantined ones (with their reasons)."""

    clean: pd.DataFrame
    quarantined: pd.DataFrame
    rows: int

    @property
    def share(self) -> float:
        return len(self.quarantined) / self.rows if self.rows else 0.0


# ---------------------------------------------------------------------------------- row rules


def _columns_of(kwargs: dict) -> list[str]:
    return [kwargs[k] for k in ("column", "column_A", "column_B") if kwargs.get(k)]


ROW_LEVEL = frozenset({
    "expect_column_values_to_not_be_null", "expect_column_values_to_be_between", "expect_column_values_to_be_in_set",
    "expect_column_values_to_be_in_type_list", "expect_column_values_to_be_of_type",
    "expect_column_values_to_be_unique", "expect_column_pair_values_a_to_be_greater_than_b"})


def row_rules(suite: dict, columns: Sequence[str]) -> list[dict]:
    """The suite's blocking row-level expectations on `columns` (the features and the id column)
    that hold for every row (no `mostly` below 1)."""
    allowed = set(columns)
    return [e for e in suite["expectations"]
            if e["severity"] == "blocking" and e["type"] in ROW_LEVEL and float(e["kwargs"].get("mostly", 1.0)) >= 1.0
            and _columns_of(e["kwargs"]) and set(_columns_of(e["kwargs"])) <= allowed]


def _numbers(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce")


def _between(values: pd.Series, kwargs: dict) -> pd.Series:
    numbers, bad = _numbers(values), pd.Series(False, index=values.index)
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if low is not None:
        bad |= numbers <= low if kwargs.get("strict_min") else numbers < low
    if high is not None:
        bad |= numbers >= high if kwargs.get("strict_max") else numbers > high
    return bad & values.notna()


def _in_set(values: pd.Series, kwargs: dict) -> pd.Series:
    allowed = list(kwargs.get("value_set") or [])
    return values.notna() & ~values.isin(allowed) & ~values.astype(str).isin([str(v) for v in allowed])


def _of_type(values: pd.Series, kwargs: dict) -> pd.Series:
    wanted = [str(t).lower() for t in (kwargs.get("type_list") or [kwargs.get("type_", "")])]
    present = values.notna()
    if any(t.startswith(NUMERIC_TYPE_PREFIXES) for t in wanted):
        numbers = _numbers(values)
        bad = present & numbers.isna()
        if all(t.startswith(("int", "uint")) for t in wanted):
            bad |= present & numbers.notna() & (numbers % 1 != 0)
        return bad
    if any(t in ("str", "stringdtype", "string", "object") for t in wanted):
        if pd.api.types.is_string_dtype(values.dtype) and not pd.api.types.is_object_dtype(values.dtype):
            return pd.Series(False, index=values.index)
        return present & ~values.map(lambda v: isinstance(v, str))
    return pd.Series(False, index=values.index)


def _pair(frame: pd.DataFrame, kwargs: dict) -> pd.Series:
    a, b = _numbers(frame[kwargs["column_A"]]), _numbers(frame[kwargs["column_B"]])
    bad = ~(a >= b) if kwargs.get("or_equal") else ~(a > b)
    missing = a.isna() | b.isna()
    ignore = kwargs.get("ignore_row_if", "both_values_are_missing")
    skip = missing if ignore == "either_value_is_missing" else (a.isna() & b.isna()) if ignore != "neither" else False
    return bad & ~skip


def rule_mask(frame: pd.DataFrame, entry: dict) -> pd.Series:
    """True for each row that breaks one row-level expectation (nulls break only not-null)."""
    kwargs, kind = entry["kwargs"], entry["type"]
    if kind == "expect_column_pair_values_a_to_be_greater_than_b":
        return _pair(frame, kwargs)
    values = frame[kwargs["column"]]
    if kind == "expect_column_values_to_not_be_null":
        return values.isna()
    if kind == "expect_column_values_to_be_between":
        return _between(values, kwargs)
    if kind == "expect_column_values_to_be_in_set":
        return _in_set(values, kwargs)
    if kind == "expect_column_values_to_be_unique":
        return values.notna() & values.duplicated(keep=False)
    return _of_type(values, kwargs)


def _expected(entry: dict) -> str:
    shown = {k: v for k, v in entry["kwargs"].items() if k not in ("column", "column_A", "column_B", "type_list")}
    if "type_list" in entry["kwargs"]:
        shown["types"] = "numbers" if any(str(t).startswith(NUMERIC_TYPE_PREFIXES)
                                          for t in entry["kwargs"]["type_list"]) else "text"
    # A fixed order (a suite read back from GX may list kwargs in any order): bounds low to high.
    order = {k: i for i, k in enumerate(("min_value", "max_value", "strict_min", "strict_max", "value_set"))}
    keys = sorted(shown, key=lambda k: (order.get(k, len(order)), k))
    return ", ".join(f"{k}={_plain(shown[k])}" for k in keys)


def _plain(value):
    """18 rather than 18.0: a suite that travelled as a KFP struct has only doubles."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def rule_name(entry: dict) -> str:
    """`<expectation> on '<column>'[, '<column>'] (<arguments>)`: what a reason names."""
    columns = ", ".join(repr(c) for c in _columns_of(entry["kwargs"]))
    expected = _expected(entry)
    return f"{entry['type']} on {columns}" + (f" ({expected})" if expected else "")


def contract_masks(frame: pd.DataFrame, preprocessor: Preprocessor) -> list[tuple[str, pd.Series]]:
    """What serving refuses, per column: a null where training had none (the model never learnt
    to impute it) and a numeric value that is not a finite number."""
    nullable = set(preprocessor.nullable if preprocessor.nullable is not None
                   else preprocessor.numeric + preprocessor.categorical)
    found = []
    for column in preprocessor.numeric:
        numbers = _numbers(frame[column])
        bad = frame[column].notna() & ~np.isfinite(numbers.fillna(0.0).astype("float64"))
        bad |= frame[column].notna() & numbers.isna()
        found.append((f"model input: column {column!r} must be a finite number", bad))
    for column in preprocessor.numeric + preprocessor.categorical:
        if column not in nullable:
            found.append((f"model input: column {column!r} is null, but the training data had no missing "
                          "values in it", frame[column].isna()))
    return found


def row_reasons(frame: pd.DataFrame, suite: dict, preprocessor: Preprocessor,
                id_column: str | None = None) -> pd.Series:
    """Per row, why it cannot be scored ('; '-joined: the expectation and its column, or the
    model's input contract), '' for a row to score. Missing feature columns are a ValueError:
    no row of such a table can be scored."""
    features = list(preprocessor.numeric) + list(preprocessor.categorical)
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise ValueError(f"the input lacks the model's feature columns {missing} (it has {list(frame.columns)[:30]})")
    columns = features + ([id_column] if id_column and id_column in frame.columns else [])
    checks = [(rule_name(e), rule_mask(frame, e)) for e in row_rules(suite, columns)]
    checks += contract_masks(frame, preprocessor)
    reasons = pd.Series("", index=frame.index, dtype=object)
    for name, mask in checks:
        hit = mask.to_numpy(dtype=bool, na_value=False)
        if hit.any():
            reasons[hit] = [f"{r}; {name}" if r else name for r in reasons[hit]]
    return reasons


def screen(frame: pd.DataFrame, suite: dict, preprocessor: Preprocessor, id_column: str | None = None) -> Screened:
    """Split `frame` into the rows to score and the quarantined rows (both index reset), each row
    with its 0-based position in the input as the first column (`input_row`: the predictions
    carry it, so they join back to the input without an id column); the quarantined rows also
    with their reasons (`quarantine_reason`). ColumnClashError first for a table with a column
    named like one scoring adds (`check_columns`)."""
    check_columns(list(frame.columns), id_column)
    frame = frame.reset_index(drop=True)
    reasons = row_reasons(frame, suite, preprocessor, id_column)
    bad = reasons.to_numpy() != ""
    frame.insert(0, ROW, np.arange(len(frame), dtype=np.int64))
    quarantined = frame[bad].copy()
    quarantined[REASON] = reasons[bad].to_numpy()
    return Screened(frame[~bad].reset_index(drop=True), quarantined.reset_index(drop=True), len(frame))


def check_share(screened: Screened, max_share: float, where: str = "") -> None:
    """QuarantineError when more than `max_share` of the rows are quarantined: how many, and the
    reasons that quarantined most rows (expectation and column)."""
    if screened.share <= max_share:
        return
    counts = Counter(part for reasons in screened.quarantined[REASON] for part in reasons.split("; "))
    top = "; ".join(f"{reason} ({n:,} rows)" for reason, n in counts.most_common(3))
    raise QuarantineError(f"quarantined {len(screened.quarantined):,} of {screened.rows:,} rows "
                             f"({screened.share:.2%}) > scoring.max_quarantine_share {max_share:.2%}; "
                             f"most rows broke: {top}" + (f" (quarantine file: {where})" if where else ""))


# ---------------------------------------------------------------------------------- partitions


def partitions(rows: int, partition_rows: int) -> list[dict]:
    """Row ranges [start, stop) that cover rows 0..rows-1 once each, `partition_rows` apiece (the
    last one shorter); none for an empty table."""
    if partition_rows <= 0:
        raise ValueError(f"partition_rows must be positive, got {partition_rows}")
    return [{"partition": i, "start": start, "stop": min(start + partition_rows, rows)}
            for i, start in enumerate(range(0, rows, partition_rows))]


def check_coverage(ranges: Sequence[dict], rows: int) -> None:
    """ValueError unless the scored ranges cover every row of the table exactly once."""
    ordered = sorted((int(r["start"]), int(r["stop"])) for r in ranges)
    expected = 0
    for start, stop in ordered:
        if start != expected or stop < start:
            what = "overlap" if start < expected else "a gap"
            raise ValueError(f"scored partitions leave {what} at row {min(start, expected)}: ranges {ordered}")
        expected = stop
    if expected != rows:
        raise ValueError(f"scored partitions cover rows 0..{expected - 1}, the table has {rows:,} rows")


# ---------------------------------------------------------------------------------- scoring


def probabilities(model, frame: pd.DataFrame, batch_rows: int = FORWARD_ROWS) -> np.ndarray:
    """P(positive class) per row, as the served predictor answers: serving's preprocessing, one
    forward pass per `batch_rows`, rounded to FP32 (then float64, as the transformer returns it)."""
    out = np.empty(len(frame), dtype=np.float64)
    for start in range(0, len(frame), batch_rows):
        numeric, categorical = model.preprocessor.transform(frame.iloc[start:start + batch_rows])
        out[start:start + batch_rows] = model.predict_arrays(numeric, categorical).astype(np.float32)
    return out


def labels_of(scores: np.ndarray, labels: LabelMapping, decision_threshold: float) -> pd.Series:
    """The predicted label in the dataset's own values (the transformer's rule: >= threshold is positive)."""
    positive = np.asarray(scores) >= decision_threshold
    return pd.Series(np.where(positive, 1, 0)).map({1: labels.positive, 0: labels.negative})


def score_frame(model, frame: pd.DataFrame, *, decision_threshold: float, lineage: dict,
                id_column: str | None = None, scored_at: dt.datetime | None = None) -> pd.DataFrame:
    """Predictions for `frame`: the id column (when the table has it), `input_row` (when `frame`
    has it: the screened rows do, so every partition's predictions join back to the input),
    `prediction` (label values), `probability`, and the lineage columns (model_name,
    model_version, run_id, scored_at). ColumnClashError for an id column named like one of those."""
    if id_column and id_column in frame.columns:
        _check_id(id_column)
    scores = probabilities(model, frame)
    out = pd.DataFrame(index=range(len(frame)))
    if id_column and id_column in frame.columns:
        out[id_column] = frame[id_column].to_numpy()
    if ROW in frame.columns:
        out[ROW] = frame[ROW].to_numpy(dtype=np.int64)
    out[PREDICTION] = labels_of(scores, model.labels, decision_threshold).to_numpy()
    out[PROBABILITY] = scores
    stamp = pd.Timestamp(scored_at or dt.datetime.now(dt.UTC))
    for key in LINEAGE[:-1]:
        out[key] = str(lineage.get(key) or "")
    out["scored_at"] = stamp if stamp.tzinfo else stamp.tz_localize("UTC")
    return out


def read_rows(path: str, start: int, stop: int, columns: list[str] | None = None) -> pd.DataFrame:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them (the clean
    table is written with a row group per partition, so a task reads its partition alone)."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    groups, offset, first = [], 0, None
    for i in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(i).num_rows
        if offset < stop and offset + size > start:
            groups.append(i)
            first = offset if first is None else first
        offset += size
    if not groups:
        return parquet.schema_arrow.empty_table().to_pandas()
    table = parquet.read_row_groups(groups, columns=columns)
    return table.slice(start - first, stop - start).to_pandas()


def read_input(uri: str) -> pd.DataFrame:
    """The table to score (CSV, CSV.gz or Parquet; a path or a storage URI), sniffed by content."""
    import storage
    from storage.tables import read_table

    if not uri:
        raise ValueError("no input table: data_uri is empty (flywheel score --data URI, or set dataset.uri)")
    if not storage.exists(uri):
        raise FileNotFoundError(f"input table not found: {uri}")
    with storage.open_uri(uri) as handle:
        return read_table(handle)


def quarantine_uri(out_uri: str) -> str:
    """Where the quarantined rows go beside the predictions: `preds.parquet` -> `preds.quarantine.parquet`."""
    stem = out_uri[: -len(".parquet")] if out_uri.endswith(".parquet") else out_uri
    return f"{stem}.quarantine.parquet"


def copy_to(local_path: str, uri: str, chunk_bytes: int = COPY_BYTES) -> None:
    """Copy a local file to `uri` in chunks of `chunk_bytes` (never the whole file in memory).
    Readers see the old content or the new, never a torn file: on a local disk a temporary file
    beside the target, fsynced, then renamed; on an object store the upload completes or fails
    as a whole (a PUT, or a multipart upload completed at the end)."""
    import storage

    fs, path = storage.filesystem(uri)
    if not storage.is_local(fs):
        fs.put_file(local_path, path)
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(local_path, "rb") as source, open(tmp, "wb") as target:
            shutil.copyfileobj(source, target, chunk_bytes)
            target.flush()
            os.fsync(target.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)  # the rename itself survives a crash of the node
    finally:
        os.close(handle)


def write_predictions(parts: Sequence[tuple[dict, str]], local_path: str, out_uri: str, quarantine_path: str,
                      expected_rows: int) -> dict:
    """Join the partitions' Parquet files (metadata with start/stop, path) in row order into
    `local_path` one at a time (memory: one partition), check they cover `expected_rows` rows
    once, copy the result to `out_uri` in chunks (`copy_to`: memory stays one chunk) and any
    quarantined rows beside it. Returns the counts."""
    import pyarrow.parquet as pq

    ordered = sorted(parts, key=lambda part: int(part[0]["start"]))
    check_coverage([meta for meta, _ in ordered], expected_rows)
    writer = None
    try:
        for _, path in ordered:
            table = pq.read_table(path)
            writer = writer or pq.ParquetWriter(local_path, table.schema)
            writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # nothing to score: an empty table with the columns
        pd.DataFrame({ROW: pd.Series([], dtype="int64"), PREDICTION: [], PROBABILITY: [],
                      **{k: [] for k in LINEAGE}}).to_parquet(local_path, index=False)
    copy_to(local_path, out_uri)
    quarantined = pq.ParquetFile(quarantine_path).metadata.num_rows
    target = quarantine_uri(out_uri) if quarantined else ""
    if quarantined:
        copy_to(quarantine_path, target)
    return {"rows": expected_rows, "quarantined": quarantined, "partitions": len(ordered), "out_uri": out_uri,
            "quarantine_uri": target}


def drift_window(clean_path: str, predictions_path: str, target: str | None) -> pd.DataFrame:
    """The scored batch as a monitoring window: the features as read, `probability`, and `truth`
    (the label) when the table has one (so the check computes the live AUC). Not `input_row`:
    screening added it, the suite and the reference profile know nothing of it."""
    frame = pd.read_parquet(clean_path)
    frame = frame.drop(columns=[ROW], errors="ignore")
    frame["probability"] = pd.read_parquet(predictions_path, columns=[PROBABILITY])[PROBABILITY].to_numpy()
    if target and target in frame.columns:
        frame["truth"] = frame.pop(target)
    return frame
