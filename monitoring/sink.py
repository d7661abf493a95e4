"""The payload sink: KServe logger CloudEvents in, paired request/response rows out to Parquet windows.

`PayloadSink.accept(headers, body)` takes one binary-mode CloudEvent (read by
`monitoring.events.parse_event`, which says what it must hold) and answers with an `Outcome`
(the HTTP layer's status): 202 accepted; 400, 415 or 422 what `parse_event` refuses; 503 busy:
memory is exhausted (see Bounds), or the sink is closing (with a Retry-After). Every 503 is counted
in `flywheel_monitor_rejected_events_total{type, reason}` (the `FlywheelMonitorRejectingEvents` alert).

Pairing is by `ce-id` within one InferenceService (`events.pair_key`), in either order. An unpaired
half waits `pending_seconds`, then expires and is counted (a refused request has no response: the
agent logs responses of 200s only). A pair becomes one row per instance (`monitoring.windows` has
the columns), buffered until a flush writes it (`monitoring.sink_writer`): when `flush_events` rows
are waiting, when buffered pairs reach a quarter of a bound, when the oldest has waited
`flush_seconds`, and on `close()`. A flush runs in the
background thread, never on the path that accepts events: it swaps the buffered pairs out under
the lock, then encodes and writes them without it, while new events keep filling a fresh buffer.
It writes one Parquet file per (model version, date, hour) partition atomically; a failed write
keeps its rows and is retried (backing off), so an accepted event is either on disk or still in
memory, never dropped. `close()` waits for the flush in flight, writes every row, and spills the
still-unpaired halves to `<root>/_pending/` where the next start picks them up.

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

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime

from monitoring import pending, windows
from monitoring.events import ACCEPTED, BUSY, KINDS, EventError, Half, Outcome, pair_key, parse_event, trace_id
from monitoring.rows import Pair
from monitoring.sink_metrics import SinkMetrics
from monitoring.sink_writer import WindowWriter
from specs.monitoring import SinkSpec

log = logging.getLogger("flywheel.monitoring")


class PayloadSink(WindowWriter):
    """Accepts payload events, pairs them, and writes the rows to window files in the background
    (the writing: `monitoring.sink_writer.WindowWriter`).

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
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._init_writer(write)
        self._pending: OrderedDict[str, Half] = OrderedDict()
        self._pending_bytes = 0  # body bytes of _pending
        self._recent: OrderedDict[str, None] = OrderedDict()  # ids already paired, for duplicates
        self._recent_cap = recent_ids
        self.totals = {"rows": 0, "kept": 0, "expired": 0, "evicted": 0, "mismatched": 0,
                       "rejected": 0}  # this process's
        self._refused: OrderedDict[str, str] = OrderedDict()  # id -> kind refused as busy, for its other half
        self.evict_seconds = min(float(evict_seconds), self.pending_seconds)
        self._draining = self._closing = self._closed = False
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
        event_id = pair_key(headers)
        if event_id and kind != "other":
            with self._lock:  # refuse early, before parsing
                refusal = self._refusal(event_id, kind)
            if refusal is not None:
                return refusal
        try:
            half = parse_event(headers, body, kind)
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
            self._buffer(pair)
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
        trace = trace_id(request.headers.get("ce-metadata")) or trace_id(response.headers.get("ce-metadata"))
        return Pair(request.headers.get("ce-id") or event_id, req, res, when, name,
                    res.model_version or windows.UNKNOWN_VERSION, req.rows, request.size + response.size, trace)

    # -- background work (the flush: `WindowWriter`) --
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
        try:
            # on disk by ce-id, as the agent sent it; a restart keys it again (`_restore_pending`)
            uri = pending.spill(self.root, [(h.headers.get("ce-id") or k, h) for k, h in halves], self._write)
        except Exception as err:
            log.error("payload sink: could not keep %d unpaired events: %s", len(halves), err)
            return False
        with self._lock:
            for event_id, _ in halves:
                if event_id in self._pending:
                    self._release(event_id)
        self.totals["kept"] += len(halves)
        log.info("payload sink: kept %d unpaired events in %s", len(halves), uri)
        return True

    def _restore_pending(self) -> None:
        """Take back the halves a previous process spilled (`monitoring.pending`)."""
        files = pending.restore(self.root, lambda _, half: self._take(pair_key(half.headers), half, limit=False))
        if files:
            log.info("payload sink: restored unpaired events from %d files (%d pending, %d pairs)", files,
                     len(self._pending), len(self._pairs))
