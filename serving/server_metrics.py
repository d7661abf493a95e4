"""Prometheus metrics of both servers, served on the ModelServer's own `/metrics` (KServe exposes
prometheus_client's default registry there).

KServe 0.21 has pre/predict/postprocess histograms but no request counter, no status codes and no
model version (its `request_*_seconds` carry only `model_name`); these add them:

    flywheel_serving_requests_total{component, model_name, model_version, protocol, code}
    flywheel_serving_request_seconds{component, model_name, model_version, protocol}
    flywheel_serving_stage_seconds{component, model_name, model_version, stage}
    flywheel_serving_hop_seconds{model_name, model_version, protocol}
    flywheel_serving_payload_events_total{outcome}, flywheel_serving_payload_queue_depth

`code` is the HTTP status (gRPC calls count under the HTTP status their gRPC code stands for).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

# Sub-millisecond to seconds: the hop is ~0.3 ms on localhost, a big batch tens of milliseconds.
BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
SERVER_LABELS = ("component", "model_name", "model_version")

REQUESTS = Counter("flywheel_serving_requests", "Inference requests by status code",
                   [*SERVER_LABELS, "protocol", "code"])
REQUEST_SECONDS = Histogram("flywheel_serving_request_seconds", "Inference request latency, receipt to response",
                            [*SERVER_LABELS, "protocol"], buckets=BUCKETS)
STAGE_SECONDS = Histogram("flywheel_serving_stage_seconds", "Latency of one stage of an inference request",
                          [*SERVER_LABELS, "stage"], buckets=BUCKETS)
HOP_SECONDS = Histogram("flywheel_serving_hop_seconds", "Transformer to predictor call latency",
                        ["model_name", "model_version", "protocol"], buckets=BUCKETS)
PAYLOAD_EVENTS = Counter("flywheel_serving_payload_events", "Payload events by outcome (sent, failed, dropped)",
                         ["outcome"])
PAYLOAD_QUEUE = Gauge("flywheel_serving_payload_queue_depth", "Payload events waiting to be sent")
INFERENCE_SUFFIXES = (":predict", "/infer")  # v1 and v2 REST inference paths


class ServerMetrics:
    """The metrics of one server (a component serving one model); the version can change once
    it is known (the transformer learns it from its predictor).

    Args:
        component: "predictor" or "transformer".
        model_name: The served model's name.
        model_version: Its version, or None until known.
    """

    def __init__(self, component: str, model_name: str, model_version: str | None = None):
        self.component, self.model_name = component, model_name
        self.model_version = model_version or "unknown"
        self._children: dict[tuple, object] = {}  # bound label sets: .labels() costs more than .observe()

    def _child(self, metric, *extra: str):
        key = (metric, self.model_version, *extra)
        child = self._children.get(key)
        if child is None:
            if metric is HOP_SECONDS:
                child = metric.labels(self.model_name, self.model_version, *extra)
            else:
                child = metric.labels(self.component, self.model_name, self.model_version, *extra)
            self._children[key] = child
        return child

    def request(self, protocol: str, code: int, seconds: float) -> None:
        """Count one inference request and its latency."""
        self._child(REQUESTS, protocol, str(code)).inc()
        self._child(REQUEST_SECONDS, protocol).observe(seconds)

    @contextmanager
    def stage(self, name: str):
        """Time a block as stage `name` (preprocess, predict, postprocess)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._child(STAGE_SECONDS, name).observe(time.perf_counter() - started)

    def hop(self, protocol: str, seconds: float) -> None:
        self._child(HOP_SECONDS, protocol).observe(seconds)


class HttpMetricsMiddleware:
    """Pure ASGI middleware: counts REST inference requests by status code and times them,
    including the requests KServe rejects before a model sees them.

    Args:
        app: The ASGI app it wraps.
        metrics: The server's metrics.
    """

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.endswith(INFERENCE_SUFFIXES):
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            protocol = "v1" if path.endswith(":predict") else "v2"
            self.metrics.request(protocol, status[0], time.perf_counter() - started)
