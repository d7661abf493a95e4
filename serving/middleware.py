"""Pure ASGI middlewares both servers put on KServe's FastAPI app: a request id on every request
and response, the inference request's method, encoding and size, and one error body shape for
every error response.

Pure ASGI (no BaseHTTPMiddleware) because they sit on the hot path: a success passes through
each with a dict lookup or two.
"""
from __future__ import annotations

import json
import re
import uuid
import zlib

from serving.errors import (
    BAD_REQUEST,
    METHOD_NOT_ALLOWED,
    TOO_LARGE,
    UNSUPPORTED_MEDIA,
    RequestError,
    error_body,
)

REQUEST_ID = "x-request-id"
BODY_KEY = "flywheel.body"  # the buffered request body, for the payload logger
# v1 `/v1/models/NAME:predict` (and `:explain`), v2 `/v2/models/NAME[/versions/V]/infer`: the
# routes KServe serves for POST only (kserve/protocol/rest/server.py).
INFERENCE_PATH = re.compile(r"/v1/models/[^/]+:(predict|explain)|/v2/models/[^/]+(/versions/[^/]+)?/infer")
GZIP = (b"gzip", b"x-gzip")  # x-gzip: RFC 9110 section 8.4.1.3 asks recipients to take it as gzip


def header(scope, name: bytes) -> bytes | None:
    """A request header's raw value from the ASGI scope (names there are lower case)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    """Answer with a JSON body, bypassing the app."""
    content = json.dumps(body, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": content})


class RequestIdMiddleware:
    """Gives a request without `x-request-id` a new one (added to the request headers, so KServe,
    the model and the predictor see it) and returns the id on the response.

    Args:
        app: The ASGI app it wraps.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = header(scope, REQUEST_ID.encode())
        if not request_id:
            request_id = uuid.uuid4().hex.encode()
            scope = {**scope, "headers": [*scope.get("headers", ()), (REQUEST_ID.encode(), request_id)]}

        async def send_with_id(message):
            if message["type"] == "http.response.start" and header(message, REQUEST_ID.encode()) is None:
                message = {**message, "headers": [*message.get("headers", ()), (REQUEST_ID.encode(), request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """The request's method, encoding and size, checked before the app parses it:

    * an inference path asked with anything but POST is a 405 with `Allow: POST` (KServe routes
      `GET /v1/models/NAME:predict` to its model-status route, a 404 naming "NAME:predict");
    * `Content-Encoding: gzip` is decompressed here (neither KServe nor Starlette decodes request
      bodies: the app got the gzip bytes and answered "not valid UTF-8"); any other coding is a 415;
    * a body over `max_bytes` is a 413, compressed or decompressed, so a small gzip bomb is refused
      after `max_bytes` of output, not held in memory (KServe has no REST body limit:
      kserve/kserve#2810).

    Accepted bodies are buffered (decompressed) in the scope, so the payload logger has the raw
    request without reading it twice.

    Args:
        app: The ASGI app it wraps.
        max_bytes: The largest body accepted.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method = scope.get("method")
        if method != "POST" and INFERENCE_PATH.fullmatch(scope.get("path", "")):
            return await self._not_allowed(send, method)
        if method not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send, int(declared))
        body = await self._read(receive)
        if body is None:
            return await self._too_large(send, None)
        try:
            scope, body = self._decoded(scope, body)
        except RequestError as error:
            return await send_json(send, error.status, error.body())
        scope = {**scope, BODY_KEY: body}
        sent = False

        async def replay():
            nonlocal sent
            if sent:  # the app may wait for a disconnect after the body: pass that through
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit (chunked uploads)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _decoded(self, scope, body: bytes) -> tuple[dict, bytes]:
        """The scope and body with the Content-Encoding undone (the header dropped, the length the
        decoded one), or as they are without one."""
        coding = (header(scope, b"content-encoding") or b"").strip().lower()
        if coding in (b"", b"identity"):
            return scope, body
        if coding not in GZIP:
            raise RequestError(UNSUPPORTED_MEDIA, None, f"Content-Encoding {coding.decode(errors='replace')!r} is "
                               "not supported: send the body as it is or gzip-compressed")
        body = gunzip(body, self.max_bytes)
        headers = [(k, v) for k, v in scope.get("headers", ()) if k not in (b"content-encoding", b"content-length")]
        return {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}, body

    @staticmethod
    async def _not_allowed(send, method: str) -> None:
        error = RequestError(METHOD_NOT_ALLOWED, None, f"{method} is not allowed on an inference path: use POST")
        await send_json(send, METHOD_NOT_ALLOWED, error.body(), [(b"allow", b"POST")])

    async def _too_large(self, send, size: int | None) -> None:
        what = f"{size} bytes" if size is not None else "the body"
        error = RequestError(TOO_LARGE, None, f"{what} is more than the {self.max_bytes} bytes allowed per request")
        await send_json(send, TOO_LARGE, error.body())


def gunzip(data: bytes, limit: int) -> bytes:
    """A gzip body decompressed to at most `limit` bytes (members concatenated, as RFC 1952 allows).

    Raises:
        RequestError: 413 past `limit` (decompression stops there), 400 for data that is not gzip.
    """
    out, rest = [], data
    size = 0
    while rest:
        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)  # 16+: gzip header and trailer
        try:
            chunk = stream.decompress(rest, limit - size + 1)  # at most one byte past the limit
        except zlib.error as err:
            raise RequestError(BAD_REQUEST, None, f"the body is not valid gzip: {err}") from None
        size += len(chunk)
        if size > limit:
            raise RequestError(TOO_LARGE, None, f"the decompressed body is more than the {limit} bytes allowed "
                               "per request")
        if not stream.eof:
            raise RequestError(BAD_REQUEST, None, "the gzip body is truncated")
        out.append(chunk)
        rest = stream.unused_data
    return b"".join(out)


class ErrorEnvelopeMiddleware:
    """Rewrites every error response that is not already `{"error": {status, field, message}}`
    (KServe's `{"error": "text"}`, FastAPI's `{"detail": ...}`, plain text) into that shape, so
    clients parse one error body from any endpoint. Successes pass through unbuffered.

    Args:
        app: The ASGI app it wraps.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, chunks = None, []

        async def envelope(message):
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # hold the start until the body is known
                return
            if start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._send_error(send, start, b"".join(chunks))

        await self.app(scope, receive, envelope)

    @staticmethod
    async def _send_error(send, start, body: bytes) -> None:
        status = start["status"]
        kept = [(k, v) for k, v in start.get("headers", ()) if k not in (b"content-length", b"content-type")]
        await send_json(send, status, normalise(status, body), kept)


def normalise(status: int, body: bytes) -> dict:
    """Any error body as `{"error": {status, field, message}}`."""
    try:
        parsed = json.loads(body or b"null")
    except ValueError:
        parsed = body.decode(errors="replace")
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and {"status", "message"} <= error.keys():
            return parsed
        message = error if error is not None else parsed.get("detail", parsed)
    else:
        message = parsed
    return error_body(status, message if isinstance(message, str) else json.dumps(message))


UNION_TAGS = frozenset({"InferenceRequest", "bytes"})  # pydantic names the v2 body's union member in `loc`


def validation_field(loc) -> str | None:
    """FastAPI's error location `("body", "InferenceRequest", "inputs", 0, "shape")` as `inputs[0].shape`."""
    field = ""
    for part in loc:
        if part == "body" or part in UNION_TAGS:
            continue
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    return field or None


async def validation_error_handler(request, exc):
    """FastAPI's body validation (the v2 REST `InferenceRequest`) as a 400 in the one error shape:
    a body that is not JSON, or JSON that is not an inference request, is malformed."""
    from fastapi.responses import JSONResponse

    first = (exc.errors() or [{}])[0]
    message = f"{first.get('msg', 'invalid request')}" + (f": {first['ctx']['error']}" if first.get("ctx", {}).get(
        "error") else "")
    field = None if first.get("type") == "json_invalid" else validation_field(first.get("loc", ()))
    return JSONResponse(RequestError(BAD_REQUEST, field, message).body(), status_code=BAD_REQUEST)


async def request_error_handler(request, exc: RequestError):
    """A `RequestError` raised anywhere in a REST request, with its own status."""
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status)
