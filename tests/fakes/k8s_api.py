"""A fake Kubernetes API server for the calls `kubeflow.training.TrainingClient` makes about
PyTorchJobs: create/get/list/delete the custom object, list pods by label selector, read
(and follow) a pod's log.

It stands in only for what cannot run here (a cluster with the Training Operator) and keeps to
the real contract: every created object is validated against the official CRD schema in
shared/crds (loaded here on its own, not through the code under test) and rejected with the
API server's 422 `Status`; unknown names get a 404 `Status`; unknown fields are reported in a
`Warning` header as the server does (and recorded). The operator's part is scripted: each GET
of a job moves it one step along its script (Created -> Running -> Succeeded or Failed), with
pods named and labelled as the operator names and labels them.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
JOBS = re.compile(rf"^/apis/{GROUP}/{VERSION}/namespaces/([^/]+)/{PLURAL}(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


def crd_schema() -> dict:
    folder = Path(os.environ.get("FLYWHEEL_CRD_DIR") or Path(__file__).resolve().parents[3] / "shared" / "crds")
    return _load_schema(str(folder / "kubeflow.org_pytorchjobs.yaml"))


@lru_cache(maxsize=2)
def _load_schema(path: str) -> dict:
    crd = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)["schema"]["openAPIV3Schema"]


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


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure" if code >= 400 else "Success",
            "message": message, "reason": reason, "details": details or {}, "code": code}


@dataclass
class JobScript:
    """What the 'operator' does with a job: the conditions it walks through, one per GET."""

    steps: list[str] = field(default_factory=lambda: ["Created", "Running", "Succeeded"])
    reason: str = ""  # of the terminal condition; defaults to the operator's PyTorchJob<Type>
    message: str = ""
    master_log: list[str] = field(default_factory=lambda: ["epoch 1 loss 0.61", "epoch 2 loss 0.52", "done"])
    line_delay: float = 0.01


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    body: object


@dataclass
class _Job:
    obj: dict
    script: JobScript
    step: int = -1


class FakeKubernetesApi:
    def __init__(self):
        self.schema = crd_schema()
        self.validator = jsonschema.Draft4Validator(self.schema)
        self.jobs: dict[tuple[str, str], _Job] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.scripts: dict[str, JobScript] = {}
        self.default_script = JobScript()
        self.requests: list[Recorded] = []
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

    def start(self) -> "FakeKubernetesApi":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls(self, method: str, path_re: str = "") -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method == method and re.search(path_re, r.path)]

    # --- the "operator" ---------------------------------------------------------------------

    def _advance(self, job: _Job) -> None:
        """Move the job one step along its script and make its status and pods match."""
        if job.step + 1 >= len(job.script.steps):
            return
        job.step += 1
        state = job.script.steps[job.step]
        meta, status = job.obj["metadata"], job.obj.setdefault("status", {})
        ns, name = meta["namespace"], meta["name"]
        conditions = status.setdefault("conditions", [])
        reason = job.script.reason if state in ("Succeeded", "Failed") and job.script.reason else f"{KIND}{state}"
        default_message = {
            "Created": f"{KIND} {name} is created.",
            "Running": f"{KIND} {ns}/{name} is running.",
            "Succeeded": f"{KIND} {ns}/{name} successfully completed.",
            "Failed": f"{KIND} {ns}/{name} is failed because 1 Master replica(s) failed.",
        }[state]
        message = job.script.message if state in ("Succeeded", "Failed") and job.script.message else default_message
        if state in ("Succeeded", "Failed"):
            for cond in conditions:
                if cond["type"] == "Running":
                    cond["status"] = "False"
            status["completionTime"] = now()
        if state == "Running":
            status["startTime"] = now()
        conditions.append({"type": state, "status": "True", "reason": reason, "message": message,
                           "lastUpdateTime": now(), "lastTransitionTime": now()})
        phase = {"Created": "Pending", "Running": "Running", "Succeeded": "Succeeded", "Failed": "Failed"}[state]
        replicas = job.obj["spec"]["pytorchReplicaSpecs"]
        status["replicaStatuses"] = {}
        for rtype, rspec in replicas.items():
            count = rspec.get("replicas", 1)
            for index in range(count):
                pod_name = f"{name}-{rtype.lower()}-{index}"
                labels = {**(rspec["template"].get("metadata") or {}).get("labels", {}),
                          "training.kubeflow.org/job-name": name, "training.kubeflow.org/operator-name": "pytorchjob-controller",
                          "training.kubeflow.org/replica-type": rtype.lower(), "training.kubeflow.org/replica-index": str(index)}
                if rtype == "Master":
                    labels["training.kubeflow.org/job-role"] = "master"
                pod = self.pods.setdefault((ns, pod_name), {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod_name, "namespace": ns, "labels": labels, "uid": str(uuid.uuid4()),
                                 "creationTimestamp": now()},
                    "spec": rspec["template"]["spec"], "status": {}})
                # A failed job: the master failed; workers are stopped (cleanPodPolicy Running).
                pod["status"]["phase"] = "Failed" if phase == "Failed" and rtype == "Master" else (
                    "Succeeded" if phase == "Failed" else phase)
            key = {"Pending": "active", "Running": "active", "Succeeded": "succeeded", "Failed": "failed"}[phase]
            status["replicaStatuses"][rtype] = {key: count}

    def pod_phase(self, ns: str, name: str) -> str | None:
        with self.lock:
            pod = self.pods.get((ns, name))
            return pod["status"].get("phase") if pod else None


def _handler(api: FakeKubernetesApi):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked log streaming, as the real server does

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _body(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw) if raw.strip() else None

        def _send(self, code: int, obj: dict, headers: dict | None = None):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str):
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            body = self._body() if method in ("POST", "DELETE", "PUT", "PATCH") else None
            with api.lock:
                api.requests.append(Recorded(method, url.path, query, body))
            if m := JOBS.match(url.path):
                return self._jobs(method, m.group(1), m.group(2), body)
            if (m := PODS.match(url.path)) and method == "GET":
                return self._pods(m.group(1), query.get("labelSelector", ""))
            if (m := POD_LOG.match(url.path)) and method == "GET":
                return self._log(m.group(1), m.group(2), query)
            self._send(404, status_object(404, "NotFound", "the server could not find the requested resource"))

        do_GET = lambda self: self._route("GET")  # noqa: E731
        do_POST = lambda self: self._route("POST")  # noqa: E731
        do_DELETE = lambda self: self._route("DELETE")  # noqa: E731
        do_PUT = lambda self: self._route("PUT")  # noqa: E731
        do_PATCH = lambda self: self._route("PATCH")  # noqa: E731

        def _not_found(self, name: str):
            self._send(404, status_object(404, "NotFound", f'{PLURAL}.{GROUP} "{name}" not found',
                                          {"name": name, "group": GROUP, "kind": PLURAL}))

        def _jobs(self, method: str, ns: str, name: str | None, body):
            if method == "POST" and name is None:
                return self._create(ns, body)
            if method == "GET" and name is None:
                with api.lock:
                    items = [j.obj for (jns, _), j in api.jobs.items() if jns == ns]
                return self._send(200, {"apiVersion": f"{GROUP}/{VERSION}", "kind": f"{KIND}List",
                                        "metadata": {"resourceVersion": "1"}, "items": items})
            with api.lock:
                job = api.jobs.get((ns, name))
                if job is None:
                    return self._not_found(name)
                if method == "GET":
                    api._advance(job)
                    return self._send(200, job.obj)
                if method == "DELETE":
                    del api.jobs[(ns, name)]
                    for key in [k for k, p in api.pods.items()
                                if k[0] == ns and p["metadata"]["labels"].get("training.kubeflow.org/job-name") == name]:
                        del api.pods[key]  # garbage collection of the job's pods
                    return self._send(200, {**status_object(200, "", ""), "status": "Success",
                                            "details": {"name": name, "group": GROUP, "kind": PLURAL,
                                                        "uid": job.obj["metadata"]["uid"]}})
            self._send(405, status_object(405, "MethodNotAllowed", f"{method} is not supported here"))

        def _create(self, ns: str, body):
            if not isinstance(body, dict):
                return self._send(400, status_object(400, "BadRequest", "the body must be a JSON object"))
            name = (body.get("metadata") or {}).get("name", "")
            if body.get("apiVersion") != f"{GROUP}/{VERSION}" or body.get("kind") != KIND:
                return self._send(400, status_object(400, "BadRequest",
                                                     f"the API version in the data ({body.get('apiVersion')}) and kind "
                                                     f"({body.get('kind')}) do not match {GROUP}/{VERSION} {KIND}"))
            if (body.get("metadata") or {}).get("namespace", ns) != ns:
                return self._send(400, status_object(400, "BadRequest", "the namespace of the provided object does "
                                                                        "not match the namespace sent on the request"))
            causes = []
            if not name:
                causes.append({"reason": "FieldValueRequired", "message": "Required value: name or generateName is required",
                               "field": "metadata.name"})
            for error in sorted(api.validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))):
                path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path).replace(".[", "[")
                reason = {"required": "FieldValueRequired", "type": "FieldValueTypeInvalid"}.get(error.validator, "FieldValueInvalid")
                causes.append({"reason": reason, "message": f"Invalid value: {error.message}", "field": path})
            if causes:
                message = f'{KIND}.{GROUP} "{name}" is invalid: ' + ", ".join(f"{c['field']}: {c['message']}" for c in causes)
                return self._send(422, status_object(422, "Invalid", message,
                                                     {"name": name, "group": GROUP, "kind": KIND, "causes": causes}))
            warnings = unknown_fields(api.schema, body)
            with api.lock:
                if (ns, name) in api.jobs:
                    return self._send(409, status_object(409, "AlreadyExists", f'{PLURAL}.{GROUP} "{name}" already exists',
                                                         {"name": name, "group": GROUP, "kind": PLURAL}))
                api.warnings += warnings
                obj = json.loads(json.dumps(body))
                obj.pop("status", None)  # status is a subresource: ignored on create
                obj["metadata"].update({"namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                                        "generation": 1, "creationTimestamp": now()})
                api.jobs[(ns, name)] = _Job(obj, api.scripts.get(name, api.default_script))
            headers = {"Warning": ", ".join(f'299 - "unknown field \\"{w}\\""' for w in warnings)} if warnings else None
            self._send(201, obj, headers)

        def _pods(self, ns: str, selector: str):
            wanted = {}
            for term in filter(None, selector.split(",")):
                key, sep, value = term.partition("==") if "==" in term else term.partition("=")
                if not sep or "!" in key:
                    return self._send(400, status_object(400, "BadRequest", f"unsupported label selector {term!r}"))
                wanted[key.strip()] = value.strip()
            with api.lock:
                items = [json.loads(json.dumps(p)) for (pns, _), p in api.pods.items()
                         if pns == ns and all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
            self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items})

        def _log(self, ns: str, pod_name: str, query: dict):
            with api.lock:
                pod = api.pods.get((ns, pod_name))
                if pod is None:
                    return self._send(404, status_object(404, "NotFound", f'pods "{pod_name}" not found',
                                                         {"name": pod_name, "kind": "pods"}))
                containers = [c["name"] for c in pod["spec"]["containers"]]
                job = api.jobs.get((ns, pod["metadata"]["labels"]["training.kubeflow.org/job-name"]))
            container = query.get("container", containers[0])
            if container not in containers:
                return self._send(400, status_object(400, "BadRequest",
                                                     f"container {container} is not valid for pod {pod_name}"))
            script = job.script if job else api.default_script
            is_master = pod["metadata"]["labels"].get("training.kubeflow.org/replica-type") == "master"
            lines = script.master_log if is_master else [f"{pod_name} ready"]
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
                    time.sleep(script.line_delay)
                # Following a running container's log ends when the container stops or the pod goes.
                deadline = time.monotonic() + 30
                while query.get("follow", "").lower() == "true" and time.monotonic() < deadline:
                    if api.pod_phase(ns, pod_name) not in ("Pending", "Running"):
                        break
                    time.sleep(0.01)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

    return Handler


@pytest.fixture
def fake_k8s():
    """A started FakeKubernetesApi on a free loopback port; stopped after the test."""
    api = FakeKubernetesApi().start()
    try:
        yield api
    finally:
        api.stop()
