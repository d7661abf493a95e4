"""The payload sink: KServe logger CloudEvents in, paired request/response rows out to Parquet windows.

`PayloadSink.accept(headers, body)` takes one binary-mode CloudEvent (the KServe logger agent's
format, which `serving/payload.py` copies): `ce-specversion` 1.0, `ce-type`
`org.kubeflow.serving.inference.request` or `.response`, `ce-id` (the request id; both events of one
call share it), optional `ce-time`, `ce-source` and the agent's extensions (`ce-inferenceservicename`,
`ce-namespace`, `ce-component`, `ce-endpoint`, `ce-metadata`, `ce-annotations`), and the raw
inference request or response as the body:

* requests: v1 `{"instances": [{column: value}, ...]}` or v2 `{"inputs": [{"name", "shape", "data"}]}`
  with one tensor per column;
* responses: v1 `{"predictions": [...], "probabilities": [...]}` (probabilities optional) or v2
  `{"outputs": [...]}` with a `label` and/or a `probability` tensor (the transformer's), and the
  `model_version` that answered (else "unknown").

It answers with an `Outcome` (the HTTP layer's status): 202 accepted; 400 not a readable
CloudEvent (a required attribute missing, bad `ce-time`, bad JSON, no data); 415 a body that is not
JSON (binary v2 tensors, structured-mode events); 422 a well-formed event it cannot use (unknown
`ce-type`, a request or response of a shape it cannot read); 503 busy: memory is exhausted (see
Bounds), or the sink is closing (with a Retry-After). Every 503 is counted in
`flywheel_monitor_rejected_events_total{type, reason}` (the `FlywheelMonitorRejectingEvents` alert).

Pairing is by `ce-id`, in either order. An unpaired half waits `pending_seconds`, then expires and is
counted (a refused request has no response: the agent logs responses of 200s only). A pair becomes
one row per instance (`monitoring.windows` has the columns), buffered until a flush writes it:
when `flush_events` rows are waiting, when buffered pairs reach a quarter of a bound, when the
oldest has waited `flush_seconds`, and on `close()`. A flush runs in the background thread, never
on the path that accepts events: it swaps the buffered pairs out under the lock, then encodes and
writes them without it, while new events keep filling a fresh buffer. It writes one Parquet file
per (model version, date, hour) partition atomically; a failed write keeps its rows and is retried
(backing off), so an accepted event is either on disk or still in memory, never dropped. `close()`
waits for the flush in flight, writes every row, and spills the still-unpaired halves to
`<root>/_pending/` where the next start picks them up.

Bounds: memory, not flushing, is what refuses. `buffer_events` events and `buffer_bytes` body bytes
are held at most, counting unpaired halves, buffered pairs (two events each) AND the pairs a flush
is writing. As a flush starts at a quarter of a bound, a flush in flight leaves three quarters for
new events: a 503 means the store does not keep up (or is down), not that a flush is running.
At a bound, events that would start a new pair are refused with 503, unless the oldest unpaired
half has waited `evict_seconds` (then it is evicted, counted, to make room: halves that will never
pair, such as the requests of refused calls, must not wedge a full buffer for a whole TTL). An
event that completes a waiting half is always accepted, so memory stays under twice the bound and
no pair is stalled by its own first half; and the other half of a refused event is refused too,
so a pair is taken whole or not at all.

`drain()` (the first SIGTERM) only marks the sink not ready (`/healthz` 503); events are still
taken until `close()` starts, since everything taken before then is written by `close()`: a
503 in the moment between the signal and the server's stop would be an event the agent drops.

Note the KServe agent sends each event once and does not retry on a 5xx (kserve pkg/logger
worker.go): a 503 from here is an event the agent drops and logs. Senders that do retry (Knative
Eventing brokers and triggers with a delivery policy) redeliver it.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

import storage
from monitoring import windows
from specs.monitoring import SinkSpec

try:
    import orjson

    loads = orjson.loads
except ImportError:  # pragma: no cover - orjson comes with kserve
    loads = json.loads

log = logging.getLogger("flywheel.monitoring")

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
KINDS = {REQUEST_TYPE: "request", RESPONSE_TYPE: "response"}
SPEC_VERSIONS = ("1.0",)
JSON_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded", "")  # curl -d sends form
CE_ATTRIBUTES = ("ce-specversion", "ce-type", "ce-id", "ce-source", "ce-time", "ce-inferenceservicename",
                 "ce-namespace", "ce-component", "ce-endpoint", "content-type")
ACCEPTED, BAD_REQUEST, UNSUPPORTED, UNPROCESSABLE, BUSY = 202, 400, 415, 422, 503
LABEL_OUTPUT, PROBABILITY_OUTPUT = "label", "probability"
MAX_VERSION_CHARS = 200
FLUSH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Outcome:
    """What `accept` decided: the HTTP status, a message, and for a 503 the seconds to wait."""

    status: int
    message: str
    retry_after: float | None = None
    reason: str | None = None  # a 503's cause: full, half_refused, closing

    @property
    def accepted(self) -> bool:
        return self.status < 300


class EventError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(slots=True)
class Request:
    columns: dict[str, list]  # feature -> one value per instance
    rows: int


@dataclass(slots=True)
class Response:
    predictions: list | None  # labels as text, or None
    probabilities: list | None  # floats (or None each), or None
    rows: int
    model_name: str | None
    model_version: str | None


@dataclass(slots=True)
class Half:
    """One accepted event waiting for its other half."""

    kind: str
    parsed: Request | Response
    time: datetime | None  # ce-time
    arrived: float  # time.monotonic()
    model_name: str
    headers: dict
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body)


@dataclass(slots=True)
class Pair:
    request_id: str
    request: Request
    response: Response
    event_time: datetime
    model_name: str
    model_version: str
    rows: int
    size: int  # body bytes of its two events


@dataclass
class SinkMetrics:
    """The sink's Prometheus metrics, in a registry of its own (one per sink, so tests can run many)."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self):
        r = self.registry
        self.events = Counter("flywheel_monitor_events", "Payload events received, by type and HTTP status",
                              ["type", "code"], registry=r)
        self.rows = Counter("flywheel_monitor_rows_written", "Rows written to window files", ["model_version"],
                            registry=r)
        self.files = Counter("flywheel_monitor_files_written", "Window files written", registry=r)
        self.unpaired = Counter("flywheel_monitor_unpaired", "Accepted events that never became rows, by reason "
                                "(expired: no other half in time; evicted: made room in a full buffer; "
                                "mismatch: row counts differ)",
                                ["type", "reason"], registry=r)
        self.duplicates = Counter("flywheel_monitor_duplicate_events", "Events for an id already held or written",
                                  ["type"], registry=r)
        self.flush_seconds = Histogram("flywheel_monitor_flush_seconds", "Latency of one flush (all partitions)",
                                       buckets=FLUSH_BUCKETS, registry=r)
        self.flush_errors = Counter("flywheel_monitor_flush_errors", "Flushes that failed (rows kept, retried)",
                                    registry=r)
        self.depth = Gauge("flywheel_monitor_buffer_events", "Events held in memory (unpaired halves, buffered "
                           "pairs and pairs being written)", registry=r)
        self.bytes = Gauge("flywheel_monitor_buffer_bytes", "Event body bytes held in memory (as buffer_events)",
                           registry=r)
        self.writing = Gauge("flywheel_monitor_flushing_events", "Events of the pairs a flush is writing now",
                             registry=r)
        self.rejected = Counter("flywheel_monitor_rejected_events", "Events refused with 503, by reason (full: "
                                "memory bound reached; half_refused: the other half of a refused event; "
                                "closing: the sink is shutting down). The KServe agent drops them.",
                                ["type", "reason"], registry=r)
        self.pending = Gauge("flywheel_monitor_pending_events", "Unpaired events waiting for their other half",
                             registry=r)
        self.alerts = Counter("flywheel_monitor_alerts", "Alertmanager notifications by outcome "
                              "(triggered, ignored, invalid, failed)", ["outcome"], registry=r)
        self.ground_truth = Counter("flywheel_monitor_ground_truth_rows", "Ground-truth rows written", registry=r)
        self._event_children: dict[tuple, Counter] = {}

    def event(self, kind: str, code: int) -> None:
        child = self._event_children.get((kind, code))
        if child is None:
            child = self._event_children[(kind, code)] = self.events.labels(kind, str(code))
        child.inc()


# ---- parsing -------------------------------------------------------------------------------------

def _json(body: bytes, content_type: str):
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/cloudevents+json":
        raise EventError(UNSUPPORTED, "structured-mode CloudEvents are not read: send binary mode (ce- headers)")
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise EventError(UNSUPPORTED, f"content-type {media!r}: the sink reads JSON bodies only "
                                      "(binary v2 tensors are not logged)")
    if not body:
        raise EventError(BAD_REQUEST, "the event has no data")
    try:
        return loads(body)
    except ValueError as err:
        raise EventError(BAD_REQUEST, f"the data is not JSON: {err}") from None


def _flat(data) -> list:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return list(itertools.chain.from_iterable(d if isinstance(d, list) else [d] for d in data))
    return data


def parse_request(data) -> Request:
    """A v1 or v2 inference request's feature columns (EventError 422 when it is neither)."""
    if not isinstance(data, dict):
        raise EventError(UNPROCESSABLE, "the request is not a JSON object")
    if "instances" in data:
        instances = data["instances"]
        if not isinstance(instances, list) or not instances:
            raise EventError(UNPROCESSABLE, "request 'instances' must be a non-empty list")
        if not all(isinstance(row, dict) for row in instances):
            raise EventError(UNPROCESSABLE, "request 'instances' must be feature records (JSON objects)")
        names: dict[str, None] = {}
        for row in instances:
            names.update(dict.fromkeys(row))
        columns = {name: [row.get(name) for row in instances] for name in names}
        return _checked(Request(columns, len(instances)))
    if "inputs" in data:
        inputs = data["inputs"]
        if not isinstance(inputs, list) or not inputs:
            raise EventError(UNPROCESSABLE, "request 'inputs' must be a non-empty list of tensors")
        columns, rows = {}, None
        for k, tensor in enumerate(inputs):
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str) or "data" not in tensor:
                raise EventError(UNPROCESSABLE, f"request inputs[{k}] must be a tensor with a name and data")
            values = _flat(tensor["data"])
            if not isinstance(values, list):
                raise EventError(UNPROCESSABLE, f"request inputs[{k}].data must be a list")
            shape = tensor.get("shape")
            if isinstance(shape, list) and len(shape) > 1 and any(d != 1 for d in shape[1:]):
                raise EventError(UNPROCESSABLE, f"request inputs[{k}] has shape {shape}: one tensor per column "
                                                "([n] or [n, 1]) is expected")
            if rows is not None and len(values) != rows:
                raise EventError(UNPROCESSABLE, f"request inputs[{k}] has {len(values)} values, inputs[0] {rows}")
            rows = len(values)
            columns[tensor["name"]] = values
        if not rows:
            raise EventError(UNPROCESSABLE, "request tensors are empty")
        return _checked(Request(columns, rows))
    raise EventError(UNPROCESSABLE, "not an inference request: no v1 'instances' or v2 'inputs'")


def _checked(request: Request) -> Request:
    clash = set(request.columns) & set(windows.SINK_COLUMNS)
    if clash:
        raise EventError(UNPROCESSABLE, f"feature columns {sorted(clash)} clash with the sink's own columns")
    return request


def _labels(values, where: str) -> list:
    if not isinstance(values, list) or not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
        raise EventError(UNPROCESSABLE, f"response {where} must be a list of labels")
    return [None if v is None else str(v) for v in values]


def _probabilities(values, where: str) -> list:
    if not isinstance(values, list):
        raise EventError(UNPROCESSABLE, f"response {where} must be a list of numbers")
    out = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v) if math.isfinite(v) else None)
        else:
            raise EventError(UNPROCESSABLE, f"response {where} must be a list of numbers, found {v!r:.40}")
    return out


def parse_response(data) -> Response:
    """A v1 or v2 inference response's labels, probabilities and model (EventError 422 when unreadable)."""
    if not isinstance(data, dict):
        raise EventError(UNPROCESSABLE, "the response is not a JSON object")
    name, version = data.get("model_name"), data.get("model_version")
    name = str(name) if name is not None else None
    version = str(version) if version not in (None, "") else None
    if version is not None and len(windows.partition_name(version)) > MAX_VERSION_CHARS:
        # a folder name the store refuses (NAME_MAX is 255 bytes) would fail every flush of the buffer
        raise EventError(UNPROCESSABLE, f"response model_version is over {MAX_VERSION_CHARS} characters "
                                        "(percent-encoded)")
    if "predictions" in data:
        predictions = _labels(data["predictions"], "'predictions'")
        probabilities = _probabilities(data["probabilities"], "'probabilities'") if "probabilities" in data else None
        if probabilities is not None and len(probabilities) != len(predictions):
            raise EventError(UNPROCESSABLE, f"response has {len(predictions)} predictions and "
                                            f"{len(probabilities)} probabilities")
        return Response(predictions, probabilities, len(predictions), name, version)
    if "outputs" in data:
        outputs = data["outputs"]
        if not isinstance(outputs, list):
            raise EventError(UNPROCESSABLE, "response 'outputs' must be a list of tensors")
        found = {t["name"]: t for t in outputs if isinstance(t, dict) and isinstance(t.get("name"), str)}
        if LABEL_OUTPUT not in found and PROBABILITY_OUTPUT not in found:
            raise EventError(UNPROCESSABLE, f"response outputs have no {LABEL_OUTPUT!r} or {PROBABILITY_OUTPUT!r} "
                                            f"tensor (found {sorted(map(str, found))})")
        labels = probabilities = None
        if LABEL_OUTPUT in found:
            labels = _labels(_flat(found[LABEL_OUTPUT].get("data")), "outputs 'label'.data")
        if PROBABILITY_OUTPUT in found:
            probabilities = _probabilities(_flat(found[PROBABILITY_OUTPUT].get("data")), "outputs 'probability'.data")
        if labels is not None and probabilities is not None and len(labels) != len(probabilities):
            raise EventError(UNPROCESSABLE, f"response has {len(labels)} labels and {len(probabilities)} probabilities")
        rows = len(labels if labels is not None else probabilities)
        return Response(labels, probabilities, rows, name, version)
    raise EventError(UNPROCESSABLE, "not an inference response: no v1 'predictions' or v2 'outputs'")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: an offset that leaves years 1-9999
        raise EventError(BAD_REQUEST, f"ce-time {value!r:.60} is not an RFC 3339 time") from None
    if when.year < 1000:  # partitions are named date=YYYY-...: four digits keep them in time order
        raise EventError(BAD_REQUEST, f"ce-time {value!r:.60} is before the year 1000")
    return when


# ---- rows ----------------------------------------------------------------------------------------

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
    for pair in pairs:
        n = pair.rows
        ids.extend([pair.request_id] * n)
        instances.extend(range(n))
        times.extend([pair.event_time] * n)
        names.extend([pair.model_name] * n)
        versions.extend([pair.model_version] * n)
        probabilities.extend(pair.response.probabilities or [None] * n)
        predictions.extend(pair.response.predictions or [None] * n)
    table[windows.REQUEST_ID] = pa.array(ids, pa.string())
    table[windows.INSTANCE] = pa.array(instances, pa.int32())
    table[windows.EVENT_TIME] = pa.array(times, pa.timestamp("us", tz="UTC"))
    table[windows.MODEL_NAME] = pa.array(names, pa.string())
    table[windows.MODEL_VERSION] = pa.array(versions, pa.string())
    table[windows.PROBABILITY] = pa.array(probabilities, pa.float64())
    table[windows.PREDICTION] = pa.array(predictions, pa.string())
    table[windows.TRUTH] = pa.nulls(len(ids), pa.string())
    return pa.table(table)


def encode(pairs: list[Pair]) -> bytes:
    """The Parquet bytes of `pairs`. Should the features as sent fit no Parquet type (a retry could
    never write them, and they would hold the buffer forever), they are written as JSON text."""
    try:
        return windows.parquet_bytes(rows_table(pairs))
    except Exception as err:
        log.warning("payload sink: %d rows written with features as text: %s", sum(p.rows for p in pairs), err)
        return windows.parquet_bytes(rows_table(pairs, text=True))


# ---- the sink ------------------------------------------------------------------------------------

class PayloadSink:
    """Accepts payload events, pairs them, and writes the rows to window files in the background.

    Thread-safe: `accept` may be called from any thread (the HTTP server's), while a background
    thread expires unpaired halves and flushes.

    Args:
        root: Storage URI of the windows (`monitoring.windows` layout).
        spec: Buffer and flush bounds.
        pending_seconds: How long an unpaired half waits for its other half.
        evict_seconds: When the buffer is full, a half waiting longer than this makes room (evicted).
        metrics: Where to count (a fresh registry by default).
        start: Start the background thread (False: call `flush()`/`expire()` yourself, for tests).
        write: How a file is written, `(uri, bytes)`; `storage.write_atomic` by default.
    """

    def __init__(self, root: str, spec: SinkSpec | None = None, pending_seconds: float = 60.0,
                 metrics: SinkMetrics | None = None, start: bool = True, write=None, recent_ids: int = 100_000,
                 evict_seconds: float = 5.0):
        self.root, self.spec = root, spec or SinkSpec(root=root)
        self.pending_seconds = float(pending_seconds)
        self.metrics = metrics or SinkMetrics()
        self._write = write or storage.write_atomic
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._flushing = threading.Lock()
        self._pending: OrderedDict[str, Half] = OrderedDict()
        self._pairs: list[Pair] = []
        self._rows = 0  # rows in _pairs
        self._writing = 0  # events of the pairs a flush is writing now
        # body bytes of _pending, of _pairs, and of the pairs a flush is writing
        self._pending_bytes = self._pairs_bytes = self._writing_bytes = 0
        self._oldest: float | None = None  # monotonic time the oldest buffered pair was made
        self._recent: OrderedDict[str, None] = OrderedDict()  # ids already paired, for duplicates
        self._recent_cap = recent_ids
        self.totals = {"rows": 0, "kept": 0, "expired": 0, "evicted": 0, "mismatched": 0,
                       "rejected": 0}  # this process's
        self._refused: OrderedDict[str, str] = OrderedDict()  # id -> kind refused as busy, for its other half
        self.evict_seconds = min(float(evict_seconds), self.pending_seconds)
        self._draining = self._closing = self._closed = False
        self._retry_at = 0.0
        self._backoff = 0.0
        self.metrics.depth.set_function(lambda: self.depth)
        self.metrics.bytes.set_function(lambda: self.held_bytes)
        self.metrics.writing.set_function(lambda: self._writing)
        self.metrics.pending.set_function(lambda: len(self._pending))
        self._restore_pending()
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._run, name="payload-sink-flush", daemon=True)
            self._thread.start()

    # -- state --
    @property
    def depth(self) -> int:
        """Events held in memory: unpaired halves, and two per buffered or being-written pair."""
        return len(self._pending) + 2 * len(self._pairs) + self._writing

    @property
    def held_bytes(self) -> int:
        """Body bytes held in memory, counted as `depth`."""
        return self._pending_bytes + self._pairs_bytes + self._writing_bytes

    @property
    def full(self) -> bool:
        """Memory is at a bound (the lock held): new pairs are refused."""
        return self.depth >= self.spec.buffer_events or self.held_bytes >= self.spec.buffer_bytes

    @property
    def retry_after(self) -> float:
        return max(1.0, min(self.spec.flush_seconds, 10.0))

    @property
    def draining(self) -> bool:
        return self._draining

    def stats(self) -> dict:
        with self._lock:
            return {"pending": len(self._pending), "buffered_pairs": len(self._pairs), "buffered_rows": self._rows,
                    "writing_events": self._writing, "depth": self.depth, "buffer_events": self.spec.buffer_events,
                    "bytes": self.held_bytes, "buffer_bytes": self.spec.buffer_bytes, "draining": self._draining}

    def _hold(self, event_id: str, half: Half) -> None:
        self._pending[event_id] = half
        self._pending_bytes += half.size

    def _release(self, event_id: str) -> Half:
        half = self._pending.pop(event_id)
        self._pending_bytes -= half.size
        return half

    # -- accepting --
    def accept(self, headers: Mapping[str, str], body: bytes) -> Outcome:
        """Check one binary-mode CloudEvent and take it, or say why not (see the module doc).
        `headers` is case-insensitive (Starlette's) or has lower-case keys."""
        kind = KINDS.get(headers.get("ce-type") or "", "other")
        outcome = self._accept(kind, headers, body)
        self.metrics.event(kind, outcome.status)
        if outcome.status == BUSY:
            self.metrics.rejected.labels(kind, outcome.reason or "full").inc()
            self.totals["rejected"] += 1
        return outcome

    def _closing_outcome(self) -> Outcome:
        return Outcome(BUSY, "the sink is shutting down", self.retry_after, "closing")

    def _accept(self, kind: str, headers: Mapping[str, str], body: bytes) -> Outcome:
        if self._closing:
            return self._closing_outcome()
        event_id = headers.get("ce-id")
        if event_id and kind != "other":
            with self._lock:  # refuse early, before parsing
                refusal = self._refusal(event_id, kind)
            if refusal is not None:
                return refusal
        try:
            half = self.check(headers, body, kind)
        except EventError as err:
            return Outcome(err.status, err.message)
        return self._take(event_id, half, limit=True)

    def _refusal(self, event_id: str, kind: str) -> Outcome | None:
        """Why a new half is refused (the lock held), or None. An event completing a waiting half
        is always taken. The other half of a refused event is refused too, so that a sender that
        does not retry (the KServe agent) leaves no half behind to wait out its TTL, and one that
        does retry gets both in. When memory is at a bound, the oldest half waiting longer than
        `evict_seconds` makes room (evicted, counted); else the event is refused."""
        other = self._pending.get(event_id)
        if other is not None and other.kind != kind:
            return None
        refused = self._refused.get(event_id)
        if refused is not None and refused != kind:
            return Outcome(BUSY, f"its {refused} was refused: the {kind} is refused too, a retry takes both",
                           self.retry_after, "half_refused")
        while self.full:
            if not self._evict(time.monotonic()):
                break
        if self.full:
            self._refused[event_id] = kind
            if len(self._refused) > self._recent_cap:
                self._refused.popitem(last=False)
            self._wake.notify()  # a flush frees what the buffered pairs hold
            return Outcome(BUSY, f"the buffer is full ({self.depth} of {self.spec.buffer_events} events, "
                                 f"{self.held_bytes} of {self.spec.buffer_bytes} bytes): the store is not keeping up",
                           self.retry_after, "full")
        return None

    def _evict(self, now: float) -> bool:
        """Drop the oldest waiting half if it has waited `evict_seconds` (the lock held)."""
        if not self._pending:
            return False
        event_id, half = next(iter(self._pending.items()))
        if now - half.arrived < self.evict_seconds:
            return False
        self._release(event_id)
        self.metrics.unpaired.labels(half.kind, "evicted").inc()
        self.totals["evicted"] += 1
        return True

    def check(self, headers: Mapping[str, str], body: bytes, kind: str | None = None) -> Half:
        """Parse and check one event into a `Half` (EventError with the status when it is not usable)."""
        version = headers.get("ce-specversion")
        if not version:
            raise EventError(BAD_REQUEST, "not a binary-mode CloudEvent: no ce-specversion header")
        if version not in SPEC_VERSIONS:
            raise EventError(BAD_REQUEST, f"ce-specversion {version!r:.20} is not supported (1.0 is)")
        ce_type = headers.get("ce-type")
        if not ce_type:
            raise EventError(BAD_REQUEST, "no ce-type header")
        kind = kind or KINDS.get(ce_type, "other")
        if kind == "other":
            raise EventError(UNPROCESSABLE, f"ce-type {ce_type!r:.80} is not an inference request or response "
                                            f"({REQUEST_TYPE}, {RESPONSE_TYPE})")
        if not headers.get("ce-id"):
            raise EventError(BAD_REQUEST, "no ce-id header (the request id that pairs request and response)")
        when = parse_time(headers.get("ce-time"))
        data = _json(body, headers.get("content-type") or "")
        parsed = parse_request(data) if kind == "request" else parse_response(data)
        attributes = {k: headers.get(k) for k in CE_ATTRIBUTES if headers.get(k) is not None}
        return Half(kind, parsed, when, time.monotonic(), headers.get("ce-inferenceservicename") or "",
                    attributes, bytes(body))

    def _take(self, event_id: str, half: Half, limit: bool) -> Outcome:
        with self._lock:
            if self._closing and limit:
                return self._closing_outcome()
            if event_id in self._recent:
                self.metrics.duplicates.labels(half.kind).inc()
                return Outcome(ACCEPTED, f"duplicate {half.kind} for {event_id}: already paired")
            if limit:
                refusal = self._refusal(event_id, half.kind)  # again: the buffer may have filled meanwhile
                if refusal is not None:
                    return refusal
            if self._refused.get(event_id) == half.kind:
                del self._refused[event_id]
            other = self._pending.get(event_id)
            if other is None or other.kind == half.kind:
                if other is not None:
                    self.metrics.duplicates.labels(half.kind).inc()
                    self._release(event_id)
                self._hold(event_id, half)
                return Outcome(ACCEPTED, f"{half.kind} accepted, waiting for its other half")
            self._release(event_id)
            request, response = (half, other) if half.kind == "request" else (other, half)
            self._remember(event_id)
            pair = self._pair(event_id, request, response)
            if pair is None:
                return Outcome(ACCEPTED, "accepted; its request and response row counts differ (counted)")
            self._pairs.append(pair)
            self._rows += pair.rows
            self._pairs_bytes += pair.size
            if self._oldest is None:
                self._oldest = time.monotonic()
            if self._big():
                self._wake.notify()
            return Outcome(ACCEPTED, "paired")

    def _remember(self, event_id: str) -> None:
        self._recent[event_id] = None
        if len(self._recent) > self._recent_cap:
            self._recent.popitem(last=False)

    def _pair(self, event_id: str, request: Half, response: Half) -> Pair | None:
        req, res = request.parsed, response.parsed
        if req.rows != res.rows:
            log.warning("event %s: request has %d rows, response %d; not written", event_id, req.rows, res.rows)
            self.metrics.unpaired.labels("pair", "mismatch").inc()
            self.totals["mismatched"] += 1
            return None
        when = request.time or response.time or datetime.now(UTC)
        name = request.model_name or response.model_name or res.model_name or ""
        return Pair(event_id, req, res, when, name, res.model_version or windows.UNKNOWN_VERSION, req.rows,
                    request.size + response.size)

    # -- background work --
    def _big(self) -> bool:
        """The buffered pairs are worth a flush now (the lock held): `flush_events` rows, a quarter
        of a bound (so that the pairs a flush holds leave three quarters to new events), or full."""
        spec = self.spec
        return bool(self._rows >= spec.flush_events or 2 * len(self._pairs) >= max(1, spec.buffer_events // 4)
                    or self._pairs_bytes >= spec.buffer_bytes // 4 or (self._pairs and self.full))

    def _due(self, now: float) -> bool:
        if not self._pairs or now < self._retry_at:
            return False
        return (self._closing or self._big()
                or (self._oldest is not None and now - self._oldest >= self.spec.flush_seconds))

    def _run(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                if not self._due(now) and not self._closing:
                    self._wake.wait(timeout=0.25)
                closing = self._closing
            try:
                self.expire()
                with self._lock:
                    due = self._due(time.monotonic())
                if due:
                    self.flush()
            except Exception:  # never let the thread die; flush() counts and logs its own failures
                log.exception("payload sink background work failed")
            if closing:
                return

    def expire(self, now: float | None = None) -> int:
        """Drop (and count) unpaired halves older than `pending_seconds`; returns how many."""
        now = time.monotonic() if now is None else now
        expired = 0
        with self._lock:
            while self._pending:
                event_id, half = next(iter(self._pending.items()))
                if now - half.arrived < self.pending_seconds:
                    break
                self._release(event_id)
                self.metrics.unpaired.labels(half.kind, "expired").inc()
                self.totals["expired"] += 1
                expired += 1
        return expired

    def flush(self) -> int:
        """Write every buffered row now, one file per partition; returns the rows written. The
        pairs are swapped out under the lock and encoded and written without it, so events are
        accepted meanwhile; they count against the bounds until written. Rows of a failed write go
        back to the buffer (and the next background flush waits, backing off)."""
        with self._flushing:
            with self._lock:
                pairs, self._pairs, self._rows, self._oldest = self._pairs, [], 0, None
                size, self._pairs_bytes = self._pairs_bytes, 0
                self._writing += 2 * len(pairs)
                self._writing_bytes += size
            if not pairs:
                return 0
            started = time.perf_counter()
            groups: dict[tuple, list[Pair]] = {}
            for pair in pairs:
                groups.setdefault((pair.model_version, pair.event_time.strftime("%Y-%m-%dT%H")), []).append(pair)
            written, failed = 0, []
            for (version, _), group in groups.items():
                try:
                    self._write(windows.window_file(self.root, version, group[0].event_time), encode(group))
                except Exception as err:
                    log.error("payload sink: writing %d rows of %s failed, kept for a retry: %s",
                              sum(p.rows for p in group), version, err)
                    failed.extend(group)
                    continue
                rows = sum(p.rows for p in group)
                written += rows
                self.metrics.rows.labels(version).inc(rows)
                self.totals["rows"] += rows
                self.metrics.files.inc()
                with self._lock:
                    self._writing -= 2 * len(group)
                    self._writing_bytes -= sum(p.size for p in group)
            with self._lock:
                if failed:  # back to the buffer, in one step: always counted against the bounds
                    self._pairs[:0] = failed
                    self._rows += sum(p.rows for p in failed)
                    self._oldest = time.monotonic() - self.spec.flush_seconds
                    self._writing -= 2 * len(failed)
                    back = sum(p.size for p in failed)
                    self._writing_bytes -= back
                    self._pairs_bytes += back
                    self._backoff = min(max(2 * self._backoff, 0.5), 30.0)
                    self._retry_at = time.monotonic() + self._backoff
                else:
                    self._backoff, self._retry_at = 0.0, 0.0
            self.metrics.flush_seconds.observe(time.perf_counter() - started)
            if failed:
                self.metrics.flush_errors.inc()
            return written

    # -- shutdown and restart --
    def drain(self) -> None:
        """Mark the sink as stopping (`/healthz` answers 503, so no new traffic is routed here).
        Events are still taken until `close()` starts: `close()` writes all of them, and a 503 now
        would be an event the KServe agent drops. Lock-free: a signal handler calls it, possibly
        while this very thread holds the lock in `accept`."""
        self._draining = True

    def close(self, timeout: float = 30.0) -> bool:
        """Stop: refuse new events, wait for the flush in flight, write every buffered row (retrying
        failed writes until `timeout`), and spill unpaired halves to `<root>/_pending/`. True when
        nothing is left in memory."""
        with self._lock:
            if self._closed:
                return not self._pairs and not self._pending
            self._draining = self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while True:
            self.flush()
            with self._lock:
                left = len(self._pairs)
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(min(self._backoff or 0.5, max(0.0, deadline - time.monotonic())))
        spilled = self._spill()
        with self._lock:
            self._closed = True
            clean = not self._pairs and spilled
        if not clean:
            log.error("payload sink closed with %d pairs unwritten", len(self._pairs))
        log.info("payload sink closed: %s", json.dumps(self.totals))
        return clean

    def _spill(self) -> bool:
        """Write the unpaired halves to `<root>/_pending/` so a restart can still pair them."""
        with self._lock:
            halves = list(self._pending.items())
        if not halves:
            return True
        now_wall, now = time.time(), time.monotonic()
        records = [{"id": event_id, "headers": half.headers, "body": half.body.decode("utf-8", "replace"),
                    "arrived": now_wall - (now - half.arrived)} for event_id, half in halves]
        uri = storage.join(self.root, windows.PENDING, f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}.json")
        try:
            self._write(uri, json.dumps(records).encode())
        except Exception as err:
            log.error("payload sink: could not keep %d unpaired events: %s", len(records), err)
            return False
        with self._lock:
            for event_id, _ in halves:
                if event_id in self._pending:
                    self._release(event_id)
        self.totals["kept"] += len(records)
        log.info("payload sink: kept %d unpaired events in %s", len(records), uri)
        return True

    def _restore_pending(self) -> None:
        """Take back the halves a previous process spilled (their waiting time counts on)."""
        try:
            fs, path = storage.filesystem(storage.join(self.root, windows.PENDING))
            files = sorted(fs.glob(f"{path.rstrip('/')}/*.json"))
        except Exception as err:  # an unreachable store must not stop the service from starting
            log.warning("payload sink: cannot list unpaired events to restore: %s", err)
            return
        now_wall, now = time.time(), time.monotonic()
        for file in files:
            try:
                with fs.open(file, "rb") as handle:
                    records = json.loads(handle.read())
                for record in records:
                    half = self.check(record["headers"], record["body"].encode())
                    half.arrived = now - max(0.0, now_wall - float(record["arrived"]))
                    self._take(record["id"], half, limit=False)
                fs.rm(file)
            except Exception as err:
                log.error("payload sink: cannot restore unpaired events from %s: %s", file, err)
        if files:
            log.info("payload sink: restored unpaired events from %d files (%d pending, %d pairs)", len(files),
                     len(self._pending), len(self._pairs))
