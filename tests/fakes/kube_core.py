"""The core of the fake Kubernetes API server: HTTP on a loopback port, routes, the record of every
request, the API server's `Status` bodies, the CRD schemas read on their own, and core/v1 pods
(listed by label selector, their logs read and followed).

The resource fakes (kube_pytorchjobs.py, kube_trainjobs.py, kube_inferenceservices.py) are mixins
of `FakeApiServer`: each keeps its own objects and adds its routes through `routes()`;
kube_api_server.py puts them together. Schema checking keeps to the API server's behaviour for
custom resources (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/
custom-resource-definitions/#field-pruning): fields the structural schema does not know are pruned
and named in a `Warning` header, or refused with `fieldValidation=Strict`.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

import yaml

PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Kueue (v0.19.2 pkg/controller/constants QueueLabel): its webhook creates a job that carries this
# label suspended (pkg/controller/jobframework/defaults.go ApplyDefaultForSuspend) and it clears the
# flag when the job's ClusterQueue admits it; both training fakes script that part.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure" if code >= 400 else "Success",
            "message": message, "reason": reason, "details": details or {}, "code": code}


def warning_headers(warnings: list[str]) -> dict | None:
    """The `Warning` header the API server sends for fields it pruned."""
    return {"Warning": ", ".join(f'299 - "unknown field \\"{w}\\""' for w in warnings)} if warnings else None


def load_crd_schema(crd_file: str, version: str, kind: str | None = None) -> dict:
    # The repository's copy of the upstream CRD file, read here on its own (not through crds/,
    # the code under test), so the fake holds requests to the published schema. `kind` picks one
    # CRD from a bundle (Istio's crd-all.gen.yaml).
    folder = Path(os.environ.get("FLYWHEEL_CRD_DIR") or Path(__file__).resolve().parents[2] / "crds")
    return _load_schema(str(folder / crd_file), version, kind)


@lru_cache(maxsize=4)
def _load_schema(path: str, version: str, kind: str | None = None) -> dict:
    docs = yaml.load_all(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    crd = next(d for d in docs if d and d.get("kind") == "CustomResourceDefinition"
               and (kind is None or d["spec"]["names"]["kind"] == kind))
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def strict_refusal(warnings: list[str], query: dict) -> dict | None:
    """The 400 `Status` for unknown fields under `fieldValidation=Strict`, else None (they are pruned)."""
    if not warnings or query.get("fieldValidation") != "Strict":
        return None
    return status_object(400, "BadRequest", "strict decoding error: " + ", ".join(
        f'unknown field "{w}"' for w in warnings))


def schema_errors(validator, body: dict) -> list[tuple[object, str]]:
    """(jsonschema error, the field path as the API server writes it: `spec.a[0].b`), sorted by path."""
    found = []
    for error in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))):
        path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]"
                        for p in error.absolute_path).replace(".[", "[")
        found.append((error, path))
    return found


def unknown_fields(schema: dict, value, path: str = "") -> list[str]:
    """Paths the API server would prune (and warn about) because the schema does not know them."""
    found = []
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            at = f"{path}.{key}" if path else key
            if props is not None and key in props:
                found += unknown_fields(props[key], item, at)
            elif isinstance(extra, dict):
                found += unknown_fields(extra, item, at)
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(at)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_fields(schema["items"], item, f"{path}[{index}]")
    return found


def prune(schema: dict, value):
    """`value` without the fields the schema does not know (what the API server stores)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        if props is None and not isinstance(extra, dict):
            return value
        out = {}
        for key, item in value.items():
            if props is not None and key in props:
                out[key] = prune(props[key], item)
            elif isinstance(extra, dict):
                out[key] = prune(extra, item)
            elif schema.get("x-kubernetes-preserve-unknown-fields"):
                out[key] = item
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(schema["items"], item) for item in value]
    return value


@dataclass(frozen=True)
class CustomResource:
    """A custom resource type as the fake serves it, and the `Status` bodies the server answers with."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(rf"^/apis/{self.group}/{self.version}/namespaces/([^/]+)/{self.plural}(?:/([^/]+))?$")

    def listing(self, items: list) -> dict:
        return {"apiVersion": self.api_version, "kind": f"{self.kind}List", "metadata": {"resourceVersion": "1"},
                "items": items}

    def not_found(self, name: str) -> dict:
        return status_object(404, "NotFound", f'{self.plural}.{self.group} "{name}" not found',
                             {"name": name, "group": self.group, "kind": self.plural})

    def already_exists(self, name: str) -> dict:
        return status_object(409, "AlreadyExists", f'{self.plural}.{self.group} "{name}" already exists',
                             {"name": name, "group": self.group, "kind": self.plural})

    def deleted(self, name: str, uid: str) -> dict:
        return {**status_object(200, "", ""), "status": "Success",
                "details": {"name": name, "group": self.group, "kind": self.plural, "uid": uid}}

    def invalid(self, name: str, causes: list[dict]) -> dict:
        message = f'{self.kind}.{self.group} "{name}" is invalid: ' + ", ".join(
            f"{c['field']}: {c['message']}" for c in causes)
        return status_object(422, "Invalid", message,
                             {"name": name, "group": self.group, "kind": self.kind, "causes": causes})

    def refusal_of_create(self, ns: str, body) -> dict | None:
        """The 400 `Status` for a create body of the wrong shape, kind or namespace, else None."""
        if not isinstance(body, dict):
            return status_object(400, "BadRequest", "the body must be a JSON object")
        if body.get("apiVersion") != self.api_version or body.get("kind") != self.kind:
            return status_object(400, "BadRequest", f"the API version in the data ({body.get('apiVersion')}) and kind "
                                                    f"({body.get('kind')}) do not match {self.api_version} {self.kind}")
        if (body.get("metadata") or {}).get("namespace", ns) != ns:
            return status_object(400, "BadRequest", "the namespace of the provided object does not match the "
                                                    "namespace sent on the request")
        return None


def name_required() -> dict:
    return {"reason": "FieldValueRequired", "message": "Required value: name or generateName is required",
            "field": "metadata.name"}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    body: object


class Route(NamedTuple):
    """Requests whose path matches `pattern` (and whose method is in `methods`; None: any) go to
    `handle(request, method, match, query, body)`."""

    pattern: re.Pattern
    methods: tuple[str, ...] | None
    handle: Callable


class FakeApiServer:
    """The HTTP server and what every resource fake shares: the lock, the record of requests and of
    pruned-field warnings, and the pods the operators create."""

    def __init__(self):
        self.pods: dict[tuple[str, str], dict] = {}
        self.requests: list[Recorded] = []
        self.content_types: list[tuple[str, str, str]] = []  # (method, path, Content-Type)
        self.warnings: list[str] = []
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def configuration(self):
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        return config

    def start(self):
        self.thread.start()
        return self

    def reply_warned(self, request, code: int, obj: dict, warnings: list[str]) -> None:
        """Answer with `obj` and the pruned-field `Warning` header, recording the warnings."""
        with self.lock:
            self.warnings += warnings
        request.reply(code, obj, warning_headers(warnings))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls(self, method: str, path_re: str = "") -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method == method and re.search(path_re, r.path)]

    def routes(self) -> list[Route]:
        """Each resource fake puts its routes before these (and calls super())."""
        return [Route(PODS, ("GET",), self._list_pods), Route(POD_LOG, ("GET",), self._read_log)]

    def pod_phase(self, ns: str, name: str) -> str | None:
        with self.lock:
            pod = self.pods.get((ns, name))
            return pod["status"].get("phase") if pod else None

    def pod_log(self, ns: str, pod_name: str, labels: dict) -> tuple[list[str], float]:
        """(lines, seconds between them) a pod logs; the operator that made the pod answers (under the lock)."""
        return [], 0.0

    def _list_pods(self, request, method: str, match, query: dict, body):
        ns, wanted = match.group(1), {}
        for term in filter(None, query.get("labelSelector", "").split(",")):
            key, sep, value = term.partition("==") if "==" in term else term.partition("=")
            if not sep or "!" in key:
                return request.reply(400, status_object(400, "BadRequest", f"unsupported label selector {term!r}"))
            wanted[key.strip()] = value.strip()
        with self.lock:
            items = [json.loads(json.dumps(p)) for (pns, _), p in self.pods.items()
                     if pns == ns and all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
        request.reply(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
                            "items": items})

    def _read_log(self, request, method: str, match, query: dict, body):
        ns, pod_name = match.group(1), match.group(2)
        with self.lock:
            pod = self.pods.get((ns, pod_name))
            if pod is None:
                return request.reply(404, status_object(404, "NotFound", f'pods "{pod_name}" not found',
                                                        {"name": pod_name, "kind": "pods"}))
            containers = [c["name"] for c in pod["spec"]["containers"]]
            lines, line_delay = self.pod_log(ns, pod_name, pod["metadata"]["labels"])
        container = query.get("container", containers[0])
        if container not in containers:
            return request.reply(400, status_object(400, "BadRequest",
                                                    f"container {container} is not valid for pod {pod_name}"))
        follow = query.get("follow", "").lower() == "true"
        request.stream(lines, line_delay, lambda: follow and self.pod_phase(ns, pod_name) in ("Pending", "Running"))


def _handler(api: FakeApiServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked log streaming, as the real server does

        def log_message(self, *args):  # keep pytest output clean
            pass

        def reply(self, code: int, obj: dict, headers: dict | None = None):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def stream(self, lines: list[str], line_delay: float, still_running: Callable[[], bool]):
            """A chunked text/plain log; following it ends when the container stops or the pod goes."""
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(data: bytes):
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            try:
                for line in lines:
                    chunk(f"{line}\n".encode())
                    time.sleep(line_delay)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and still_running():
                    time.sleep(0.01)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def _route(self, method: str):
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length and method in ("POST", "DELETE", "PUT", "PATCH") else b""
                body = json.loads(raw) if raw.strip() else None
            except ValueError:
                return self.reply(400, status_object(400, "BadRequest", "the body is not valid JSON"))
            with api.lock:
                api.requests.append(Recorded(method, url.path, query, body))
                api.content_types.append((method, url.path, self.headers.get("Content-Type", "")))
            for route in api.routes():
                match = route.pattern.match(url.path)
                if match and (route.methods is None or method in route.methods):
                    return route.handle(self, method, match, query, body)
            self.reply(404, status_object(404, "NotFound", "the server could not find the requested resource"))

        do_GET = lambda self: self._route("GET")
        do_POST = lambda self: self._route("POST")
        do_DELETE = lambda self: self._route("DELETE")
        do_PUT = lambda self: self._route("PUT")
        do_PATCH = lambda self: self._route("PATCH")

    return Handler
