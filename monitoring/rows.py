"""The window table: one row per instance of each paired call, as Arrow and as Parquet bytes
(the columns are `monitoring.windows`')."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

from monitoring import windows
from monitoring.events import Request, Response

log = logging.getLogger("flywheel.monitoring")


@dataclass(slots=True)
class Pair:
    """A request and its response, paired by request id: the rows of one call."""

    request_id: str
    request: Request
    response: Response
    event_time: datetime
    model_name: str
    model_version: str
    rows: int
    size: int  # body bytes of its two events
    trace_id: str | None = None  # the request's x-request-id, where the logger forwarded it (events.trace_id)



def _column(values: list, text: bool = False):
    """An Arrow column of JSON values as sent; mixed or nested values (or all, `text`) become text."""
    import pyarrow as pa

    try:
        array = None if text else pa.array(values)
        if array is not None and not (pa.types.is_nested(array.type) or pa.types.is_binary(array.type)):
            return array
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def rows_table(pairs: list[Pair], text: bool = False):
    """The window table of `pairs` (one row per instance); `text`: every feature column as JSON text."""
    import pyarrow as pa

    features: dict[str, None] = {}
    for pair in pairs:
        features.update(dict.fromkeys(pair.request.columns))
    table = {}
    for name in features:
        values = []
        for pair in pairs:
            values.extend(pair.request.columns.get(name) or [None] * pair.rows)
        table[name] = _column(values, text)
    ids, instances, times, names, versions, probabilities, predictions = [], [], [], [], [], [], []
    traces = []
    for pair in pairs:
        n = pair.rows
        ids.extend([pair.request_id] * n)
        traces.extend([pair.trace_id] * n)
        instances.extend(range(n))
        times.extend([pair.event_time] * n)
        names.extend([pair.model_name] * n)
        versions.extend([pair.model_version] * n)
        probabilities.extend(pair.response.probabilities or [None] * n)
        predictions.extend(pair.response.predictions or [None] * n)
    table[windows.REQUEST_ID] = pa.array(ids, pa.string())
    table[windows.INSTANCE] = pa.array(instances, pa.int32())
    table[windows.TRACE_ID] = pa.array(traces, pa.string())
    table[windows.EVENT_TIME] = pa.array(times, pa.timestamp("us", tz="UTC"))
    table[windows.MODEL_NAME] = pa.array(names, pa.string())
    table[windows.MODEL_VERSION] = pa.array(versions, pa.string())
    table[windows.PROBABILITY] = pa.array(probabilities, pa.float64())
    table[windows.PREDICTION] = pa.array(predictions, pa.string())
    table[windows.TRUTH] = pa.nulls(len(ids), pa.string())
    return pa.table(table)


def partitions(pairs: list[Pair]) -> list[tuple[str, list[Pair]]]:
    """`pairs` grouped by window file: (model version, the pairs of one version and UTC hour)."""
    groups: dict[tuple, list[Pair]] = {}
    for pair in pairs:
        groups.setdefault((pair.model_version, pair.event_time.strftime("%Y-%m-%dT%H")), []).append(pair)
    return [(version, group) for (version, _), group in groups.items()]


def encode(pairs: list[Pair]) -> bytes:
    """The Parquet bytes of `pairs`. Should the features as sent fit no Parquet type (a retry could
    never write them, and they would hold the buffer forever), they are written as JSON text."""
    try:
        return windows.parquet_bytes(rows_table(pairs))
    except Exception as err:
        log.warning("payload sink: %d rows written with features as text: %s", sum(p.rows for p in pairs), err)
        return windows.parquet_bytes(rows_table(pairs, text=True))
