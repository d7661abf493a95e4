"""A fake KFP v2beta1 API server, held to the real contract.

The KFP API server cannot run here (it needs Kubernetes, MySQL, Argo), so this stands in for
it over real HTTP, for the real `kfp.Client`. It is strict where the real one is:

* every JSON request body is checked field by field against the `kfp_server_api` models
  (unknown fields, wrong types, bad enum values -> 400), plus the checks the backend itself
  makes (names required, max_concurrency 1-10, parameters vs the pipeline's root inputs,
  with the backend's own messages);
* uploaded pipelines must parse as a KFP `PipelineSpec` (and `PlatformSpec`) protobuf;
* errors have the real shapes: `google.rpc.Status` ({"code", "message", "details"}) from the
  gRPC-gateway endpoints, {"error_message", "error_details"} from the upload endpoints;
* responses are `kfp_server_api` models serialized the way the client reads them.

Tests can require a bearer token or cookie, inject failures (`fail_next`), and choose how
runs end (`run_outcome`). Every request is recorded in `requests`.
"""
from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import itertools
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import kfp_server_api
import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
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
CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-LW#]+$")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _to_json(obj) -> dict:
    return kfp_server_api.ApiClient().sanitize_for_serialization(obj)


# --- request bodies checked against the generated models --------------------------------------

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


def parse_model(data, type_name: str):
    """Validate, then build the kfp_server_api model the way the client would read it."""
    errors = model_errors(data, type_name)
    if errors:
        raise ApiError(400, "; ".join(errors))
    response = type("R", (), {"data": json.dumps(data)})()
    return kfp_server_api.ApiClient().deserialize(response, type_name)


# --- pipeline specs ---------------------------------------------------------------------------

def parse_pipeline_package(filename: str, content: bytes) -> dict:
    """The real server reads YAML (or zip/tar.gz archives; not supported here) into a PipelineSpec."""
    if not filename.endswith((".yaml", ".yml")):
        raise ApiError(400, f"Unexpected pipeline file format {filename!r}: this fake reads only YAML")
    try:
        docs = [d for d in yaml.safe_load_all(content) if d is not None]
    except yaml.YAMLError as err:
        raise ApiError(400, f"Failed to parse the pipeline YAML: {err}") from None
    if not docs or not isinstance(docs[0], dict):
        raise ApiError(400, "The pipeline file is empty or not a mapping")
    try:
        spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
        for platform in docs[1:]:
            json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    except json_format.ParseError as err:
        raise ApiError(400, f"Failed to parse the pipeline spec: {err}") from None
    if not spec.pipeline_info.name:
        raise ApiError(400, "Invalid pipeline spec: pipelineInfo.name is empty")
    if not spec.root.HasField("dag"):
        raise ApiError(400, "Invalid pipeline spec: root has no DAG")
    return docs[0]


_VALUE_KINDS = {
    "NUMBER_DOUBLE": ((int, float), "double or integer", "number"),
    "NUMBER_INTEGER": ((int, float), "double or integer", "number"),
    "STRING": ((str,), "string", "string"),
    "BOOLEAN": ((bool,), "bool", "bool"),
    "LIST": ((list,), "list", "list"),
    "STRUCT": ((dict,), "struct", "struct"),
}


def parameter_errors(spec: dict, parameters: dict | None) -> str | None:
    """The backend's validatePipelineJobInputs (backend/src/apiserver/template/v2_template.go)."""
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    parameters = parameters or {}
    for name, definition in sorted(declared.items()):
        if name not in parameters:
            if not definition.get("isOptional") and "defaultValue" not in definition:
                return f"parameter {name} is not optional, yet has neither default value nor user provided value"
            continue
        value, kind = parameters[name], definition.get("parameterType")
        if kind not in _VALUE_KINDS:
            return f"input parameter {name} requires type unknown"
        types, label, noun = _VALUE_KINDS[kind]
        if not isinstance(value, types) or (kind != "BOOLEAN" and isinstance(value, bool)):
            return f"input parameter {name} requires type {label}, but the input parameter is not of {noun} value type"
    extra = sorted(set(parameters) - set(declared))
    if extra:
        return f"parameter(s) provided are not required by pipeline: {', '.join(extra)}"
    return None


def robfig_cron_errors(cron: str) -> str | None:
    """robfig/cron v1 `Parse`: 6 fields (seconds first), or 5 when day-of-week is left out."""
    fields = cron.split()
    if cron.startswith("@"):
        return None
    if len(fields) not in (5, 6) or not all(CRON_FIELD.match(f) for f in fields):
        return f"Expected 5 or 6 fields, found {len(fields)}: {cron}"
    return None


def _filter_predicates(raw: str | None) -> list[dict]:
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


def _matches(obj, predicates: list[dict]) -> bool:
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


# --- the server -------------------------------------------------------------------------------

@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict
    body: object = None
    form: dict = field(default_factory=dict)
    status: int = 0


class FakeKfpServer:
    """State and behaviour; `start()` serves it on 127.0.0.1 at a free port."""

    def __init__(self, multi_user: bool = False):
        self.multi_user = multi_user
        self.bearer_token: str | None = None  # when set, requests must carry it
        self.cookie: str | None = None  # when set, requests must carry this cookie (name=value)
        self.run_outcome = "SUCCEEDED"  # state runs reach once polled `polls_to_finish` times
        self.run_error = "task 'train' failed: exit code 1"
        self.polls_to_finish = 1
        self.requests: list[Recorded] = []
        self.pipelines: dict[str, models.V2beta1Pipeline] = {}
        self.versions: dict[str, models.V2beta1PipelineVersion] = {}
        self.experiments: dict[str, models.V2beta1Experiment] = {}
        self.runs: dict[str, models.V2beta1Run] = {}
        self.recurring_runs: dict[str, models.V2beta1RecurringRun] = {}
        self._polls: dict[str, int] = {}
        self._failures: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._ids = itertools.count(1)

    # -- test controls
    def fail_next(self, status: int, message: str = "injected failure", path_contains: str = "", times: int = 1):
        self._failures += [(status, message, path_contains)] * times

    def find(self, method: str, path_suffix: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKfpServer:
        server = self

        class Handler(_Handler):
            fake = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    # -- dispatch
    def handle(self, rec: Recorded, raw_body: bytes, content_type: str) -> tuple[int, dict]:
        with self._lock:
            for i, (status, message, part) in enumerate(self._failures):
                if part in rec.path:
                    del self._failures[i]
                    raise ApiError(status, message)
            self._authenticate(rec)
            return self._route(rec, raw_body, content_type)

    def _authenticate(self, rec: Recorded) -> None:
        if self.bearer_token is not None and rec.headers.get("authorization") != f"Bearer {self.bearer_token}":
            raise ApiError(401, "Unauthenticated: request has no valid bearer token")
        if self.cookie is not None:
            cookies = [c.strip() for c in rec.headers.get("cookie", "").split(";")]
            if self.cookie not in cookies:
                raise ApiError(401, "Unauthenticated: no valid session cookie")

    def _route(self, rec: Recorded, raw: bytes, content_type: str) -> tuple[int, dict]:
        m, p, q = rec.method, rec.path, rec.query
        if not p.startswith(API):
            raise ApiError(404, "Not Found")
        p = p[len(API):]
        if m == "GET" and p == "/healthz":
            return 200, _to_json(models.V2beta1GetHealthzResponse(multi_user=self.multi_user,
                                                                  pipeline_store="database"))
        if m == "POST" and p in ("/pipelines/upload", "/pipelines/upload_version"):
            return self._upload(rec, raw, content_type, version=p.endswith("version"))
        if m == "POST" and p == "/pipelines":
            return self._create_pipeline(self._json(rec, raw, "V2beta1Pipeline"))
        if m == "GET" and p == "/pipelines":
            ns = q.get("namespace") or ""
            found = [x for x in self.pipelines.values() if (x.namespace or "") == ns]
            return self._list(found, q, "pipelines", models.V2beta1ListPipelinesResponse)
        if (match := re.fullmatch(r"/pipelines/([^/]+)/versions", p)) and m == "GET":
            pipeline = self._get(self.pipelines, match[1], "Pipeline")
            found = [v for v in self.versions.values() if v.pipeline_id == pipeline.pipeline_id]
            return self._list(found, q, "pipeline_versions", models.V2beta1ListPipelineVersionsResponse)
        if (match := re.fullmatch(r"/pipelines/([^/]+)/versions/([^/]+)", p)) and m == "GET":
            version = self._get(self.versions, match[2], "PipelineVersion")
            if version.pipeline_id != match[1]:
                raise ApiError(404, f"PipelineVersion {match[2]} not found in pipeline {match[1]}")
            return 200, _to_json(version)
        if (match := re.fullmatch(r"/pipelines/([^/]+)", p)) and m == "GET":
            return 200, _to_json(self._get(self.pipelines, match[1], "Pipeline"))
        if p == "/experiments" and m == "POST":
            return self._create_experiment(self._json(rec, raw, "V2beta1Experiment"))
        if p == "/experiments" and m == "GET":
            if self.multi_user and not q.get("namespace"):
                raise ApiError(400, "Invalid input error: In multi-user mode, "
                                    "ListExperiment requires filtering by namespace")
            found = [e for e in self.experiments.values() if (e.namespace or "") == (q.get("namespace") or "")]
            return self._list(found, q, "experiments", models.V2beta1ListExperimentsResponse)
        if (match := re.fullmatch(r"/experiments/([^/]+)", p)) and m == "GET":
            return 200, _to_json(self._get(self.experiments, match[1], "Experiment"))
        if p == "/runs" and m == "POST":
            return self._create_run(self._json(rec, raw, "V2beta1Run"))
        if p == "/runs" and m == "GET":
            found = list(self.runs.values())
            if q.get("experiment_id"):
                found = [r for r in found if r.experiment_id == q["experiment_id"]]
            return self._list(found, q, "runs", models.V2beta1ListRunsResponse)
        if (match := re.fullmatch(r"/runs/([^/:]+)", p)) and m == "GET":
            return 200, _to_json(self._poll_run(match[1]))
        if p == "/recurringruns" and m == "POST":
            return self._create_recurring_run(self._json(rec, raw, "V2beta1RecurringRun"))
        if p == "/recurringruns" and m == "GET":
            found = list(self.recurring_runs.values())
            if q.get("experiment_id"):
                found = [r for r in found if r.experiment_id == q["experiment_id"]]
            elif q.get("namespace"):
                found = [r for r in found if r.namespace == q["namespace"]]
            return self._list(found, q, "recurring_runs", models.V2beta1ListRecurringRunsResponse)
        if match := re.fullmatch(r"/recurringruns/([^/:]+)", p):
            if m == "GET":
                return 200, _to_json(self._get(self.recurring_runs, match[1], "RecurringRun"))
            if m == "DELETE":
                self._get(self.recurring_runs, match[1], "RecurringRun")
                del self.recurring_runs[match[1]]
                return 200, {}
        raise ApiError(404, f"Not Found: {m} {API}{p} is not served by the fake")

    # -- helpers
    def _json(self, rec: Recorded, raw: bytes, type_name: str):
        try:
            data = json.loads(raw or b"null")
        except ValueError as err:
            raise ApiError(400, f"invalid JSON body: {err}") from None
        rec.body = data
        if not isinstance(data, dict):
            raise ApiError(400, f"body must be a JSON object ({type_name})")
        return parse_model(data, type_name)

    @staticmethod
    def _get(table: dict, key: str, kind: str):
        if key not in table:
            raise ApiError(404, f"{kind} {key} not found")
        return table[key]

    def _list(self, items: list, q: dict, attr: str, response_class) -> tuple[int, dict]:
        predicates = _filter_predicates(q.get("filter"))
        items = [i for i in items if _matches(i, predicates)]
        if q.get("sort_by"):  # "created_at desc", "display_name": the backend's sort (stable here)
            key, _, order = q["sort_by"].partition(" ")
            items = sorted(items, key=lambda i: (getattr(i, key, None) is None, getattr(i, key, None) or 0),
                           reverse=order.strip().lower() == "desc")
        size = int(q.get("page_size") or 10)
        start = int(q.get("page_token") or 0)
        page = items[start:start + size]
        token = str(start + size) if start + size < len(items) else None
        return 200, _to_json(response_class(**{attr: page or None, "total_size": len(items), "next_page_token": token}))

    def _new_id(self) -> str:
        return str(uuid.UUID(int=next(self._ids)))

    def _upload(self, rec: Recorded, raw: bytes, content_type: str, version: bool) -> tuple[int, dict]:
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(400, "Failed to read pipeline from file: request Content-Type isn't multipart/form-data")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        files = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        rec.form = {k: part.get_filename() for k, part in files.items()}
        unknown = set(rec.query) - {"name", "display_name", "description", "namespace", "tags", "pipelineid"}
        if unknown or set(files) != {"uploadfile"}:
            raise ApiError(400, f"unexpected form fields {sorted(files)} or query parameters {sorted(unknown)}")
        part = files["uploadfile"]
        spec = parse_pipeline_package(part.get_filename() or "", part.get_payload(decode=True))
        name = rec.query.get("name") or rec.query.get("display_name") or spec["pipelineInfo"]["name"]
        if version:
            pipeline_id = rec.query.get("pipelineid")
            if not pipeline_id:
                raise ApiError(400, "Failed to create a pipeline version due to error parsing pipeline id: "
                                    "Invalid input error: Pipeline id is empty")
            pipeline = self.pipelines.get(pipeline_id)
            if pipeline is None:
                raise ApiError(404, f"Failed to create a pipeline version: Pipeline {pipeline_id} not found")
        else:
            pipeline, _ = self._create_pipeline(models.V2beta1Pipeline(
                display_name=name, description=rec.query.get("description"), namespace=rec.query.get("namespace")),
                as_model=True)
        created = self._add_version(pipeline, name, rec.query.get("description"), spec)
        return 200, _to_json(created if version else pipeline)

    def _create_pipeline(self, pipeline, as_model: bool = False):
        name = pipeline.display_name or pipeline.name
        if not name:
            raise ApiError(400, "Invalid input error: Pipeline name is empty. Please specify a valid name")
        if self.multi_user and not pipeline.namespace:
            pass  # shared pipelines are allowed in multi-user mode
        for other in self.pipelines.values():
            if other.display_name == name and (other.namespace or "") == (pipeline.namespace or ""):
                raise ApiError(409, "Already exist error: Failed to create a new pipeline. "
                                    f"The name {name} already exists. Please specify a new name")
        created = models.V2beta1Pipeline(
            pipeline_id=self._new_id(), display_name=name, name=pipeline.name or name,
            description=pipeline.description, namespace=pipeline.namespace, created_at=_now())
        self.pipelines[created.pipeline_id] = created
        return (created, None) if as_model else (200, _to_json(created))

    def _add_version(self, pipeline, name: str, description, spec: dict):
        for other in self.versions.values():
            if other.pipeline_id == pipeline.pipeline_id and other.display_name == name:
                raise ApiError(409, "Already exist error: Failed to create a new pipeline version. "
                                    f"The name {name} already exist. Please specify a new name")
        version = models.V2beta1PipelineVersion(
            pipeline_id=pipeline.pipeline_id, pipeline_version_id=self._new_id(), display_name=name, name=name,
            description=description, created_at=_now(), pipeline_spec=spec)
        self.versions[version.pipeline_version_id] = version
        return version

    def _create_experiment(self, experiment) -> tuple[int, dict]:
        if not experiment.display_name:
            raise ApiError(400, "Invalid input error: Experiment name is empty. Please specify a valid experiment name")
        if self.multi_user and not experiment.namespace:
            raise ApiError(400, "Invalid input error: In multi-user mode, experiment namespace is required")
        for other in self.experiments.values():
            if other.display_name == experiment.display_name and other.namespace == experiment.namespace:
                raise ApiError(409, f"Already exist error: Experiment {experiment.display_name} already exists")
        experiment.experiment_id = self._new_id()
        experiment.created_at = _now()
        experiment.storage_state = "AVAILABLE"
        self.experiments[experiment.experiment_id] = experiment
        return 200, _to_json(experiment)

    def _pipeline_source(self, job) -> dict:
        """The spec a run or recurring run executes: inline, or a stored pipeline version."""
        ref = job.pipeline_version_reference
        if (job.pipeline_spec is None) == (ref is None):
            raise ApiError(400, "Invalid input error: exactly one of pipeline_spec or pipeline_version_reference "
                                "is required")
        if job.pipeline_spec is not None:
            try:
                json_format.ParseDict(job.pipeline_spec.get("pipeline_spec", job.pipeline_spec),
                                      pipeline_spec_pb2.PipelineSpec())
            except json_format.ParseError as err:
                raise ApiError(400, f"Invalid input error: pipeline_spec: {err}") from None
            return job.pipeline_spec.get("pipeline_spec", job.pipeline_spec)
        if not ref.pipeline_id or not ref.pipeline_version_id:
            raise ApiError(400, "Invalid input error: pipeline_version_reference needs pipeline_id and "
                                "pipeline_version_id")
        version = self._get(self.versions, ref.pipeline_version_id, "PipelineVersion")
        if version.pipeline_id != ref.pipeline_id:
            raise ApiError(400, f"Invalid input error: version {ref.pipeline_version_id} is not a version of "
                                f"pipeline {ref.pipeline_id}")
        return version.pipeline_spec

    def _check_job(self, job) -> None:
        if not job.display_name:
            raise ApiError(400, "Invalid input error: The run name is empty. Please specify a valid name")
        if job.experiment_id:
            self._get(self.experiments, job.experiment_id, "Experiment")
        elif self.multi_user:
            raise ApiError(400, "Invalid input error: In multi-user mode, experiment_id is required")
        spec = self._pipeline_source(job)
        runtime = job.runtime_config or models.V2beta1RuntimeConfig()
        problem = parameter_errors(spec, runtime.parameters)
        if problem:
            raise ApiError(400, f"Invalid input error: {problem}")

    def _create_run(self, run) -> tuple[int, dict]:
        self._check_job(run)
        run.run_id = self._new_id()
        run.state = "PENDING"
        run.storage_state = "AVAILABLE"
        run.created_at = _now()
        if run.pipeline_version_reference:
            run.pipeline_version_id = run.pipeline_version_reference.pipeline_version_id
        self.runs[run.run_id] = run
        self._polls[run.run_id] = 0
        return 200, _to_json(run)

    def _poll_run(self, run_id: str):
        run = self._get(self.runs, run_id, "Run")
        self._polls[run_id] += 1
        if run.state in ("PENDING", "RUNNING"):
            if self._polls[run_id] >= self.polls_to_finish:
                run.state = self.run_outcome
                run.finished_at = _now()
                if self.run_outcome == "FAILED":
                    run.error = models.GoogleRpcStatus(code=2, message=self.run_error)
            else:
                run.state = "RUNNING"
        return run

    def _create_recurring_run(self, job) -> tuple[int, dict]:
        self._check_job(job)
        concurrency = int(job.max_concurrency or 0)
        if not 1 <= concurrency <= 10:
            raise ApiError(400, "Invalid input error: The max concurrency of the recurring run is out of range. "
                                f"Support 1-10. Received {concurrency}.")
        trigger = job.trigger
        if trigger is None or (trigger.cron_schedule is None) == (trigger.periodic_schedule is None):
            raise ApiError(400, "Invalid input error: exactly one of cron_schedule or periodic_schedule is required")
        if trigger.cron_schedule is not None:
            problem = robfig_cron_errors(trigger.cron_schedule.cron or "")
            if problem:
                raise ApiError(400, "Invalid input error: Schedule cron is not a supported "
                                    f"format(https://godoc.org/github.com/robfig/cron). Error: {problem}")
        job.recurring_run_id = self._new_id()
        job.max_concurrency = str(concurrency)
        job.mode = job.mode or "ENABLE"
        job.status = "ENABLED" if job.mode == "ENABLE" else "DISABLED"
        job.created_at = job.updated_at = _now()
        if job.experiment_id:
            job.namespace = self.experiments[job.experiment_id].namespace
        if job.pipeline_version_reference:
            job.pipeline_version_id = job.pipeline_version_reference.pipeline_version_id
        self.recurring_runs[job.recurring_run_id] = job
        return 200, _to_json(job)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKfpServer

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        rec = Recorded(method, parts.path, query, {k.lower(): v for k, v in self.headers.items()})
        self.fake.requests.append(rec)
        try:
            status, payload = self.fake.handle(rec, raw, self.headers.get("Content-Type", ""))
        except ApiError as err:
            status = err.status
            if "/pipelines/upload" in parts.path:  # the upload handlers write their own error shape
                payload = {"error_message": err.message, "error_details": err.message}
            else:
                payload = {"code": GRPC.get(err.status, 2), "message": err.message, "details": []}
        rec.status = status
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_DELETE(self):
        self._serve("DELETE")


# --- pytest helpers ---------------------------------------------------------------------------

KFP_ENV_VARS = ("KFP_BEARER_TOKEN", "KFP_BEARER_TOKEN_FILE", "KFP_COOKIE", "KF_PIPELINES_SA_TOKEN_PATH",
                "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
                "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME", "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID")


def isolate_kfp_client(monkeypatch, tmp_path) -> None:
    """No credentials or kfp context from this machine leak into a test, and none are written."""
    import kfp.client.client as kfp_client

    for name in KFP_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-sa-token"))
    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))


@pytest.fixture
def server():
    """A fake KFP API server on a free loopback port, for one test."""
    fake = FakeKfpServer().start()
    yield fake
    fake.stop()


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """kfp.Client with no host config, credentials or home directory of the machine it runs on."""
    isolate_kfp_client(monkeypatch, tmp_path)
