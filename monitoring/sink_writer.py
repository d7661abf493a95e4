"""The payload sink's writing half: buffered pairs out to window files, in the background.

`PayloadSink` (monitoring/sink.py) takes events and pairs them; this mixin holds the pairs until a
flush writes them: when `flush_events` rows are waiting, when buffered pairs reach a quarter of a
bound, when the oldest has waited `flush_seconds`, and on `close()`. A flush swaps the buffered
pairs out under the sink's lock, then encodes and writes them without it (new events keep filling
a fresh buffer; the pairs being written still count against the bounds). It writes one Parquet
file per (model version, date, hour) partition (`monitoring.rows.partitions`); a failed write
puts its rows back and the next background flush waits, backing off from 0.5 s to 30 s, so an
accepted event is either on disk or still in memory, never dropped.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import storage
from monitoring import windows
from monitoring.rows import Pair, encode, partitions
from monitoring.sink_metrics import SinkMetrics
from specs.monitoring import SinkSpec

log = logging.getLogger("flywheel.monitoring")


class WindowWriter:
    """Buffered pairs and the background flush of `PayloadSink`; the sink sets the shared state."""

    # Set by PayloadSink.__init__ (the lock and condition guard this mixin's state too).
    root: str
    spec: SinkSpec
    metrics: SinkMetrics
    totals: dict
    full: bool
    _lock: threading.Lock
    _wake: threading.Condition
    _closing: bool
    expire: Callable[[], int]

    def _init_writer(self, write: Callable[[str, bytes], object] | None) -> None:
        """The buffer starts empty; `write(uri, bytes)` writes a file (`storage.write_atomic` by default)."""
        self._write = write or storage.write_atomic
        self._flushing = threading.Lock()
        self._pairs: list[Pair] = []
        self._rows = 0  # rows in _pairs
        self._writing = 0  # events of the pairs a flush is writing now
        self._pairs_bytes = self._writing_bytes = 0  # body bytes of _pairs, and of the pairs a flush is writing
        self._oldest: float | None = None  # monotonic time the oldest buffered pair was made
        self._retry_at = 0.0
        self._backoff = 0.0

    def _buffer(self, pair: Pair) -> None:
        """Buffer a new pair (the lock held); wake the flush when the buffer is worth one."""
        self._pairs.append(pair)
        self._rows += pair.rows
        self._pairs_bytes += pair.size
        if self._oldest is None:
            self._oldest = time.monotonic()
        if self._big():
            self._wake.notify()

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
            failed = []
            written = sum(self._write_partition(version, group, failed) for version, group in partitions(pairs))
            with self._lock:
                self._settle(failed)
            self.metrics.flush_seconds.observe(time.perf_counter() - started)
            if failed:
                self.metrics.flush_errors.inc()
            return written

    def _write_partition(self, version: str, group: list[Pair], failed: list[Pair]) -> int:
        """Write one partition's file; its rows written, or 0 with `group` added to `failed`."""
        try:
            self._write(windows.window_file(self.root, version, group[0].event_time), encode(group))
        except Exception as err:
            log.error("payload sink: writing %d rows of %s failed, kept for a retry: %s",
                      sum(p.rows for p in group), version, err)
            failed.extend(group)
            return 0
        rows = sum(p.rows for p in group)
        self.metrics.rows.labels(version).inc(rows)
        self.totals["rows"] += rows
        self.metrics.files.inc()
        with self._lock:
            self._writing -= 2 * len(group)
            self._writing_bytes -= sum(p.size for p in group)
        return rows

    def _settle(self, failed: list[Pair]) -> None:
        """After a flush (the lock held): failed pairs back to the buffer in one step, always
        counted against the bounds, and the next retry backed off; or the backoff reset."""
        if failed:
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
