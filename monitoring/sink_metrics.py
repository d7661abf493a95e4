"""The monitor's Prometheus metrics: the sink's counters, gauges and histogram (a registry per sink,
so tests can run many), and the drift gauges the monitoring check publishes through `POST /drift`
(module-level: whatever in this process sets them, /metrics serves them beside the sink's)."""
from __future__ import annotations

import math
from contextlib import suppress
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitoring import windows

FLUSH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Per-feature metric names, as `DriftReport.metrics()` writes them: `<stat>_<feature>`.
FEATURE_STATS = ("missing_rate", "drifted", "psi", "p_adjusted", "p_value", "statistic")

# Drift gauges: module-level, so the check (or anything in this process) can set them with
# `set_drift_gauges`, and /metrics serves them beside the sink's.
DRIFT_REGISTRY = CollectorRegistry(auto_describe=True)
DRIFT = Gauge("flywheel_monitor_drift", "The latest monitoring check's model-level metrics (prediction PSI, "
              "live ROC AUC, breaches, rows, ...)", ["model_version", "metric"], registry=DRIFT_REGISTRY)
FEATURE_DRIFT = Gauge("flywheel_monitor_feature_drift", "The latest monitoring check's per-feature statistics "
                      "(psi, p_value, p_adjusted, missing_rate, drifted)", ["model_version", "feature", "stat"],
                      registry=DRIFT_REGISTRY)
_SET: dict[str, set[tuple]] = {}  # model version -> label sets it has now, to clear stale ones


def set_drift_gauges(report_metrics: dict, model_version) -> int:
    """Publish one check's flat metrics (`DriftReport.metrics()`) as gauges of `model_version`:
    keys `<stat>_<feature>` with a stat of `FEATURE_STATS` (`psi_age`, `missing_rate_age`, ...) go to
    `flywheel_monitor_feature_drift{feature, stat}`, every other key (`rows`, `prediction_psi`,
    `live_roc_auc`, `breaches`, `quality_*`, ...) to `flywheel_monitor_drift{metric}`. Booleans
    count as 0/1; None and non-finite values are skipped. Gauges of this version that the new
    check no longer reports are removed. Returns the number of gauges set.

    Raises:
        ValueError: a key is not text or a value is not a number.
    """
    version = str(model_version or windows.UNKNOWN_VERSION)
    now: set[tuple] = set()
    values = []
    for key, value in report_metrics.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metric names must be text, got {key!r}")
        if value is None:
            continue
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)):
            raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            continue
        stat = next((s for s in FEATURE_STATS if key.startswith(s + "_") and len(key) > len(s) + 1), None)
        if stat is not None:
            labels = (FEATURE_DRIFT, version, key[len(stat) + 1:], stat)
        else:
            labels = (DRIFT, version, key)
        values.append((labels, float(value)))
        now.add(labels)
    for gauge, *names in _SET.get(version, set()) - now:
        with suppress(KeyError):
            gauge.remove(*names)
    for (gauge, *names), value in values:
        gauge.labels(*names).set(value)
    _SET[version] = now
    return len(values)


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
