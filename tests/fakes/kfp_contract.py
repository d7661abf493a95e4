"""The KFP v2beta1 API's request contract, as the fake KFP API server holds requests to it.

Every JSON request body is checked field by field against the generated `kfp_server_api` models
(unknown fields, wrong types, bad enum values -> 400), list filters against `V2beta1Filter`; errors
are `ApiError`s that kfp_core.py writes in the real shapes. Responses are those models serialized
the way the client reads them (`to_json`).
"""
from __future__ import annotations

import datetime as dt
import json
import re

import kfp_server_api
from kfp_server_api import models

API = "/apis/v2beta1"
# gRPC codes and the HTTP status grpc-gateway maps them to.
GRPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13, 501: 12, 503: 14}
# Proto int64 fields: the generated models type them 'str'; JSON may carry a number or a string.
INT64_FIELDS = {
    ("V2beta1RecurringRun", "max_concurrency"),
    ("V2beta1PeriodicSchedule", "interval_second"),
    ("V2beta1Predicate", "long_value"),
}
# filter.proto's Predicate.Op numbers (4 is unused), for filters that send the number.
OPERATIONS = {0: "OPERATION_UNSPECIFIED", 1: "EQUALS", 2: "NOT_EQUALS", 3: "GREATER_THAN", 5: "GREATER_THAN_EQUALS",
              6: "LESS_THAN", 7: "LESS_THAN_EQUALS", 8: "IN", 9: "IS_SUBSTRING"}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def to_json(obj) -> dict:
    return kfp_server_api.ApiClient().sanitize_for_serialization(obj)


def _scalar_errors(data, type_name: str, path: str, owner: tuple | None) -> list[str] | None:
    """Errors of a scalar against 'str', 'int', 'float', 'bool', 'object' or 'datetime'; None: not a scalar."""
    if type_name == "str":
        if owner in INT64_FIELDS:
            ok = (isinstance(data, int) and not isinstance(data, bool)) or (
                isinstance(data, str) and re.fullmatch(r"-?\d+", data))
            return [] if ok else [f"{path}: expected an int64, got {data!r}"]
        return [] if isinstance(data, str) else [f"{path}: expected a string, got {type(data).__name__}"]
    if type_name == "int":
        ok = isinstance(data, int) and not isinstance(data, bool)
        return [] if ok else [f"{path}: expected an integer, got {type(data).__name__}"]
    if type_name == "float":
        ok = isinstance(data, (int, float)) and not isinstance(data, bool)
        return [] if ok else [f"{path}: expected a number, got {type(data).__name__}"]
    if type_name == "bool":
        return [] if isinstance(data, bool) else [f"{path}: expected a bool, got {type(data).__name__}"]
    if type_name == "object":
        return []
    if type_name == "datetime":
        try:
            dt.datetime.fromisoformat(str(data).replace("Z", "+00:00"))
        except ValueError:
            return [f"{path}: expected an RFC 3339 timestamp, got {data!r}"]
        return []
    return None


def _model_class_errors(data, type_name: str, path: str) -> list[str]:
    """Errors of `data` against a generated model class (or enum) named `type_name`."""
    klass = getattr(models, type_name)
    if not klass.openapi_types:  # an enum
        allowed = getattr(klass, "allowable_values", [])
        return [] if data in allowed else [f"{path}: invalid value {data!r}; allowed: {allowed}"]
    if not isinstance(data, dict):
        return [f"{path}: expected an object ({type_name}), got {type(data).__name__}"]
    by_json_key = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    errors = []
    for key, value in data.items():
        attr = by_json_key.get(key)
        if attr is None:
            errors.append(f'{path}: unknown field "{key}" in {type_name}')
            continue
        errors += model_errors(value, klass.openapi_types[attr], f"{path}.{key}", (type_name, attr))
    return errors


def model_errors(data, type_name: str, path: str = "body", owner: tuple | None = None) -> list[str]:
    """Errors of JSON `data` against a kfp_server_api type string ('V2beta1Run', 'list[str]', ...)."""
    if data is None:  # proto JSON: null means "not set"
        return []
    if type_name.startswith("list["):
        if not isinstance(data, list):
            return [f"{path}: expected a list, got {type(data).__name__}"]
        inner = type_name[5:-1]
        return [e for i, v in enumerate(data) for e in model_errors(v, inner, f"{path}[{i}]")]
    if type_name.startswith("dict("):
        if not isinstance(data, dict):
            return [f"{path}: expected an object, got {type(data).__name__}"]
        inner = re.match(r"dict\(([^,]*), (.*)\)", type_name).group(2)
        return [e for k, v in data.items() for e in model_errors(v, inner, f"{path}.{k}")]
    scalar = _scalar_errors(data, type_name, path, owner)
    return scalar if scalar is not None else _model_class_errors(data, type_name, path)


def parse_model(data, type_name: str):
    """Validate, then build the kfp_server_api model the way the client would read it."""
    errors = model_errors(data, type_name)
    if errors:
        raise ApiError(400, "; ".join(errors))
    response = type("R", (), {"data": json.dumps(data)})()
    return kfp_server_api.ApiClient().deserialize(response, type_name)


def filter_predicates(raw: str | None) -> list[dict]:
    """The predicates of a list request's `filter` query parameter, checked against `V2beta1Filter`."""
    if not raw:
        return []
    try:
        data = json.loads(raw)
    except ValueError:
        raise ApiError(400, f"Invalid filter: not JSON: {raw!r}") from None
    # proto JSON accepts lowerCamel and the original names; the models use the original ones.
    renamed = [{re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k): v for k, v in p.items()}
               for p in data.get("predicates", [])]
    for predicate in renamed:
        if isinstance(predicate.get("operation"), int):
            if predicate["operation"] not in OPERATIONS:
                raise ApiError(400, f"Invalid filter: unknown operation {predicate['operation']}")
            predicate["operation"] = OPERATIONS[predicate["operation"]]
    errors = model_errors({"predicates": renamed}, "V2beta1Filter", "filter")
    if errors:
        raise ApiError(400, "Invalid filter: " + "; ".join(errors))
    return renamed


def matches(obj, predicates: list[dict]) -> bool:
    """Whether a stored model passes every predicate (the string operations the client sends)."""
    for p in predicates:
        value = getattr(obj, p["key"], None)
        wanted = p.get("string_value")
        op = p["operation"]
        if op == "EQUALS" and value != wanted:
            return False
        if op == "NOT_EQUALS" and value == wanted:
            return False
        if op == "IS_SUBSTRING" and (value is None or wanted not in value):
            return False
        if op not in ("EQUALS", "NOT_EQUALS", "IS_SUBSTRING"):
            raise ApiError(400, f"Invalid filter: operation {op} is not supported by this fake")
    return True
