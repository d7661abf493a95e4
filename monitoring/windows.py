"""The payload sink's on-disk format, and the reader the monitoring check uses.

Layout under `root` (any `storage` URI: a local path, s3://, minio://):

    <root>/model_version=<v>/date=<YYYY-MM-DD>/hour=<HH>/<uuid>.parquet   one row per instance of a
                                                                          paired request/response
    <root>/ground_truth/*.parquet                                          request_id, truth
                                                                          [, instance]
    <root>/_pending/<uuid>.json                                           unpaired events kept
                                                                          across a restart (sink)

A window file's columns: the feature columns as the client sent them, then `request_id`,
`instance` (the row's index in its request: one request may carry many rows), `event_time` (UTC:
the request's `ce-time`), `model_name`, `model_version`, `probability` (float, P(positive)),
`prediction` (the label, as text) and `truth` (null: joined at read time). Partitions are by the
request's time, so a window's newest rows are in its newest `date=`/`hour=` folders.

Files are written whole (`storage.write_atomic`: temp + rename locally, one PUT on object stores):
a reader never sees a torn file, and the temp files (`*.parquet.tmp-<pid>`) do not match `*.parquet`.

Ground truth arrives later, joined by `request_id` (and `instance` when the ground-truth row has one;
without it the truth applies to every row of that request). Files are read in name order and a
later row for the same key wins; `write_ground_truth` names files by time so that order is arrival.
"""
from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime
from urllib.parse import quote

import pandas as pd

import storage

GROUND_TRUTH = "ground_truth"
PENDING = "_pending"
REQUEST_ID, INSTANCE, EVENT_TIME = "request_id", "instance", "event_time"
# Ground truth may name the entity instead of the request: the dataset's id column (sent with the
# request, logged as one of its columns) and its value.
ENTITY_COLUMN, ENTITY_ID = "entity_column", "entity_id"
MODEL_NAME, MODEL_VERSION = "model_name", "model_version"
PROBABILITY, PREDICTION, TRUTH = "probability", "prediction", "truth"
# x-request-id of the call (Envoy's, forwarded by KServe's logger): what pairs a champion's row with
# its mirrored copy's on a cluster, where each pod's logger gives the copy its own request id.
TRACE_ID = "trace_id"
SINK_COLUMNS = (REQUEST_ID, INSTANCE, TRACE_ID, EVENT_TIME, MODEL_NAME, MODEL_VERSION, PROBABILITY, PREDICTION, TRUTH)
UNKNOWN_VERSION = "unknown"


def partition_name(model_version: str | None) -> str:
    """A model version as a folder name: percent-encoded, so `/` or `=` in a version stay one level."""
    return quote(str(model_version or UNKNOWN_VERSION), safe="-_.~+")


def partition(root: str, model_version: str | None, when: datetime) -> str:
    """The folder a row of `model_version` at `when` (UTC) goes into."""
    when = _utc(when)
    return storage.join(root, f"model_version={partition_name(model_version)}", f"date={when:%Y-%m-%d}",
                        f"hour={when:%H}")


def window_file(root: str, model_version: str | None, when: datetime) -> str:
    """A new, unique window file name in the partition of (`model_version`, `when`)."""
    return storage.join(partition(root, model_version, when), f"{uuid.uuid4().hex}.parquet")


def _utc(when) -> datetime:
    when = pd.Timestamp(when).to_pydatetime()
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


# ---- reading --------------------------------------------------------------------------------------

def _hour_folders(fs, root_path: str, model_version: str | None) -> list[tuple[str, str]]:
    """(date-hour key 'YYYY-MM-DDTHH', folder path) of every partition, newest first."""
    version = f"model_version={partition_name(model_version)}" if model_version is not None else "model_version=*"
    found = []
    for folder in fs.glob(f"{root_path.rstrip('/')}/{version}/date=*/hour=*"):
        parts = folder.rstrip("/").split("/")
        date, hour = parts[-2].removeprefix("date="), parts[-1].removeprefix("hour=")
        found.append((f"{date}T{hour}", folder))
    return sorted(found, reverse=True)


def _read_files(fs, paths: list[str]):
    import pyarrow.parquet as pq

    tables = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    return tables


def concat_tables(tables: list):
    """One table from window files whose column sets or types differ (a feature seen as int in one
    file and float in another, all-null in one, text in a third): missing columns are null, numbers
    widen, and a column mixing text with anything else becomes text."""
    import pyarrow as pa

    if not tables:
        return None
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    kinds: dict[str, set] = {}
    for table in tables:
        for name, kind in zip(table.column_names, table.schema.types):
            kinds.setdefault(name, set()).add(kind)
    as_text = {name for name, found in kinds.items()
               if len({k for k in found if not pa.types.is_null(k)}) > 1}
    fixed = []
    for table in tables:
        for name in as_text & set(table.column_names):
            i = table.column_names.index(name)
            table = table.set_column(i, name, table.column(i).cast(pa.string()))
        fixed.append(table)
    return pa.concat_tables(fixed, promote_options="permissive")


def read_ground_truth(root: str) -> pd.DataFrame:
    """Every ground-truth row under `<root>/ground_truth/` (request_id, truth[, instance]); a later
    file's row for the same key wins."""
    fs, root_path = storage.filesystem(root)
    paths = sorted(fs.glob(f"{root_path.rstrip('/')}/{GROUND_TRUTH}/*.parquet"))
    table = concat_tables(_read_files(fs, paths))
    if table is None or table.num_rows == 0:
        return pd.DataFrame({REQUEST_ID: pd.Series(dtype=object), TRUTH: pd.Series(dtype=object)})
    frame = table.to_pandas()
    missing = {REQUEST_ID, TRUTH} - set(frame.columns)
    if missing:
        raise ValueError(f"{root}/{GROUND_TRUTH}: ground-truth files need columns {sorted(missing)}")
    entity = [ENTITY_COLUMN, ENTITY_ID] if {ENTITY_COLUMN, ENTITY_ID} <= set(frame.columns) else []
    keep = [REQUEST_ID, TRUTH] + ([INSTANCE] if INSTANCE in frame.columns else []) + entity
    frame = frame[keep].copy()
    frame[REQUEST_ID] = frame[REQUEST_ID].map(lambda v: None if _null(v) else str(v)).astype(object)
    frame[TRUTH] = frame[TRUTH].map(lambda v: None if _null(v) else str(v)).astype(object)
    if INSTANCE in frame.columns:
        frame[INSTANCE] = pd.to_numeric(frame[INSTANCE], errors="coerce").astype("Int64")
    keys = [REQUEST_ID, INSTANCE] if INSTANCE in frame.columns else [REQUEST_ID]
    by_request = frame[frame[REQUEST_ID].notna()].drop_duplicates(keys, keep="last")
    by_entity = frame[frame[REQUEST_ID].isna()].drop_duplicates(entity, keep="last") if entity else frame.iloc[0:0]
    return pd.concat([by_request, by_entity]).reset_index(drop=True)


def _null(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value is pd.NA


def join_truth(window: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """`window` with its `truth` column filled from `truth` by request id (and instance), then,
    for rows still without one, by entity (the id column's value the request carried)."""
    if window.empty or truth.empty:
        return window
    window = window.copy()
    entities = truth[truth[REQUEST_ID].isna()] if ENTITY_COLUMN in truth.columns else None
    truth = truth[truth[REQUEST_ID].notna()]
    labels = pd.Series([None] * len(window), index=window.index, dtype=object)
    if INSTANCE in truth.columns:
        by_row = truth[truth[INSTANCE].notna()]
        whole = truth[truth[INSTANCE].isna()].drop(columns=INSTANCE)
    else:
        by_row, whole = truth.iloc[0:0], truth
    if not whole.empty:
        labels = window[REQUEST_ID].map(whole.set_index(REQUEST_ID)[TRUTH]).astype(object)
    if not by_row.empty:
        keyed = by_row.set_index([REQUEST_ID, INSTANCE])[TRUTH]
        keys = pd.MultiIndex.from_arrays([window[REQUEST_ID].astype(str),
                                          pd.array(window[INSTANCE], dtype="Int64")])
        exact = pd.Series(keyed.reindex(keys).to_numpy(), index=window.index, dtype=object)
        labels = exact.where(exact.notna(), labels)
    for column, rows in (entities.groupby(ENTITY_COLUMN) if entities is not None else ()):
        if column in window.columns:
            by_entity = window[column].map(lambda v: None if _null(v) else str(v)).map(
                rows.set_index(ENTITY_ID)[TRUTH])
            labels = labels.where(labels.notna(), by_entity)
    window[TRUTH] = labels.astype(object).where(labels.notna(), None)
    return window


def read_window(root: str, model_version: str | None = None, rows: int | None = None,
                since=None) -> pd.DataFrame:
    """The most recent sink rows, oldest first, with ground truth joined by request id.

    Args:
        root: The sink's root (any storage URI).
        model_version: Only this version's rows; None: every version.
        rows: At most this many rows, the newest; None: all.
        since: Only rows with `event_time` at or after this (a datetime, or an ISO string; naive is UTC).

    Returns:
        One row per instance: the feature columns as sent, then the sink columns
        (`SINK_COLUMNS`); an empty frame with the sink columns when there is nothing.
    """
    fs, root_path = storage.filesystem(root)
    since = _utc(since) if since is not None else None
    floor = f"{since:%Y-%m-%dT%H}" if since is not None else None
    tables, count = [], 0
    for key, folder in _hour_folders(fs, root_path, model_version):
        if floor is not None and key < floor:
            break
        if rows is not None and count >= rows:
            break
        for table in _read_files(fs, sorted(fs.glob(f"{folder.rstrip('/')}/*.parquet"))):
            tables.append(table)
            count += table.num_rows
    table = concat_tables(tables)
    if table is None:
        return pd.DataFrame({column: pd.Series(dtype=_empty_dtype(column)) for column in SINK_COLUMNS})
    frame = table.to_pandas()
    if EVENT_TIME in frame.columns:
        frame[EVENT_TIME] = pd.to_datetime(frame[EVENT_TIME], utc=True)
        if since is not None:
            frame = frame[frame[EVENT_TIME] >= pd.Timestamp(since)]
        order = [c for c in (EVENT_TIME, REQUEST_ID, INSTANCE) if c in frame.columns]
        frame = frame.sort_values(order, kind="stable")
    if rows is not None:
        frame = frame.tail(rows)
    frame = frame.reset_index(drop=True)
    frame = join_truth(frame, read_ground_truth(root))
    features = [c for c in frame.columns if c not in SINK_COLUMNS]
    return frame[[*features, *[c for c in SINK_COLUMNS if c in frame.columns]]]


def _empty_dtype(column: str):
    if column == EVENT_TIME:
        return "datetime64[ns, UTC]"
    return {PROBABILITY: "float64", INSTANCE: "int32"}.get(column, object)


# ---- ground truth ---------------------------------------------------------------------------------

def write_ground_truth(root: str, frame: pd.DataFrame) -> str:
    """Write ground-truth rows (`request_id`, `truth`, optionally `instance`; or, instead of a
    request id, `entity_column` and `entity_id`) as one new file under `<root>/ground_truth/`, named
    by time so later files win; returns its URI.

    Raises:
        ValueError: a column is missing, or a row has neither a request id nor an entity, or no truth.
    """
    import pyarrow as pa

    missing = {REQUEST_ID, TRUTH} - set(frame.columns)
    if missing:
        raise ValueError(f"ground truth needs columns {sorted(missing)}, got {list(frame.columns)}")
    ids = frame[REQUEST_ID].map(lambda v: None if _null(v) or str(v) == "" else str(v))
    entity = {ENTITY_COLUMN, ENTITY_ID} <= set(frame.columns)
    keyed = ids.notna() | (frame[ENTITY_COLUMN].notna() & frame[ENTITY_ID].notna() if entity else False)
    if not keyed.all():
        raise ValueError("ground truth has a row with neither a request_id nor an entity_column and entity_id")
    if frame[TRUTH].isna().any():
        raise ValueError("ground truth has an empty truth")
    columns = {REQUEST_ID: pa.array(ids.tolist(), pa.string()),
               TRUTH: pa.array(frame[TRUTH].map(str).tolist(), pa.string())}
    if INSTANCE in frame.columns:
        instances = pd.to_numeric(frame[INSTANCE]).astype("Int64")
        columns[INSTANCE] = pa.array([None if pd.isna(v) else int(v) for v in instances], pa.int64())
    if entity:
        for name in (ENTITY_COLUMN, ENTITY_ID):
            columns[name] = pa.array([None if _null(v) else str(v) for v in frame[name]], pa.string())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    uri = storage.join(root, GROUND_TRUTH, f"{stamp}-{uuid.uuid4().hex[:8]}.parquet")
    storage.write_atomic(uri, parquet_bytes(pa.table(columns)))
    return uri
