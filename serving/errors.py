"""The one error a serving request fails with, and the one body every error renders to.

Stock KServe answers errors as `{"error": "<text>"}`, FastAPI's own validation errors as
`{"detail": [...]}`, and collapses statuses it does not know to 500 (upstream: kserve/kserve#4247, a
backend's 503 answered as 500; #4262, a transformer's 500 while its predictor is down). Here every
failure, from either server and any protocol, is a `RequestError` and renders as

    {"error": {"status": 422, "field": "inputs[2].data[5]", "message": "..."}}

Pure Python: no kserve, no torch, so the transform and the tests use it as they are.
"""
from __future__ import annotations

import json

BAD_REQUEST = 400  # malformed: not JSON, wrong structure, tensor data that does not fit its shape
NOT_FOUND = 404
METHOD_NOT_ALLOWED = 405  # an inference path asked with anything but POST
TOO_LARGE = 413  # body over max_body_bytes (compressed or not), batch over max_batch_rows
UNSUPPORTED_MEDIA = 415  # a Content-Encoding other than gzip
UNPROCESSABLE = 422  # well-formed but semantically invalid: columns, types, NaN, empty batch
INTERNAL = 500
UNAVAILABLE = 503  # the model (or the predictor behind a transformer) is not ready
TIMEOUT = 504

REASONS = {BAD_REQUEST: "bad request", NOT_FOUND: "not found", METHOD_NOT_ALLOWED: "method not allowed",
           TOO_LARGE: "too large", UNSUPPORTED_MEDIA: "unsupported media type", UNPROCESSABLE: "invalid request",
           INTERNAL: "internal error", UNAVAILABLE: "unavailable", TIMEOUT: "timeout"}


class RequestError(Exception):
    """A request that cannot be answered, with the HTTP status, the offending field and why.

    Args:
        status: HTTP status code (400 malformed, 413 too large, 422 semantically invalid, 5xx).
        field: Where in the request the problem is, as a path (`instances[3].age`,
            `inputs[2].data[5]`), or None when it is the request as a whole.
        message: What is wrong, for a human.
    """

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status, self.field, self.message = int(status), field, message

    def body(self) -> dict:
        """The error body every server and protocol answers with."""
        return error_body(self.status, self.message, self.field)

    def json(self) -> str:
        return json.dumps(self.body(), separators=(",", ":"))

    def __repr__(self) -> str:
        return f"RequestError({self.status}, {self.field!r}, {self.message!r})"


def error_body(status: int, message: str, field: str | None = None) -> dict:
    """`{"error": {"status", "field", "message"}}`."""
    return {"error": {"status": int(status), "field": field, "message": str(message)}}


def from_body(data: bytes | str | dict, status: int) -> RequestError:
    """Read an error answer back (the transformer reading its predictor's): our own body keeps its
    status and field; anything else (stock KServe `{"error": "text"}`, plain text) keeps `status`.

    Args:
        data: The response body, raw or parsed.
        status: The HTTP status the body came with.
    """
    parsed = data
    if isinstance(data, (bytes, str)):
        try:
            parsed = json.loads(data or b"null")
        except ValueError:
            parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and "message" in error:
        return RequestError(int(error.get("status") or status), error.get("field"), str(error["message"]))
    if isinstance(error, str):
        text = error
    else:
        text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
    return RequestError(status, None, text.strip()[:2000] or REASONS.get(status, "error"))
