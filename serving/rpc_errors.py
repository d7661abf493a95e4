"""A serving `RequestError` as gRPC sees it: the status code each HTTP status maps to and back, and
the exception KServe's gRPC interceptor turns into that code with our error body as details."""
from __future__ import annotations

from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException

from serving.errors import RequestError

GRPC_CODES = {400: StatusCode.INVALID_ARGUMENT, 404: StatusCode.NOT_FOUND, 413: StatusCode.RESOURCE_EXHAUSTED,
              422: StatusCode.INVALID_ARGUMENT, 503: StatusCode.UNAVAILABLE, 504: StatusCode.DEADLINE_EXCEEDED}
HTTP_STATUSES = {StatusCode.INVALID_ARGUMENT: 400, StatusCode.NOT_FOUND: 404, StatusCode.RESOURCE_EXHAUSTED: 413,
                 StatusCode.UNAVAILABLE: 503, StatusCode.DEADLINE_EXCEEDED: 504, StatusCode.UNIMPLEMENTED: 501}


class RpcRequestError(RequestError, GrpcException):
    """A `RequestError` KServe's gRPC interceptor understands: it aborts the call with the gRPC
    code for the status and the error body (JSON) as details, so a gRPC client (our transformer
    included) gets the exact status and field back; otherwise it answers INTERNAL for anything
    that is not a KServe error. REST handles it as the `RequestError` it is."""

    def __init__(self, error: RequestError):
        RequestError.__init__(self, error.status, error.field, error.message)
        self.status_code = GRPC_CODES.get(error.status, StatusCode.INTERNAL)
        self.details = error.json()
