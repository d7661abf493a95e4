"""Where the servers listen and which of KServe 0.21's routes they answer, without forking KServe.

- Bind address: KServe 0.21 hard-codes it, `uvicorn.Config(host="0.0.0.0")` in
  `kserve/protocol/rest/server.py` and `add_insecure_port("[::]:PORT")` in
  `kserve/protocol/grpc/server.py`. `BoundModelServer` builds both servers on `--host` instead
  (127.0.0.1 unless told otherwise).
- Model versions: KServe's v2 handlers answer 501 "Model versioning not supported yet" to any
  `model_version` (path or `?model_version=`; `kserve/protocol/rest/v2_endpoints.py`), and its gRPC
  servicer ignores `model_version` altogether. Here the version the server serves is served, any
  other is a 404 that names the served one, on REST and gRPC alike.
- Model repository extension (`/v2/repository/models/NAME/load|unload`, gRPC
  RepositoryModelLoad/Unload): not served. A one-model server that unloads its model answers 404
  to every inference and cannot load it back from a path it does not know; a restart is the
  honest way to change what is served.

Imported by `serving.server.start` only (it pulls in FastAPI and KServe's servers).
"""
import asyncio
import logging
from concurrent import futures
from typing import Optional, Union

from fastapi import Request, Response
from fastapi.routing import APIRouter
from grpc import aio
from grpc_interceptor.exceptions import Unimplemented
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer, metrics_handler
from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from kserve.protocol.rest.v2_endpoints import V2Endpoints, register_v2_endpoints

from serving.errors import NOT_FOUND, RequestError
from serving.rpc_errors import RpcRequestError

log = logging.getLogger("flywheel.serving")

REPOSITORY_PREFIX = "/v2/repository"
VERSIONED = ("infer", "model_metadata", "model_ready")  # the V2Endpoints handlers that take model_version


def check_version(dataplane, model_name: str, version: Optional[str]) -> None:
    """Nothing when `version` is empty or the one `model_name` serves; else a 404 naming the served one."""
    if not version:
        return
    served = getattr(dataplane.get_model_from_registry(model_name), "version", None)  # unknown model: 404
    if version != served:
        raise RequestError(NOT_FOUND, "model_version", f"model {model_name!r} has no version {version!r} here; "
                           f"this server serves version {served!r}")


class VersionedV2Endpoints(V2Endpoints):
    """KServe's v2 handlers, with `model_version` checked instead of refused. The signatures are
    KServe's: FastAPI reads the path, query and body parameters from them."""

    async def model_metadata(self, model_name: str, model_version: Optional[str] = None):
        check_version(self.dataplane, model_name, model_version)
        return await super().model_metadata(model_name)

    async def model_ready(self, model_name: str, model_version: Optional[str] = None):
        check_version(self.dataplane, model_name, model_version)
        return await super().model_ready(model_name)

    async def infer(self, raw_request: Request, raw_response: Response, model_name: str,
                    request_body: Union[InferenceRequest, bytes], model_version: Optional[str] = None):
        check_version(self.dataplane, model_name, model_version)
        return await super().infer(raw_request, raw_response, model_name, request_body)


class _Captured:
    """Stands in for the app in `register_v2_endpoints`, which ends with `app.include_router(router)`."""

    router: APIRouter | None = None

    def include_router(self, router: APIRouter) -> None:
        self.router = router


def v2_router(dataplane) -> APIRouter:
    """KServe 0.21's v2 route table (`register_v2_endpoints`), in its order, without the model
    repository routes and with the versioned handlers of `VersionedV2Endpoints`. Built before it is
    included in the app: FastAPI 0.165 includes routers lazily, so their routes cannot be replaced
    once they are in."""
    captured, ours = _Captured(), VersionedV2Endpoints(dataplane)
    register_v2_endpoints(captured, dataplane, None)
    router = APIRouter()
    for route in captured.router.routes:
        if route.path.startswith(REPOSITORY_PREFIX):
            continue
        handler = route.endpoint
        if handler.__name__ in VERSIONED:
            handler = getattr(ours, handler.__name__)
        router.add_api_route(route.path, handler, methods=sorted(route.methods), response_model=route.response_model,
                             tags=route.tags, name=route.name, include_in_schema=route.include_in_schema)
    return router


class VersionedServicer(InferenceServicer):
    """KServe's gRPC servicer with `model_version` checked (it ignores it) and the repository
    extension refused with UNIMPLEMENTED."""

    def _check(self, name: str, version: str) -> None:
        try:
            check_version(self._data_plane, name, version)
        except RequestError as error:
            raise RpcRequestError(error) from None

    async def ModelReady(self, request, context):
        self._check(request.name, request.version)
        return await super().ModelReady(request, context)

    async def ModelMetadata(self, request, context):
        self._check(request.name, request.version)
        return await super().ModelMetadata(request, context)

    async def ModelInfer(self, request, context):
        self._check(request.model_name, request.model_version)
        return await super().ModelInfer(request, context)

    async def RepositoryModelLoad(self, request, context):
        raise Unimplemented("the model repository extension is not served: restart the server to change its model")

    async def RepositoryModelUnload(self, request, context):
        raise Unimplemented("the model repository extension is not served: restart the server to change its model")


class BoundRESTServer(RESTServer):
    """KServe's REST server on `host`, with the routes above."""

    def __init__(self, host: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config.host = host  # read when uvicorn binds, in serve()

    def _register_endpoints(self, app) -> None:
        """KServe 0.21's `RESTServer._register_endpoints` with `v2_router`; its OpenAI and time
        series routes are left out (registered only for models that implement those APIs)."""
        root = APIRouter()
        root.add_api_route("/", self.dataplane.live)
        root.add_api_route("/metrics", metrics_handler, methods=["GET"])
        app.include_router(root)
        register_v1_endpoints(app, self.dataplane, None)
        app.include_router(v2_router(self.dataplane))


class BoundGRPCServer(GRPCServer):
    """KServe 0.21's `GRPCServer.start` on `host`, with `VersionedServicer`, and without
    SO_REUSEPORT (gRPC's default), with which a second server on a taken port starts silently and
    the kernel splits the calls between the two."""

    def __init__(self, host: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._host = host

    async def start(self, max_workers):
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
                     ("grpc.so_reuseport", 0)])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            VersionedServicer(self._data_plane, self._model_repository_extension), self._server)
        address = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        self._server.add_insecure_port(address)
        log.info("gRPC server on %s, %d workers", address, max_workers)
        await self._server.start()
        await self._server.wait_for_termination()


class BoundModelServer(ModelServer):
    """KServe's ModelServer whose REST and gRPC servers listen on `host`. `start` is KServe 0.21's
    `ModelServer.start` for one worker (`serving.server.start` refuses more) with the servers above.

    Args:
        host: The address both servers bind.
        kwargs: `ModelServer`'s arguments.
    """

    def __init__(self, host: str, **kwargs):
        super().__init__(**kwargs)
        self.host = host

    def start(self, models) -> None:
        from kserve import model_server

        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = BoundRESTServer(
            self.host, FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
            access_log_format=self.access_log_format, workers=self.workers, grace_period=self.grace_period,
            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = BoundGRPCServer(
                self.host, self.grpc_port, self.dataplane, self.model_repository_extension,
                kwargs=vars(model_server.args), grace_period=self.grace_period)
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())
