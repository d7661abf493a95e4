"""Payload events: the KServe logger's binary-mode CloudEvents read into request and response halves.

An event (the KServe logger agent's format, which `serving/payload.py` copies) has `ce-specversion`
1.0, `ce-type` `org.kubeflow.serving.inference.request` or `.response`, `ce-id` (the request id;
both events of one call share it), optional `ce-time`, `ce-source` and the agent's extensions
(`ce-inferenceservicename`, `ce-namespace`, `ce-component`, `ce-endpoint`, `ce-metadata`,
`ce-annotations`), and the raw inference request or response as the body:

* requests: v1 `{"instances": [{column: value}, ...]}` or v2 `{"inputs": [{"name", "shape", "data"}]}`
  with one tensor per column;
* responses: v1 `{"predictions": [...], "probabilities": [...]}` (probabilities optional) or v2
  `{"outputs": [...]}` with a `label` and/or a `probability` tensor (the transformer's), and the
  `model_version` that answered (else "unknown").

`parse_event` raises `EventError` with the HTTP status of what is wrong: 400 not a readable
CloudEvent (a required attribute missing, bad `ce-time`, bad JSON, no data); 415 a body that is not
JSON (binary v2 tensors, structured-mode events); 422 a well-formed event the sink cannot use
(unknown `ce-type`, a request or response of a shape it cannot read).
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from monitoring import windows

try:
    import orjson

    loads = orjson.loads
except ImportError:  # pragma: no cover - orjson comes with kserve
    loads = json.loads

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
KINDS = {REQUEST_TYPE: "request", RESPONSE_TYPE: "response"}
SPEC_VERSIONS = ("1.0",)
JSON_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded", "")  # curl -d sends form
CE_ATTRIBUTES = ("ce-specversion", "ce-type", "ce-id", "ce-source", "ce-time", "ce-inferenceservicename",
                 "ce-namespace", "ce-component", "ce-endpoint", "ce-metadata", "content-type")
# The request header that ties a mirrored copy to its original: Envoy sets `x-request-id` on every
# request and keeps it on the mirror; KServe's agent forwards the headers `logger.metadataHeaders`
# names as the `metadata` extension, `{"<Canonical-Name>": [values]}` (kserve pkg/logger/handler.go
# matches Go's canonical header names: hence "X-Request-Id"; worker.go sets the extension).
TRACE_HEADER = "X-Request-Id"
ACCEPTED, BAD_REQUEST, UNSUPPORTED, UNPROCESSABLE, BUSY = 202, 400, 415, 422, 503
LABEL_OUTPUT, PROBABILITY_OUTPUT = "label", "probability"
MAX_VERSION_CHARS = 200


@dataclass(frozen=True)
class Outcome:
    """What `accept` decided: the HTTP status, a message, and for a 503 the seconds to wait."""

    status: int
    message: str
    retry_after: float | None = None
    reason: str | None = None  # a 503's cause: full, half_refused, closing

    @property
    def accepted(self) -> bool:
        return self.status < 300


class EventError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(slots=True)
class Request:
    columns: dict[str, list]  # feature -> one value per instance
    rows: int


@dataclass(slots=True)
class Response:
    predictions: list | None  # labels as text, or None
    probabilities: list | None  # floats (or None each), or None
    rows: int
    model_name: str | None
    model_version: str | None


@dataclass(slots=True)
class Half:
    """One accepted event waiting for its other half."""

    kind: str
    parsed: Request | Response
    time: datetime | None  # ce-time
    arrived: float  # time.monotonic()
    model_name: str
    headers: dict
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body)



def _json(body: bytes, content_type: str):
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/cloudevents+json":
        raise EventError(UNSUPPORTED, "structured-mode CloudEvents are not read: send binary mode (ce- headers)")
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise EventError(UNSUPPORTED, f"content-type {media!r}: the sink reads JSON bodies only "
                                      "(binary v2 tensors are not logged)")
    if not body:
        raise EventError(BAD_REQUEST, "the event has no data")
    try:
        return loads(body)
    except ValueError as err:
        raise EventError(BAD_REQUEST, f"the data is not JSON: {err}") from None


def _flat(data) -> list:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return list(itertools.chain.from_iterable(d if isinstance(d, list) else [d] for d in data))
    return data


def parse_request(data) -> Request:
    """A v1 or v2 inference request's feature columns (EventError 422 when it is neither)."""
    if not isinstance(data, dict):
        raise EventError(UNPROCESSABLE, "the request is not a JSON object")
    if "instances" in data:
        instances = data["instances"]
        if not isinstance(instances, list) or not instances:
            raise EventError(UNPROCESSABLE, "request 'instances' must be a non-empty list")
        if not all(isinstance(row, dict) for row in instances):
            raise EventError(UNPROCESSABLE, "request 'instances' must be feature records (JSON objects)")
        names: dict[str, None] = {}
        for row in instances:
            names.update(dict.fromkeys(row))
        columns = {name: [row.get(name) for row in instances] for name in names}
        return _checked(Request(columns, len(instances)))
    if "inputs" in data:
        inputs = data["inputs"]
        if not isinstance(inputs, list) or not inputs:
            raise EventError(UNPROCESSABLE, "request 'inputs' must be a non-empty list of tensors")
        columns, rows = {}, None
        for k, tensor in enumerate(inputs):
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str) or "data" not in tensor:
                raise EventError(UNPROCESSABLE, f"request inputs[{k}] must be a tensor with a name and data")
            values = _flat(tensor["data"])
            if not isinstance(values, list):
                raise EventError(UNPROCESSABLE, f"request inputs[{k}].data must be a list")
            shape = tensor.get("shape")
            if isinstance(shape, list) and len(shape) > 1 and any(d != 1 for d in shape[1:]):
                raise EventError(UNPROCESSABLE, f"request inputs[{k}] has shape {shape}: one tensor per column "
                                                "([n] or [n, 1]) is expected")
            if rows is not None and len(values) != rows:
                raise EventError(UNPROCESSABLE, f"request inputs[{k}] has {len(values)} values, inputs[0] {rows}")
            rows = len(values)
            columns[tensor["name"]] = values
        if not rows:
            raise EventError(UNPROCESSABLE, "request tensors are empty")
        return _checked(Request(columns, rows))
    raise EventError(UNPROCESSABLE, "not an inference request: no v1 'instances' or v2 'inputs'")


def _checked(request: Request) -> Request:
    clash = set(request.columns) & set(windows.SINK_COLUMNS)
    if clash:
        raise EventError(UNPROCESSABLE, f"feature columns {sorted(clash)} clash with the sink's own columns")
    return request


def _labels(values, where: str) -> list:
    if not isinstance(values, list) or not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
        raise EventError(UNPROCESSABLE, f"response {where} must be a list of labels")
    return [None if v is None else str(v) for v in values]


def _probabilities(values, where: str) -> list:
    if not isinstance(values, list):
        raise EventError(UNPROCESSABLE, f"response {where} must be a list of numbers")
    out = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v) if math.isfinite(v) else None)
        else:
            raise EventError(UNPROCESSABLE, f"response {where} must be a list of numbers, found {v!r:.40}")
    return out


def parse_response(data) -> Response:
    """A v1 or v2 inference response's labels, probabilities and model (EventError 422 when unreadable)."""
    if not isinstance(data, dict):
        raise EventError(UNPROCESSABLE, "the response is not a JSON object")
    name, version = data.get("model_name"), data.get("model_version")
    name = str(name) if name is not None else None
    version = str(version) if version not in (None, "") else None
    if version is not None and len(windows.partition_name(version)) > MAX_VERSION_CHARS:
        # a folder name the store refuses (NAME_MAX is 255 bytes) would fail every flush of the buffer
        raise EventError(UNPROCESSABLE, f"response model_version is over {MAX_VERSION_CHARS} characters "
                                        "(percent-encoded)")
    if "predictions" in data:
        predictions = _labels(data["predictions"], "'predictions'")
        probabilities = _probabilities(data["probabilities"], "'probabilities'") if "probabilities" in data else None
        if probabilities is not None and len(probabilities) != len(predictions):
            raise EventError(UNPROCESSABLE, f"response has {len(predictions)} predictions and "
                                            f"{len(probabilities)} probabilities")
        return Response(predictions, probabilities, len(predictions), name, version)
    if "outputs" in data:
        outputs = data["outputs"]
        if not isinstance(outputs, list):
            raise EventError(UNPROCESSABLE, "response 'outputs' must be a list of tensors")
        found = {t["name"]: t for t in outputs if isinstance(t, dict) and isinstance(t.get("name"), str)}
        if LABEL_OUTPUT not in found and PROBABILITY_OUTPUT not in found:
            raise EventError(UNPROCESSABLE, f"response outputs have no {LABEL_OUTPUT!r} or {PROBABILITY_OUTPUT!r} "
                                            f"tensor (found {sorted(map(str, found))})")
        labels = probabilities = None
        if LABEL_OUTPUT in found:
            labels = _labels(_flat(found[LABEL_OUTPUT].get("data")), "outputs 'label'.data")
        if PROBABILITY_OUTPUT in found:
            probabilities = _probabilities(_flat(found[PROBABILITY_OUTPUT].get("data")), "outputs 'probability'.data")
        if labels is not None and probabilities is not None and len(labels) != len(probabilities):
            raise EventError(UNPROCESSABLE, f"response has {len(labels)} labels and {len(probabilities)} probabilities")
        rows = len(labels if labels is not None else probabilities)
        return Response(labels, probabilities, rows, name, version)
    raise EventError(UNPROCESSABLE, "not an inference response: no v1 'predictions' or v2 'outputs'")


def pair_key(headers: Mapping[str, str]) -> str | None:
    """What pairs an event with its other half: its InferenceService and its `ce-id`. The ce-id
    alone is not enough: KServe's agent takes a request's own `Ce-Id` header when the client sends
    one (kserve pkg/logger/handler.go getOrCreateID), and a mirrored copy carries every header of
    the original, so a champion's and its shadow challenger's events may share one."""
    event_id = headers.get("ce-id")
    if not event_id:
        return None
    isvc = headers.get("ce-inferenceservicename")
    return f"{isvc}/{event_id}" if isvc else event_id


def trace_id(metadata: str | None) -> str | None:
    """The `X-Request-Id` KServe's agent put in an event's `ce-metadata` (`{"X-Request-Id": ["id"]}`),
    or None: absent, unreadable or empty metadata never refuses an event, it only cannot be traced."""
    if not metadata:
        return None
    try:
        found = json.loads(metadata)
    except ValueError:
        return None
    if not isinstance(found, dict):
        return None
    values = next((v for k, v in found.items() if str(k).lower() == TRACE_HEADER.lower()), None)
    value = values[0] if isinstance(values, list) and values else values
    return value if isinstance(value, str) and value else None


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: an offset that leaves years 1-9999
        raise EventError(BAD_REQUEST, f"ce-time {value!r:.60} is not an RFC 3339 time") from None
    if when.year < 1000:  # partitions are named date=YYYY-...: four digits keep them in time order
        raise EventError(BAD_REQUEST, f"ce-time {value!r:.60} is before the year 1000")
    return when


def parse_event(headers: Mapping[str, str], body: bytes, kind: str | None = None) -> Half:
    """Parse and check one event into a `Half` (EventError with the status when it is not usable).
    `headers` is case-insensitive (Starlette's) or has lower-case keys; `kind` is the one `KINDS`
    gives its `ce-type`, when the caller has looked it up already."""
    version = headers.get("ce-specversion")
    if not version:
        raise EventError(BAD_REQUEST, "not a binary-mode CloudEvent: no ce-specversion header")
    if version not in SPEC_VERSIONS:
        raise EventError(BAD_REQUEST, f"ce-specversion {version!r:.20} is not supported (1.0 is)")
    ce_type = headers.get("ce-type")
    if not ce_type:
        raise EventError(BAD_REQUEST, "no ce-type header")
    kind = kind or KINDS.get(ce_type, "other")
    if kind == "other":
        raise EventError(UNPROCESSABLE, f"ce-type {ce_type!r:.80} is not an inference request or response "
                                        f"({REQUEST_TYPE}, {RESPONSE_TYPE})")
    if not headers.get("ce-id"):
        raise EventError(BAD_REQUEST, "no ce-id header (the request id that pairs request and response)")
    when = parse_time(headers.get("ce-time"))
    data = _json(body, headers.get("content-type") or "")
    parsed = parse_request(data) if kind == "request" else parse_response(data)
    attributes = {k: headers.get(k) for k in CE_ATTRIBUTES if headers.get(k) is not None}
    return Half(kind, parsed, when, time.monotonic(), headers.get("ce-inferenceservicename") or "",
                attributes, bytes(body))
