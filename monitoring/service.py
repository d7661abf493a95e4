"""The monitor service: the payload sink over HTTP, ground truth, drift gauges and the Alertmanager hook.

    python -m monitoring.service --root URI --port P [--host H] [--config FILE]

`--config` is a rendered config file (YAML or JSON, no secrets): the sink's settings and what the
env's guarded retraining trigger needs (`monitoring.trigger.trigger_from_file`); without it the sink
has its defaults and `/alerts` starts nothing.

Endpoints (errors are `{"error": message}`):

* `POST /events`: one binary-mode CloudEvent from the KServe logger (or `serving/payload.py`):
  202 accepted; 400, 415, 422 refused (why in the message), 413 over `MAX_EVENT_BYTES`; 503 with
  `Retry-After` while memory is at its bound (the store does not keep up) or the sink is closing
  (`monitoring.sink`), counted in `flywheel_monitor_rejected_events_total{type, reason}`.
* `POST /ground_truth`: `[{"request_id", "truth"[, "instance"]}, ...]` (or `{"rows": [...]}`),
  written as one file under `<root>/ground_truth/` (202); dropping Parquet files there works too.
* `POST /drift`: `{"model_version": v, "metrics": {name: number}}` from the monitoring check;
  sets the drift gauges (`monitoring.sink_metrics.set_drift_gauges`) so Prometheus sees the latest check.
* `POST /alerts`: an Alertmanager webhook (payload version 4). Firing alerts labelled
  `flywheel_action="retrain"` are handed to the trigger the app was made with, as the same payload
  holding only those alerts (`monitoring.alerts`); the trigger's decision comes back in a 202.
  Malformed payloads: 400.
* `GET /healthz` (503 while draining), `GET /metrics` (Prometheus text).

SIGTERM (or SIGINT): `/healthz` answers 503 at once, the server stops listening, requests in flight
(and events already on open connections) finish and are taken, then the flush in flight finishes,
every buffered row is written and unpaired halves are kept under `_pending/`;
the process exits 0 (1 when rows could not be written). One worker: the sink's buffer and its
pairing live in this process, so both events of a call must reach the same replica (run one).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pandas as pd
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from monitoring import windows
from monitoring.alerts import RETRAIN_LABEL, RETRAIN_VALUE, alert_problems, alert_trigger, retrain_alerts
from monitoring.events import loads
from monitoring.sink import PayloadSink
from monitoring.sink_metrics import DRIFT_REGISTRY, set_drift_gauges
from specs.monitoring import MonitoringSpec, SinkSpec

log = logging.getLogger("flywheel.monitoring")

MAX_INSTANCE = 1 << 31  # window files hold `instance` as int32
MAX_EVENT_BYTES = 32 << 20  # an event body larger than this is a 413 (KServe itself has no REST body limit)


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
        raise ValueError("expected a non-empty list of {request_id, truth[, instance]} or {entity_column, "
                         "entity_id, truth} (or {\"rows\": [...]})")
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"rows[{k}] is not an object")
        if "request_id" not in row and "entity_column" in row:
            _check_entity(row, k)
        elif not isinstance(row.get("request_id"), str) or not row["request_id"]:
            raise ValueError(f"rows[{k}].request_id must be a non-empty string (or give entity_column and entity_id)")
        if not isinstance(row.get("truth"), (str, int, float, bool)):
            raise ValueError(f"rows[{k}].truth must be a label (string or number)")
        instance = row.get("instance")
        if instance is not None and (not isinstance(instance, int) or isinstance(instance, bool)
                                     or not 0 <= instance < MAX_INSTANCE):
            raise ValueError(f"rows[{k}].instance must be a row index (an integer from 0 to {MAX_INSTANCE - 1})")
    frame = pd.DataFrame({"request_id": [r.get("request_id") for r in rows],
                          "truth": [str(r["truth"]) for r in rows]})
    if any("instance" in r for r in rows):
        frame["instance"] = pd.array([r.get("instance") for r in rows], dtype="Int64")
    if any("entity_column" in r for r in rows):
        frame["entity_column"] = [r.get("entity_column") for r in rows]
        frame["entity_id"] = [None if r.get("entity_id") is None else str(r["entity_id"]) for r in rows]
    return frame


def _check_entity(row: dict, k: int) -> None:
    """A row keyed by entity: the dataset's id column (as the requests sent it) and its value."""
    if not isinstance(row.get("entity_column"), str) or not row["entity_column"]:
        raise ValueError(f"rows[{k}].entity_column must name the id column (e.g. the dataset's id_column)")
    value = row.get("entity_id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"rows[{k}].entity_id must be the entity's id (a string or an integer)")
    if "instance" in row:
        raise ValueError(f"rows[{k}]: instance goes with request_id, not with an entity")



async def _events(request: Request) -> Response:
    sink: PayloadSink = request.app.state.sink
    outcome = sink.accept(request.headers, await request.body())
    if outcome.accepted:
        return JSONResponse({"status": "accepted", "message": outcome.message}, status_code=outcome.status)
    headers = {"Retry-After": str(math.ceil(outcome.retry_after))} if outcome.retry_after else None
    return _error(outcome.status, outcome.message, headers)


async def _ground_truth(request: Request) -> Response:
    sink: PayloadSink = request.app.state.sink
    try:
        frame = ground_truth_rows(await _json_body(request))
    except _BadRequest as err:
        return _error(400, str(err))
    except ValueError as err:
        return _error(422, str(err))
    uri = await run_in_threadpool(windows.write_ground_truth, sink.root, frame)
    sink.metrics.ground_truth.inc(len(frame))
    return JSONResponse({"written": len(frame), "uri": uri}, status_code=202)


async def _drift(request: Request) -> Response:
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


async def _alerts(request: Request) -> Response:
    counted, trigger = request.app.state.sink.metrics.alerts, request.app.state.trigger
    try:
        payload = await _json_body(request)
    except _BadRequest as err:
        counted.labels("invalid").inc()
        return _error(400, str(err))
    problems = alert_problems(payload)
    if problems:
        counted.labels("invalid").inc()
        return _error(400, "not an Alertmanager webhook payload: " + "; ".join(problems))
    wanted = retrain_alerts(payload)
    if not wanted:
        counted.labels("ignored").inc()
        return JSONResponse({"triggered": False, "reason": f"no firing alert labelled "
                             f"{RETRAIN_LABEL}={RETRAIN_VALUE!r}"}, status_code=202)
    if trigger is None:
        log.warning("%d retraining alerts received, but no trigger is configured", len(wanted))
        counted.labels("ignored").inc()
        return JSONResponse({"triggered": False, "alerts": len(wanted),
                             "reason": "no retraining trigger is configured"}, status_code=202)
    try:
        decision = await run_in_threadpool(trigger, {**payload, "alerts": wanted})
    except Exception as err:  # a 5xx: Alertmanager retries the notification
        log.exception("the retraining trigger failed")
        counted.labels("failed").inc()
        return _error(500, f"the retraining trigger failed: {err}")
    counted.labels("triggered").inc()
    return JSONResponse({"triggered": True, "alerts": len(wanted), "decision": decision}, status_code=202)


async def _healthz(request: Request) -> Response:
    stats = request.app.state.sink.stats()
    return JSONResponse({"status": "draining" if stats["draining"] else "ok", **stats},
                        status_code=503 if stats["draining"] else 200)


async def _metrics(request: Request) -> Response:
    registry = request.app.state.sink.metrics.registry
    return Response(generate_latest(registry) + generate_latest(DRIFT_REGISTRY), media_type=CONTENT_TYPE_LATEST)


def create_app(sink: PayloadSink, trigger: Callable[[dict], dict] | None = None) -> EventsFastPath:
    """The monitor's ASGI app around `sink`; `trigger` gets the retraining alerts (see the module doc).
    Closing the app (lifespan shutdown) closes the sink."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(sink.close)

    app = Starlette(routes=[
        Route("/events", _events, methods=["POST"]),
        Route("/ground_truth", _ground_truth, methods=["POST"]),
        Route("/drift", _drift, methods=["POST"]),
        Route("/alerts", _alerts, methods=["POST"]),
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.sink, app.state.trigger = sink, trigger
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

def read_config(path: str) -> dict:
    """A rendered config file (YAML, of which JSON is a subset) as a mapping; one line when it is not."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--config {path}: no such file (render it from the env's config)")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise SystemExit(f"--config {path}: not YAML or JSON: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping, got {type(data).__name__}")
    return data


TRIGGER_KEYS = ("env", "retraining", "kfp")  # a rendered file holding none of them describes no trigger


def sink_spec(path: str | None) -> SinkSpec:
    """The sink's settings from the rendered config file at `path`: its `sink` section (root:
    `sink_root` unless the section names one), its `monitoring` section's `sink`, or the file as a
    bare sink spec; None: the defaults."""
    if not path:
        return SinkSpec()
    data = read_config(path)
    try:
        if isinstance(data.get("monitoring"), dict):
            return MonitoringSpec.model_validate(data["monitoring"]).sink
        if "sink" in data or "sink_root" in data:
            root = {"root": data["sink_root"]} if data.get("sink_root") else {}
            return SinkSpec.model_validate({**root, **(data.get("sink") or {})})
        return SinkSpec.model_validate(data)
    except ValueError as err:  # pydantic's ValidationError: every wrong key, on one line
        raise SystemExit(f"--config {path}: {' '.join(str(err).split())}") from None


def alert_hook(path: str | None) -> Callable[[dict], dict] | None:
    """The app's trigger: the env's guarded trigger the rendered config file describes
    (`monitoring.trigger.trigger_from_file`), adapted to alerts; None when it describes none."""
    if not path or not any(key in read_config(path) for key in TRIGGER_KEYS):
        return None
    from monitoring.trigger import trigger_from_file

    try:
        guarded = trigger_from_file(path)
    except ValueError as err:
        raise SystemExit(str(err)) from None  # it names the file and what is missing
    return alert_trigger(guarded.fire) if guarded is not None else None


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
    parser.add_argument("--root", help="storage URI of the windows (default: the config's sink root)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address; a pod's container passes 0.0.0.0 (default: loopback only)")
    parser.add_argument("--config", help="rendered config file: the sink's settings and the retraining trigger's")
    parser.add_argument("--buffer-events", type=int, help="override the sink's buffer_events")
    parser.add_argument("--flush-events", type=int, help="override the sink's flush_events")
    parser.add_argument("--flush-seconds", type=float, help="override the sink's flush_seconds")
    parser.add_argument("--pending-seconds", type=float, default=60.0,
                        help="how long an unpaired request or response waits for its other half")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = sink_spec(args.config)
    overrides = {k: v for k, v in {"buffer_events": args.buffer_events, "flush_events": args.flush_events,
                                   "flush_seconds": args.flush_seconds}.items() if v is not None}
    spec = SinkSpec.model_validate({**spec.model_dump(), **overrides})
    return serve(args.root or spec.root, args.port, spec, host=args.host, trigger=alert_hook(args.config),
                 pending_seconds=args.pending_seconds, log_level=args.log_level)


if __name__ == "__main__":
    raise SystemExit(main())
