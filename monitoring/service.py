"""The monitor service: the payload sink over HTTP, ground truth, drift gauges and the Alertmanager hook.

    python -m monitoring.service --root URI --port P [--host H] [--config ENV_OR_FILE]

Endpoints (errors are `{"error": message}`):

* `POST /events`: one binary-mode CloudEvent from the KServe logger (or `serving/payload.py`):
  202 accepted; 400, 415, 422 refused (why in the message), 413 over `MAX_EVENT_BYTES`; 503 with
  `Retry-After` while memory is at its bound (the store does not keep up) or the sink is closing
  (`monitoring.sink`), counted in `flywheel_monitor_rejected_events_total{type, reason}`.
* `POST /ground_truth`: `[{"request_id", "truth"[, "instance"]}, ...]` (or `{"rows": [...]}`),
  written as one file under `<root>/ground_truth/` (202); dropping Parquet files there works too.
* `POST /drift`: `{"model_version": v, "metrics": {name: number}}` from the monitoring check;
  sets the drift gauges (`set_drift_gauges`) so Prometheus sees the latest check.
* `POST /alerts`: an Alertmanager webhook (payload version 4). Firing alerts labelled
  `flywheel_action="retrain"` are handed to the trigger the app was made with, as the same payload
  holding only those alerts; the trigger's decision comes back in a 202. Malformed payloads: 400.
* `GET /healthz` (503 while draining), `GET /metrics` (Prometheus text).

SIGTERM (or SIGINT): `/healthz` answers 503 at once, the server stops listening, requests in flight
(and events already on open connections) finish and are taken, then the flush in flight finishes,
every buffered row is written and unpaired halves are kept under `_pending/`;
the process exits 0 (1 when rows could not be written). One worker: the sink's buffer and its
pairing live in this process, so both events of a call must reach the same replica (run one).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import signal
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path

import pandas as pd
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from monitoring import windows
from monitoring.sink import PayloadSink, loads
from specs.monitoring import MonitoringSpec, SinkSpec

log = logging.getLogger("flywheel.monitoring")

RETRAIN_LABEL, RETRAIN_VALUE = "flywheel_action", "retrain"
# Per-feature metric names, as `DriftReport.metrics()` writes them: `<stat>_<feature>`.
FEATURE_STATS = ("missing_rate", "drifted", "psi", "p_adjusted", "p_value", "statistic")
ALERT_STATUSES = ("firing", "resolved")
MAX_INSTANCE = 1 << 31  # window files hold `instance` as int32
MAX_EVENT_BYTES = 32 << 20  # an event body larger than this is a 413 (KServe itself has no REST body limit)

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


# ---- the app -------------------------------------------------------------------------------------

def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _json_body(request: Request):
    body = await request.body()
    try:
        return loads(body)
    except ValueError as err:
        raise _BadRequest(f"the body is not JSON: {err}") from None


class _BadRequest(Exception):
    pass


def ground_truth_rows(data) -> pd.DataFrame:
    """Checked ground-truth rows from a JSON body (ValueError says what is wrong)."""
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise ValueError("expected a non-empty list of {request_id, truth[, instance]} (or {\"rows\": [...]})")
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"rows[{k}] is not an object")
        if not isinstance(row.get("request_id"), str) or not row["request_id"]:
            raise ValueError(f"rows[{k}].request_id must be a non-empty string")
        if not isinstance(row.get("truth"), (str, int, float, bool)):
            raise ValueError(f"rows[{k}].truth must be a label (string or number)")
        instance = row.get("instance")
        if instance is not None and (not isinstance(instance, int) or isinstance(instance, bool)
                                     or not 0 <= instance < MAX_INSTANCE):
            raise ValueError(f"rows[{k}].instance must be a row index (an integer from 0 to {MAX_INSTANCE - 1})")
    frame = pd.DataFrame({"request_id": [r["request_id"] for r in rows], "truth": [str(r["truth"]) for r in rows]})
    if any("instance" in r for r in rows):
        frame["instance"] = pd.array([r.get("instance") for r in rows], dtype="Int64")
    return frame


def alert_problems(payload) -> list[str]:
    """What makes `payload` not an Alertmanager webhook payload (version 4); empty when it is one."""
    if not isinstance(payload, dict):
        return ["the payload is not a JSON object"]
    problems = []
    if payload.get("version") != "4":
        problems.append(f"version must be \"4\" (Alertmanager's webhook format), got {payload.get('version')!r}")
    if payload.get("status") not in ALERT_STATUSES:
        problems.append(f"status must be one of {ALERT_STATUSES}, got {payload.get('status')!r}")
    for key in ("receiver", "groupKey"):
        if not isinstance(payload.get(key), str):
            problems.append(f"{key} must be a string")
    for key in ("groupLabels", "commonLabels", "commonAnnotations"):
        if key in payload and not isinstance(payload[key], dict):
            problems.append(f"{key} must be an object")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        return [*problems, "alerts must be a list"]
    for k, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            problems.append(f"alerts[{k}] is not an object")
            continue
        if alert.get("status") not in ALERT_STATUSES:
            problems.append(f"alerts[{k}].status must be one of {ALERT_STATUSES}")
        labels = alert.get("labels")
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            problems.append(f"alerts[{k}].labels must be an object of strings")
        if "annotations" in alert and not isinstance(alert["annotations"], dict):
            problems.append(f"alerts[{k}].annotations must be an object")
        if not isinstance(alert.get("startsAt"), str):
            problems.append(f"alerts[{k}].startsAt must be a time string")
    return problems


def retrain_alerts(payload: dict) -> list[dict]:
    """The firing alerts of a webhook payload that ask for retraining."""
    return [a for a in payload["alerts"]
            if a["status"] == "firing" and a["labels"].get(RETRAIN_LABEL) == RETRAIN_VALUE]


def alert_trigger(fire: Callable[[list[str], str, str], dict]) -> Callable[[dict], dict]:
    """Adapt a `fire(reasons, source, dedup_key) -> decision` (`monitoring.trigger.GuardedTrigger.fire`)
    to the app's trigger: reasons are the alerts' names and summaries, and the dedup key is made of
    their fingerprints and start times, so Alertmanager repeating the same notification is one key."""

    def trigger(payload: dict) -> dict:
        reasons, keys = [], []
        for alert in payload["alerts"]:
            labels, notes = alert["labels"], alert.get("annotations") or {}
            name = labels.get("alertname", "alert")
            summary = notes.get("summary") or notes.get("description") or ""
            reasons.append(f"alert {name}" + (f": {summary}" if summary else ""))
            keys.append(f"{alert.get('fingerprint') or name}@{alert.get('startsAt', '')}")
        return fire(reasons, "alert", "alert/" + ",".join(sorted(keys)))

    return trigger


def create_app(sink: PayloadSink, trigger: Callable[[dict], dict] | None = None) -> EventsFastPath:
    """The monitor's ASGI app around `sink`; `trigger` gets the retraining alerts (see the module doc).
    Closing the app (lifespan shutdown) closes the sink."""
    registry = sink.metrics.registry
    alerts_total, ground_truth_total = sink.metrics.alerts, sink.metrics.ground_truth

    async def events(request: Request) -> Response:
        outcome = sink.accept(request.headers, await request.body())
        if outcome.accepted:
            return JSONResponse({"status": "accepted", "message": outcome.message}, status_code=outcome.status)
        headers = {"Retry-After": str(math.ceil(outcome.retry_after))} if outcome.retry_after else None
        return _error(outcome.status, outcome.message, headers)

    async def ground_truth(request: Request) -> Response:
        try:
            frame = ground_truth_rows(await _json_body(request))
        except _BadRequest as err:
            return _error(400, str(err))
        except ValueError as err:
            return _error(422, str(err))
        uri = await run_in_threadpool(windows.write_ground_truth, sink.root, frame)
        ground_truth_total.inc(len(frame))
        return JSONResponse({"written": len(frame), "uri": uri}, status_code=202)

    async def drift(request: Request) -> Response:
        try:
            data = await _json_body(request)
        except _BadRequest as err:
            return _error(400, str(err))
        if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
            return _error(400, "expected {\"model_version\": ..., \"metrics\": {name: number}}")
        version = data.get("model_version")
        if version is not None and not isinstance(version, (str, int)):
            return _error(400, "model_version must be a string")
        try:
            count = set_drift_gauges(data["metrics"], version)
        except ValueError as err:
            return _error(422, str(err))
        return JSONResponse({"gauges": count, "model_version": str(version or windows.UNKNOWN_VERSION)})

    async def alerts(request: Request) -> Response:
        try:
            payload = await _json_body(request)
        except _BadRequest as err:
            alerts_total.labels("invalid").inc()
            return _error(400, str(err))
        problems = alert_problems(payload)
        if problems:
            alerts_total.labels("invalid").inc()
            return _error(400, "not an Alertmanager webhook payload: " + "; ".join(problems))
        wanted = retrain_alerts(payload)
        if not wanted:
            alerts_total.labels("ignored").inc()
            return JSONResponse({"triggered": False, "reason": f"no firing alert labelled "
                                 f"{RETRAIN_LABEL}={RETRAIN_VALUE!r}"}, status_code=202)
        if trigger is None:
            log.warning("%d retraining alerts received, but no trigger is configured", len(wanted))
            alerts_total.labels("ignored").inc()
            return JSONResponse({"triggered": False, "alerts": len(wanted),
                                 "reason": "no retraining trigger is configured"}, status_code=202)
        try:
            decision = await run_in_threadpool(trigger, {**payload, "alerts": wanted})
        except Exception as err:  # a 5xx: Alertmanager retries the notification
            log.exception("the retraining trigger failed")
            alerts_total.labels("failed").inc()
            return _error(500, f"the retraining trigger failed: {err}")
        alerts_total.labels("triggered").inc()
        return JSONResponse({"triggered": True, "alerts": len(wanted), "decision": decision}, status_code=202)

    async def healthz(request: Request) -> Response:
        stats = sink.stats()
        return JSONResponse({"status": "draining" if stats["draining"] else "ok", **stats},
                            status_code=503 if stats["draining"] else 200)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry) + generate_latest(DRIFT_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(sink.close)

    app = Starlette(routes=[
        Route("/events", events, methods=["POST"]),
        Route("/ground_truth", ground_truth, methods=["POST"]),
        Route("/drift", drift, methods=["POST"]),
        Route("/alerts", alerts, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], lifespan=lifespan)
    return EventsFastPath(app, sink)


class EventsFastPath:
    """`POST /events` as plain ASGI in front of the Starlette app (which serves everything else,
    and the same route too): the hot path skips routing, the Request object and JSON response
    rendering, about a third of the per-event cost under uvicorn."""

    def __init__(self, app: Starlette, sink: PayloadSink):
        self.app, self.sink = app, sink
        self._bodies: dict[tuple[int, str], bytes] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/events":
            return await self.app(scope, receive, send)
        chunks, more, size = [], True, 0
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_EVENT_BYTES:
                self.sink.metrics.event("other", 413)
                return await self._send(send, 413, {"error": f"the event is over {MAX_EVENT_BYTES} bytes"})
            chunks.append(chunk)
            more = message.get("more_body", False)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        outcome = self.sink.accept(headers, b"".join(chunks))
        key = "status" if outcome.accepted else "error"
        body = self._bodies.get((outcome.status, outcome.message))  # the messages are few: render each once
        if body is None:
            body = json.dumps({key: "accepted", "message": outcome.message} if outcome.accepted
                              else {key: outcome.message}).encode()
            if len(self._bodies) < 1000:
                self._bodies[(outcome.status, outcome.message)] = body
        await self._send(send, outcome.status, body, outcome.retry_after)

    @staticmethod
    async def _send(send, status: int, body: bytes | dict, retry_after: float | None = None) -> None:
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry_after:
            headers.append((b"retry-after", str(math.ceil(retry_after)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# ---- configuration and the process ---------------------------------------------------------------

CONFIG_DIR = Path(os.environ.get("FLYWHEEL_CONFIG_DIR") or Path(__file__).resolve().parent.parent / "config")


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def sink_spec(config: str | None) -> SinkSpec:
    """The sink's settings: `config` is an environment name (its `monitoring` section of
    config/base.yaml deep-merged with config/<env>.yaml, as pipelines/config.py merges them) or a
    YAML file holding a `monitoring` section or a sink spec; None: the defaults."""
    import yaml

    if not config:
        return SinkSpec()
    path = Path(config)
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        data = data.get("monitoring", data) if isinstance(data, dict) else {}
        return MonitoringSpec.model_validate(data).sink if "sink" in data else SinkSpec.model_validate(data)
    env_file = CONFIG_DIR / f"{config}.yaml"
    if not env_file.is_file():
        raise SystemExit(f"--config {config}: no file {config} and no environment {env_file}")
    merged: dict = {}
    for file in (CONFIG_DIR / "base.yaml", env_file):
        if file.is_file():
            merged = _merge(merged, (yaml.safe_load(file.read_text()) or {}).get("monitoring") or {})
    return MonitoringSpec.model_validate(merged).sink


def load_trigger(reference: str | None) -> Callable[[dict], dict] | None:
    """`module:attribute` naming the trigger callable (a class is instantiated with no arguments)."""
    if not reference:
        return None
    module, _, attribute = reference.partition(":")
    target = getattr(importlib.import_module(module), attribute or "trigger")
    if isinstance(target, type):
        target = target()
    return target


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, but the first SIGTERM drains the sink (not ready) before the usual graceful stop, and
        the signal is not re-raised after shutdown (so a clean stop exits 0)."""

        sink: PayloadSink

        def handle_exit(self, sig, frame):
            self.sink.drain()
            super().handle_exit(sig, frame)

        @contextmanager
        def capture_signals(self):
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def serve(root: str, port: int, spec: SinkSpec | None = None, host: str = "127.0.0.1",
          trigger: Callable[[dict], dict] | None = None, pending_seconds: float = 60.0,
          log_level: str = "info") -> int:
    """Run the monitor until SIGTERM; returns the exit code (0: everything accepted is written)."""
    import uvicorn

    spec = (spec or SinkSpec()).model_copy(update={"root": root})
    sink = PayloadSink(root, spec, pending_seconds=pending_seconds)
    app = create_app(sink, trigger)
    config = uvicorn.Config(app, host=host, port=port, workers=1, log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=30)
    server = _server_class()(config)
    server.sink = sink
    log.info("monitor on %s:%d, windows in %s (buffer %d events, flush %d rows / %.1f s)", host, port, root,
             spec.buffer_events, spec.flush_events, spec.flush_seconds)
    server.run()
    clean = sink.close()
    return 0 if clean else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="storage URI of the windows (default: the config's monitoring.sink.root)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address; a pod's container passes 0.0.0.0 (default: loopback only)")
    parser.add_argument("--config", help="environment name (config/<env>.yaml) or a YAML file with monitoring.sink")
    parser.add_argument("--buffer-events", type=int, help="override monitoring.sink.buffer_events")
    parser.add_argument("--flush-events", type=int, help="override monitoring.sink.flush_events")
    parser.add_argument("--flush-seconds", type=float, help="override monitoring.sink.flush_seconds")
    parser.add_argument("--pending-seconds", type=float, default=60.0,
                        help="how long an unpaired request or response waits for its other half")
    parser.add_argument("--trigger", help="module:callable receiving firing retraining alerts")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.config and not args.config.endswith((".yaml", ".yml")):
        os.environ.setdefault("FLYWHEEL_ENV", args.config)  # the env whose trigger an alert fires
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = sink_spec(args.config)
    overrides = {k: v for k, v in {"buffer_events": args.buffer_events, "flush_events": args.flush_events,
                                   "flush_seconds": args.flush_seconds}.items() if v is not None}
    spec = SinkSpec.model_validate({**spec.model_dump(), **overrides})
    return serve(args.root or spec.root, args.port, spec, host=args.host, trigger=load_trigger(args.trigger),
                 pending_seconds=args.pending_seconds, log_level=args.log_level)


if __name__ == "__main__":
    raise SystemExit(main())
