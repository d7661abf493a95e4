"""What the predictor and the transformer share around KServe's ModelServer: the command line
(KServe's own parser as the parent, so the controller's arguments work), the middlewares and error
handlers on its FastAPI app, readiness, logging and start-up on `--host`
(127.0.0.1 unless told otherwise; `serving.endpoints` has the servers and routes). Torch-free.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import time

from kserve import InferRequest, Model
from kserve.model import InferenceVerb

from serving.errors import BAD_REQUEST, INTERNAL, RequestError
from serving.ports import port_in_use
from serving.rpc_errors import RpcRequestError
from specs.serving import ServingSpec

log = logging.getLogger("flywheel.serving")
DEFAULTS = ServingSpec()
LOOPBACK = "127.0.0.1"
HOST_ENV = "FLYWHEEL_SERVING_HOST"  # the image sets 0.0.0.0 (Dockerfile): a pod is reached from outside
class ServingModel(Model):
    """What both servers' models share on top of `kserve.Model`: a `RequestError` leaves as the
    status it carries on REST and gRPC alike, gRPC inference calls are counted (REST ones are
    counted by the HTTP middleware), and the payload goes from preprocess to predict untouched
    (KServe's `validate` expects a dict or an InferRequest there).

    Args:
        name: The model name on the endpoints.
        metrics: The server's `ServerMetrics`.
    """

    def __init__(self, name: str, metrics):
        super().__init__(name)
        self.metrics = metrics

    async def __call__(self, body, headers=None, verb=InferenceVerb.PREDICT):
        over_grpc = isinstance(body, InferRequest) and body.from_grpc
        started, code = time.perf_counter(), 200
        try:
            return await super().__call__(body, headers, verb)
        except RpcRequestError as error:
            code = error.status
            raise
        except RequestError as error:
            code = error.status
            raise RpcRequestError(error) from None
        except Exception:
            code = INTERNAL
            raise
        finally:
            if over_grpc:
                self.metrics.request("grpc", code, time.perf_counter() - started)

    def validate(self, payload):
        return payload


def parser(description: str) -> argparse.ArgumentParser:
    """KServe's ModelServer arguments plus the ones both servers add."""
    from kserve import model_server

    cli = argparse.ArgumentParser(description=description, parents=[model_server.parser])
    cli.add_argument("--host", default=os.environ.get(HOST_ENV) or LOOPBACK,
                     help=f"address the REST and gRPC servers bind (default ${HOST_ENV}, else {LOOPBACK}); "
                          "0.0.0.0 serves every interface, as a container must")
    cli.add_argument("--model_dir", required=True,
                     help="model directory: a path (/mnt/models), a storage URI or models:/NAME@ALIAS")
    cli.add_argument("--tracking_uri", default=None, help="MLflow server for models:/ URIs (or MLFLOW_TRACKING_URI)")
    cli.add_argument("--model_version", default=None, help="version to report (default: registry version, "
                     "metadata's model_version, else a hash of the weights)")
    cli.add_argument("--max_batch_rows", type=int, default=DEFAULTS.max_batch_rows, help="rows per request (413 above)")
    cli.add_argument("--max_body_bytes", type=int, default=DEFAULTS.max_body_bytes, help="body limit (413 above)")
    # A log line per request costs more than our whole preprocessing; the metrics carry the latencies.
    cli.set_defaults(enable_latency_logging=False)
    return cli


def serving_spec(args: argparse.Namespace, **fields) -> ServingSpec:
    """The command line as a validated ServingSpec (the limits, and what `fields` adds). Both
    servers call it first, so a taken port also ends the process here, in one line, before the
    model loads (`check_ports`)."""
    check_ports(args)
    return ServingSpec(max_batch_rows=args.max_batch_rows, max_body_bytes=args.max_body_bytes, **fields)


def host(args: argparse.Namespace) -> str:
    """The bind address; loopback for an argument namespace not built by `parser`."""
    return getattr(args, "host", None) or LOOPBACK


def check_ports(args: argparse.Namespace) -> None:
    """Exit with one line when a port the server needs is taken, instead of the start-up log,
    uvicorn's bind error and the shutdown lines that follow it once the model has loaded."""
    ports = [args.http_port, *([args.grpc_port] if args.enable_grpc else [])]
    for port in ports:
        problem = port_in_use(host(args), port)
        if problem:
            raise SystemExit(problem)


def install(app, spec: ServingSpec, metrics, extra=()) -> None:
    """Put the middlewares and error handlers on KServe's FastAPI app before the server starts.

    Outermost first: request id (every response carries one), metrics (counts what the limits
    reject too), body limit, `extra` (the transformer's payload logger), error envelope.

    Args:
        app: `kserve.model_server.app`.
        spec: The serving limits.
        metrics: The server's `ServerMetrics`.
        extra: (middleware class, kwargs) pairs between the body limit and the error envelope.
    """
    from fastapi.exceptions import RequestValidationError

    from serving.middleware import (
        BodyLimitMiddleware,
        ErrorEnvelopeMiddleware,
        RequestIdMiddleware,
        request_error_handler,
        validation_error_handler,
    )
    from serving.server_metrics import HttpMetricsMiddleware

    app.add_middleware(ErrorEnvelopeMiddleware)  # add_middleware inserts outermost: add inside-out
    for middleware, options in reversed(list(extra)):
        app.add_middleware(middleware, **options)
    app.add_middleware(BodyLimitMiddleware, max_bytes=spec.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    # KServe registers its handlers when the server starts, for its own exception types only;
    # these two types are ours and FastAPI's, so nothing overwrites them.
    app.add_exception_handler(RequestError, request_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)


def drop_timing_middleware(app) -> None:
    """Leave KServe's `TimingMiddleware` (timing_asgi) out of the app when it is built: it reads
    the process CPU time twice per request and logs a line, ~25% of a small request's CPU here,
    for what `request_*_seconds` and our histograms already record. KServe adds it when the server
    starts, so it is removed where Starlette builds the middleware stack, on the first call."""
    from timing_asgi import TimingMiddleware

    build = app.build_middleware_stack

    def build_without_timing():
        app.user_middleware = [m for m in app.user_middleware if m.cls is not TimingMiddleware]
        return build()

    app.build_middleware_stack = build_without_timing


def ready_dataplane(registry, served=()):
    """A DataPlane whose readiness is whether the served models can answer, and whose model
    metadata names the model version.

    Server readiness (`/v2/health/ready`, gRPC ServerReady) is every served model's health; a
    served model missing from the registry (KServe's stop() unloads them all while requests still
    drain) is not ready, on the server and the model endpoints alike, instead of a vacuous "ready"
    over no models and a 404 per request. KServe's own readiness is always true unless
    `--enable_predictor_health_check`, and then a predictor that is down answers 500 instead of
    503 (kserve/kserve#4262); its metadata leaves the v2 `versions` field out.

    Args:
        registry: The ModelServer's `ModelRepository`.
        served: The names the server was started with.
    """
    from kserve.errors import InvalidInput
    from kserve.protocol.dataplane import DataPlane

    class ReadyDataPlane(DataPlane):
        def decode(self, body, headers, *args, **kwargs):
            # KServe 0.21 reads the v2 binary extension (`inference-header-content-length`) with a
            # bare int() and indexes the JSON it finds without checks: a bad header or a binary
            # body without `inputs` was a 500 (found by tests/serving/test_serving_fuzz.py).
            try:
                return super().decode(body, headers, *args, **kwargs)
            except InvalidInput:
                raise
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
                raise RequestError(BAD_REQUEST, None, f"the request cannot be decoded: {type(err).__name__}: "
                                   f"{err}") from None

        async def ready(self) -> bool:
            models = self.model_registry.get_models()
            if any(name not in models for name in served):
                return False
            for model in models.values():
                if not await model.healthy():
                    return False
            return True

        async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
            if model_name in served and self.model_registry.get_model(model_name) is None:
                return False
            return await super().model_ready(model_name, disable_predictor_health_check)

        async def model_metadata(self, model_name: str) -> dict:
            metadata = await super().model_metadata(model_name)
            version = getattr(self.get_model_from_registry(model_name), "version", None)
            # REST returns `versions`; KServe's gRPC servicer builds its reply field by field and drops it.
            return {**metadata, "platform": "flywheel-pytorch", **({"versions": [version]} if version else {})}

    return ReadyDataPlane(registry)


def quiet_request_logs(latency_logging: bool) -> None:
    """Per-request INFO lines (KServe's timing middleware, its gRPC interceptor's 'grpc method',
    uvicorn's access line) cost more than a localhost hop; keep them only when latency logging is
    asked for. The access line was ~4.5% of the predictor's CPU per request (py-spy under wrk,
    issue 16), with its arguments formatted before the logger's level is even read: uvicorn logs
    it only while `uvicorn.access` has handlers (uvicorn/protocols/http/httptools_impl.py), so
    they go, as uvicorn's own `access_log=False` does (uvicorn/config.py configure_logging).
    `/metrics` counts every request by status code."""
    if latency_logging:
        return
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    logging.getLogger("kserve").addFilter(lambda record: not str(record.msg).startswith("grpc method:"))
    access = logging.getLogger("uvicorn.access")
    access.handlers, access.propagate = [], False


def start(model, args: argparse.Namespace, spec: ServingSpec, metrics, predictor_config=None, extra=()) -> None:
    """Start KServe's ModelServer (REST + gRPC on `--host`) with `model` and everything above installed."""
    from kserve import model_server

    from serving.endpoints import BoundModelServer

    if args.workers != 1:
        # KServe's multi-process REST server spawns workers that import its app afresh, without
        # these middlewares, handlers and the transformer's predictor config (its multi-worker path
        # has a history of breakage: kserve/kserve#4266, #2393).
        raise SystemExit("--workers must be 1: scale with replicas (serving.min_replicas/max_replicas)")
    check_ports(args)
    install(model_server.app, spec, metrics, extra)
    if not args.enable_latency_logging:
        drop_timing_middleware(model_server.app)
    server = BoundModelServer(
        host(args), http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
        max_threads=args.max_threads, max_asyncio_workers=args.max_asyncio_workers, enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url, enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format, event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive, predictor_config=predictor_config,
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    # RESTServer and GRPCServer take the dataplane when start() runs, so this one answers both.
    server.dataplane = ready_dataplane(server.registered_models, served=[model.name])
    quiet_request_logs(args.enable_latency_logging)
    # Everything loaded so far (kserve, fastapi, pandas, the model) lives for the whole process:
    # out of the collector's sight, a full collection no longer walks it (tens of ms of p99).
    gc.collect()
    gc.freeze()
    server.start([model])
