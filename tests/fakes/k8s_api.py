"""A fake Kubernetes API server for the calls `kubeflow.training.TrainingClient` makes about
PyTorchJobs: create/get/list/delete the custom object, list pods by label selector, read
(and follow) a pod's log.

It stands in only for what cannot run here (a cluster with the Training Operator) and keeps to
the real contract: every created object is validated against the official CRD schema in
crds/ (loaded here on its own, not through the code under test) and rejected with the
API server's 422 `Status`; unknown names get a 404 `Status`; unknown fields are reported in a
`Warning` header as the server does (and recorded). The operator's part is scripted: each GET
of a job moves it one step along its script (Created -> Running -> Succeeded or Failed), with
pods named and labelled as the operator names and labels them.

Kubeflow Trainer v2 TrainJobs (trainer.kubeflow.org/v1alpha1) are served the same way, beside the
PyTorchJobs and apart from them (`trainjobs`): a created TrainJob is parsed with the trainer API
package's own `from_dict` (422 when it fails), fields that parse drops are reported in a `Warning`
header as pruned, and the CRD's CEL rules on the name hold. Its script walks Created -> Running ->
Complete or Failed; only the terminal steps are conditions, as Trainer sets only those (and
Suspended). Its node pods are named and labelled as JobSet names and labels them
(`<job>-node-0-<index>-<suffix>`, jobset.sigs.k8s.io/jobset-name, batch.kubernetes.io/
job-completion-index) and are built from `spec.trainer` and the RuntimePatches of replicated job
`node` (a plain merge, which is all our patches need, not Trainer's strategic merge).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
TRAINER_GROUP, TRAINER_VERSION = "trainer.kubeflow.org", "v1alpha1"
TRAINJOB_PLURAL, TRAINJOB_KIND = "trainjobs", "TrainJob"
TRAINJOBS = re.compile(rf"^/apis/{TRAINER_GROUP}/{TRAINER_VERSION}/namespaces/([^/]+)/{TRAINJOB_PLURAL}(?:/([^/]+))?$")
TRAINJOB_STEPS = ("Created", "Running", "Complete", "Failed")
# What JobSet labels every pod with, and what an Indexed Job adds (the node's rank).
JOBSET_NAME, REPLICATED_JOB = "jobset.sigs.k8s.io/jobset-name", "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
NODE = "node"
# The terminal conditions Trainer copies from the JobSet's (jobset.x-k8s.io constants).
TRAINJOB_TERMINAL = {"Complete": ("AllJobsCompleted", "jobset completed successfully"),
                     "Failed": ("FailedJobs", "jobset failed due to one or more job failures")}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def crd_schema() -> dict:
    # The repository's copy of the upstream CRD file, read here on its own (not through crds/,
    # the code under test), so the fake holds requests to the published schema.
    folder = Path(os.environ.get("FLYWHEEL_CRD_DIR") or Path(__file__).resolve().parents[2] / "crds")
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


def pruned_fields(sent, kept, path: str = "") -> list[str]:
    """Paths in `sent` that did not survive parsing into the models (`kept` is the parse's to_dict())."""
    found = []
    if isinstance(sent, dict) and isinstance(kept, dict):
        for key, item in sent.items():
            at = f"{path}.{key}" if path else key
            found += [at] if key not in kept else pruned_fields(item, kept[key], at)
    elif isinstance(sent, list) and isinstance(kept, list):
        for index, (item, kept_item) in enumerate(zip(sent, kept)):
            found += pruned_fields(item, kept_item, f"{path}[{index}]")
    return found


def trainjob_problems(body: dict) -> tuple[list[dict], list[str]]:
    """(422 causes, pruned-field warnings) for a TrainJob, as the API server and CRD would find them:
    the trainer API models stand in for the CRD's structural schema."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    name = (body.get("metadata") or {}).get("name", "")
    causes = []
    # The CRD's CEL rules on the name (trainjob_types.go, XValidation on TrainJob).
    if name and not DNS1035.match(name):
        causes.append({"reason": "FieldValueInvalid", "field": "metadata.name",
                       "message": "Invalid value: metadata.name must match RFC 1035 DNS label format"})
    if len(name) > 63:
        causes.append({"reason": "FieldValueInvalid", "field": "metadata.name",
                       "message": "Invalid value: metadata.name must be no more than 63 characters"})
    try:
        parsed = TrainerV1alpha1TrainJob.from_dict(body)
    except ValueError as err:
        causes.append({"reason": "FieldValueInvalid", "field": "spec", "message": f"Invalid value: {err}"})
        return causes, []
    if parsed.spec is None:
        causes.append({"reason": "FieldValueRequired", "field": "spec.runtimeRef", "message": "Required value"})
    return causes, pruned_fields(body, parsed.to_dict())


def trainjob_pod_template(spec: dict) -> tuple[dict, dict, dict]:
    """(labels, annotations, pod spec) of a node pod: the runtime's `node` container with
    `spec.trainer` applied, then the RuntimePatches of replicated job `node`."""
    trainer = spec.get("trainer") or {}
    container = {"name": NODE, "image": trainer.get("image", "pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime"),
                 "command": trainer.get("command", ["/bin/bash", "-c", "echo Torch Distributed Runtime"]),
                 "args": trainer.get("args", []), "env": trainer.get("env", []),
                 "resources": trainer.get("resourcesPerNode", {}), "ports": [{"containerPort": 29500}]}
    labels, annotations, pod_spec = {}, {}, {"containers": [container], "restartPolicy": "OnFailure"}
    for patch in spec.get("runtimePatches") or []:
        template_spec = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for job in template_spec.get("replicatedJobs") or []:
            template = ((job.get("template") or {}).get("spec") or {}).get("template") or {}
            if job.get("name") != NODE:
                continue
            labels.update((template.get("metadata") or {}).get("labels") or {})
            annotations.update((template.get("metadata") or {}).get("annotations") or {})
            for key, value in (template.get("spec") or {}).items():
                if key != "containers":
                    pod_spec[key] = value
            for patched in (template.get("spec") or {}).get("containers") or []:
                if patched.get("name") == NODE:
                    container.update({k: v for k, v in patched.items() if k != "name"})
    return labels, annotations, pod_spec


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        self.trainjobs: dict[tuple[str, str], _Job] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.scripts: dict[str, JobScript] = {}
        self.default_script = JobScript()
        self.default_trainjob_script = JobScript(steps=["Created", "Running", "Complete"])
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

    def start(self) -> FakeKubernetesApi:
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
                          "training.kubeflow.org/job-name": name,
                          "training.kubeflow.org/operator-name": "pytorchjob-controller",
                          "training.kubeflow.org/replica-type": rtype.lower(),
                          "training.kubeflow.org/replica-index": str(index)}
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

    def _advance_trainjob(self, job: _Job) -> None:
        """Move the TrainJob one step along its script; its status and node pods follow."""
        if job.step + 1 >= len(job.script.steps):
            return
        job.step += 1
        state = job.script.steps[job.step]
        if state not in TRAINJOB_STEPS:
            raise ValueError(f"a TrainJob script step is one of {TRAINJOB_STEPS}, got {state!r}")
        meta, status = job.obj["metadata"], job.obj.setdefault("status", {})
        ns, name = meta["namespace"], meta["name"]
        phase = {"Created": "Pending", "Running": "Running", "Complete": "Succeeded", "Failed": "Failed"}[state]
        if state in TRAINJOB_TERMINAL:
            reason, message = TRAINJOB_TERMINAL[state]
            status.setdefault("conditions", []).append({
                "type": state, "status": "True", "reason": job.script.reason or reason,
                "message": job.script.message or message, "lastTransitionTime": now()})
        # One child Job per replicated job: `node`.
        status["jobsStatus"] = [{"name": NODE, "ready": int(phase == "Running"), "succeeded": int(phase == "Succeeded"),
                                 "failed": int(phase == "Failed"), "active": int(phase in ("Pending", "Running")),
                                 "suspended": 0}]
        labels, annotations, pod_spec = trainjob_pod_template(job.obj["spec"])
        for index in range(job.obj["spec"].get("trainer", {}).get("numNodes", 1)):
            pod = next((p for (pns, _), p in self.pods.items() if pns == ns
                        and p["metadata"]["labels"].get(JOBSET_NAME) == name
                        and p["metadata"]["labels"].get(COMPLETION_INDEX) == str(index)), None)
            if pod is None:
                pod_name = f"{name}-{NODE}-0-{index}-{uuid.uuid4().hex[:5]}"
                pod = self.pods[(ns, pod_name)] = {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod_name, "namespace": ns, "uid": str(uuid.uuid4()),
                                 "creationTimestamp": now(), "annotations": annotations,
                                 "labels": {**labels, JOBSET_NAME: name, REPLICATED_JOB: NODE,
                                            COMPLETION_INDEX: str(index), "jobset.sigs.k8s.io/job-index": "0"}},
                    "spec": pod_spec, "status": {}}
            pod["status"]["phase"] = phase

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
            if m := TRAINJOBS.match(url.path):
                return self._trainjobs(method, m.group(1), m.group(2), body)
            if (m := PODS.match(url.path)) and method == "GET":
                return self._pods(m.group(1), query.get("labelSelector", ""))
            if (m := POD_LOG.match(url.path)) and method == "GET":
                return self._log(m.group(1), m.group(2), query)
            self._send(404, status_object(404, "NotFound", "the server could not find the requested resource"))

        do_GET = lambda self: self._route("GET")
        do_POST = lambda self: self._route("POST")
        do_DELETE = lambda self: self._route("DELETE")
        do_PUT = lambda self: self._route("PUT")
        do_PATCH = lambda self: self._route("PATCH")

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
                    for key in [k for k, p in api.pods.items() if k[0] == ns
                                and p["metadata"]["labels"].get("training.kubeflow.org/job-name") == name]:
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
                causes.append({"reason": "FieldValueRequired",
                               "message": "Required value: name or generateName is required", "field": "metadata.name"})
            for error in sorted(api.validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))):
                path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]"
                                for p in error.absolute_path).replace(".[", "[")
                reason = {"required": "FieldValueRequired",
                          "type": "FieldValueTypeInvalid"}.get(error.validator, "FieldValueInvalid")
                causes.append({"reason": reason, "message": f"Invalid value: {error.message}", "field": path})
            if causes:
                message = f'{KIND}.{GROUP} "{name}" is invalid: ' + ", ".join(
                    f"{c['field']}: {c['message']}" for c in causes)
                return self._send(422, status_object(422, "Invalid", message,
                                                     {"name": name, "group": GROUP, "kind": KIND, "causes": causes}))
            warnings = unknown_fields(api.schema, body)
            with api.lock:
                if (ns, name) in api.jobs:
                    return self._send(409, status_object(409, "AlreadyExists",
                                                         f'{PLURAL}.{GROUP} "{name}" already exists',
                                                         {"name": name, "group": GROUP, "kind": PLURAL}))
                api.warnings += warnings
                obj = json.loads(json.dumps(body))
                obj.pop("status", None)  # status is a subresource: ignored on create
                obj["metadata"].update({"namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                                        "generation": 1, "creationTimestamp": now()})
                api.jobs[(ns, name)] = _Job(obj, api.scripts.get(name, api.default_script))
            headers = {"Warning": ", ".join(f'299 - "unknown field \\"{w}\\""' for w in warnings)} if warnings else None
            self._send(201, obj, headers)

        def _trainjob_not_found(self, name: str):
            self._send(404, status_object(404, "NotFound", f'{TRAINJOB_PLURAL}.{TRAINER_GROUP} "{name}" not found',
                                          {"name": name, "group": TRAINER_GROUP, "kind": TRAINJOB_PLURAL}))

        def _trainjobs(self, method: str, ns: str, name: str | None, body):
            if method == "POST" and name is None:
                return self._create_trainjob(ns, body)
            if method == "GET" and name is None:
                with api.lock:
                    items = [j.obj for (jns, _), j in api.trainjobs.items() if jns == ns]
                return self._send(200, {"apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
                                        "kind": f"{TRAINJOB_KIND}List", "metadata": {"resourceVersion": "1"},
                                        "items": items})
            with api.lock:
                job = api.trainjobs.get((ns, name))
                if job is None:
                    return self._trainjob_not_found(name)
                if method == "GET":
                    api._advance_trainjob(job)
                    return self._send(200, job.obj)
                if method == "DELETE":
                    del api.trainjobs[(ns, name)]
                    for key in [k for k, p in api.pods.items()
                                if k[0] == ns and p["metadata"]["labels"].get(JOBSET_NAME) == name]:
                        del api.pods[key]  # garbage collection of the JobSet and its pods
                    return self._send(200, {**status_object(200, "", ""), "status": "Success",
                                            "details": {"name": name, "group": TRAINER_GROUP, "kind": TRAINJOB_PLURAL,
                                                        "uid": job.obj["metadata"]["uid"]}})
            self._send(405, status_object(405, "MethodNotAllowed", f"{method} is not supported here"))

        def _create_trainjob(self, ns: str, body):
            if not isinstance(body, dict):
                return self._send(400, status_object(400, "BadRequest", "the body must be a JSON object"))
            kind = f"{TRAINER_GROUP}/{TRAINER_VERSION} {TRAINJOB_KIND}"
            if f"{body.get('apiVersion')} {body.get('kind')}" != kind:
                return self._send(400, status_object(400, "BadRequest",
                                                     f"the API version in the data ({body.get('apiVersion')}) and kind "
                                                     f"({body.get('kind')}) do not match {kind}"))
            if (body.get("metadata") or {}).get("namespace", ns) != ns:
                return self._send(400, status_object(400, "BadRequest", "the namespace of the provided object does "
                                                                        "not match the namespace sent on the request"))
            name = (body.get("metadata") or {}).get("name", "")
            causes, warnings = trainjob_problems(body)
            if not name:
                causes.insert(0, {"reason": "FieldValueRequired", "field": "metadata.name",
                                  "message": "Required value: name or generateName is required"})
            if causes:
                message = f'{TRAINJOB_KIND}.{TRAINER_GROUP} "{name}" is invalid: ' + ", ".join(
                    f"{c['field']}: {c['message']}" for c in causes)
                details = {"name": name, "group": TRAINER_GROUP, "kind": TRAINJOB_KIND, "causes": causes}
                return self._send(422, status_object(422, "Invalid", message, details))
            with api.lock:
                if (ns, name) in api.trainjobs:
                    return self._send(409, status_object(
                        409, "AlreadyExists", f'{TRAINJOB_PLURAL}.{TRAINER_GROUP} "{name}" already exists',
                        {"name": name, "group": TRAINER_GROUP, "kind": TRAINJOB_PLURAL}))
                api.warnings += warnings
                obj = json.loads(json.dumps(body))
                obj.pop("status", None)  # status is a subresource: ignored on create
                obj["metadata"].update({"namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                                        "generation": 1, "creationTimestamp": now()})
                api.trainjobs[(ns, name)] = _Job(obj, api.scripts.get(name, api.default_trainjob_script))
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
            self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
                             "items": items})

        def _log(self, ns: str, pod_name: str, query: dict):
            with api.lock:
                pod = api.pods.get((ns, pod_name))
                if pod is None:
                    return self._send(404, status_object(404, "NotFound", f'pods "{pod_name}" not found',
                                                         {"name": pod_name, "kind": "pods"}))
                containers = [c["name"] for c in pod["spec"]["containers"]]
                labels = pod["metadata"]["labels"]
                if JOBSET_NAME in labels:  # a TrainJob's node pod: node 0 logs the script's master log
                    job = api.trainjobs.get((ns, labels[JOBSET_NAME]))
                    is_master = labels.get(COMPLETION_INDEX) == "0"
                else:
                    job = api.jobs.get((ns, labels["training.kubeflow.org/job-name"]))
                    is_master = labels.get("training.kubeflow.org/replica-type") == "master"
            container = query.get("container", containers[0])
            if container not in containers:
                return self._send(400, status_object(400, "BadRequest",
                                                     f"container {container} is not valid for pod {pod_name}"))
            script = job.script if job else api.default_script
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


# =================================================================================================
# KServe InferenceServices (serving.kserve.io/v1beta1) and the Deployments Standard mode runs on.
# A subclass, so the routes above stay as they are: FakeKServeApi serves everything
# FakeKubernetesApi does, plus
#   POST/GET/PUT/PATCH/DELETE /apis/serving.kserve.io/v1beta1/namespaces/NS/inferenceservices[/NAME]
#   GET /apis/apps/v1/namespaces/NS/deployments/NAME   (Standard mode's <isvc>-<component>)
# Every body (and every object a patch produces) is validated against the official CRD in the
# repository's crds/ (loaded here on its own): schema errors are the API server's 422 `Status`;
# unknown fields are pruned and reported in a `Warning` header (fieldValidation=Strict: 400).
# PATCH takes a JSON merge patch (RFC 7386, what the Kubernetes client sends for custom objects)
# or a JSON patch (RFC 6902, kubectl --type=json); a strategic merge patch is a 415, as for any
# custom resource. metadata.generation moves only when the spec changes.
# The controllers' part is scripted per InferenceService (IsvcScript), one step per GET:
# - the first GET after a change still shows the old status (observedGeneration behind);
# - then each component whose pod template changed gets a new Knative revision
#   (<name>-<component>-0000N) or a new Deployment generation, ready after `polls_to_ready` GETs,
#   or never (`fail_when`), with the reason in the status as Knative/KServe put it;
# - Knative traffic follows KServe's rules: canaryTrafficPercent N sends N% to the latest ready
#   revision (tag `latest`) and the rest to the last rolled-out one (tag `prev`); without it 100%
#   goes to the latest ready revision, which then becomes the rolled-out one. Tag URLs only with
#   serving.kserve.io/enable-tag-routing: "true".
# - Standard mode: the InferenceService stays Ready while old pods serve during a stuck rollout
#   (kserve/kserve#4626); the Deployment's status tells the truth (ProgressDeadlineExceeded).
# =================================================================================================

ISVC_GROUP, ISVC_VERSION = "serving.kserve.io", "v1beta1"
ISVC_PLURAL, ISVC_KIND = "inferenceservices", "InferenceService"
ISVCS = re.compile(rf"^/apis/{ISVC_GROUP}/{ISVC_VERSION}/namespaces/([^/]+)/{ISVC_PLURAL}(?:/([^/]+))?$")
DEPLOYMENTS = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)$")
ISVC_COMPONENTS = ("predictor", "transformer")
ISVC_DOMAIN = "example.com"
MERGE_PATCH, JSON_PATCH = "application/merge-patch+json", "application/json-patch+json"


def isvc_crd_schema() -> dict:
    folder = Path(os.environ.get("FLYWHEEL_CRD_DIR") or Path(__file__).resolve().parents[2] / "crds")
    return _load_isvc_schema(str(folder / "serving.kserve.io_inferenceservices.yaml"))


@lru_cache(maxsize=2)
def _load_isvc_schema(path: str) -> dict:
    crd = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return next(v for v in crd["spec"]["versions"] if v["name"] == ISVC_VERSION)["schema"]["openAPIV3Schema"]


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


def apply_merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


class JsonPatchError(ValueError):
    pass


def apply_json_patch(doc, operations: list) -> object:
    """RFC 6902: add, remove, replace, move, copy, test."""
    doc = json.loads(json.dumps(doc))

    def parts(pointer: str) -> list[str]:
        if pointer == "":
            return []
        if not pointer.startswith("/"):
            raise JsonPatchError(f"invalid JSON pointer {pointer!r}")
        return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]

    def parent(pointer: str):
        keys = parts(pointer)
        if not keys:
            raise JsonPatchError("the root cannot be the target here")
        node = doc
        for key in keys[:-1]:
            try:
                node = node[int(key)] if isinstance(node, list) else node[key]
            except (KeyError, IndexError, ValueError, TypeError):
                raise JsonPatchError(f"doc is missing path: {pointer}") from None
        return node, keys[-1]

    def get(pointer: str):
        node = doc
        for key in parts(pointer):
            try:
                node = node[int(key)] if isinstance(node, list) else node[key]
            except (KeyError, IndexError, ValueError, TypeError):
                raise JsonPatchError(f"doc is missing path: {pointer}") from None
        return node

    def add(pointer: str, value):
        nonlocal doc
        if pointer == "":
            doc = value
            return
        node, key = parent(pointer)
        if isinstance(node, list):
            index = len(node) if key == "-" else int(key)
            if not 0 <= index <= len(node):
                raise JsonPatchError(f"index out of range: {pointer}")
            node.insert(index, value)
        elif isinstance(node, dict):
            node[key] = value
        else:
            raise JsonPatchError(f"doc is missing path: {pointer}")

    def remove(pointer: str):
        node, key = parent(pointer)
        try:
            if isinstance(node, list):
                del node[int(key)]
            else:
                del node[key]
        except (KeyError, IndexError, ValueError, TypeError):
            raise JsonPatchError(f"unable to remove nonexistent key: {pointer}") from None

    if not isinstance(operations, list):
        raise JsonPatchError("a JSON patch is a list of operations")
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "add":
            add(path, op["value"])
        elif kind == "remove":
            remove(path)
        elif kind == "replace":
            get(path)
            if path == "":
                doc = op["value"]
            else:
                remove(path)
                add(path, op["value"])
        elif kind in ("move", "copy"):
            value = json.loads(json.dumps(get(op["from"])))
            if kind == "move":
                remove(op["from"])
            add(path, value)
        elif kind == "test":
            if get(path) != op.get("value"):
                raise JsonPatchError(f"testing value {path} failed")
        else:
            raise JsonPatchError(f"unexpected kind of JSON patch operation {kind!r}")
    return doc


@dataclass
class Failure:
    """Why a revision (or a rollout) never becomes ready, as the status says it."""

    reason: str = "RevisionFailed"
    message: str = "Container failed with: model failed to load"


@dataclass
class IsvcScript:
    """What the KServe and Knative controllers do with an InferenceService."""

    polls_to_ready: int = 2
    # (component, its spec) -> a Failure for a revision/rollout that never gets ready, else None.
    fail_when: object = None


@dataclass
class _Revision:
    name: str
    template: dict
    polls_left: int
    failure: Failure | None
    ready: bool = False
    failed: bool = False


@dataclass
class _Isvc:
    obj: dict
    script: IsvcScript
    observe_in: int = 0  # GETs before the controller sees the current generation
    observed: int = 0
    revisions: dict = field(default_factory=dict)  # component -> [_Revision]
    rolled_out: dict = field(default_factory=dict)  # component -> revision name
    previous_rolled_out: dict = field(default_factory=dict)
    deployments: dict = field(default_factory=dict)  # component -> Deployment object (Standard)


def _template(component_spec: dict) -> dict:
    return {k: v for k, v in component_spec.items() if k != "canaryTrafficPercent"}


class FakeKServeApi(FakeKubernetesApi):
    def __init__(self):
        super().__init__()
        self.isvc_schema = isvc_crd_schema()
        self.isvc_validator = jsonschema.Draft4Validator(self.isvc_schema)
        self.isvcs: dict[tuple[str, str], _Isvc] = {}
        self.isvc_scripts: dict[str, IsvcScript] = {}
        self.default_isvc_script = IsvcScript()
        self.content_types: list[tuple[str, str, str]] = []  # (method, path, Content-Type)
        self.server.RequestHandlerClass = _kserve_handler(self, self.server.RequestHandlerClass)

    def isvc(self, namespace: str, name: str) -> dict | None:
        with self.lock:
            entry = self.isvcs.get((namespace, name))
            return json.loads(json.dumps(entry.obj)) if entry else None

    # --- validation ------------------------------------------------------------------------

    def isvc_causes(self, obj: dict) -> list[dict]:
        causes = []
        name = (obj.get("metadata") or {}).get("name", "")
        if not name:
            causes.append({"reason": "FieldValueRequired", "field": "metadata.name",
                           "message": "Required value: name or generateName is required"})
        for error in sorted(self.isvc_validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]"
                            for p in error.absolute_path).replace(".[", "[")
            if error.validator == "required":  # the server names the missing field itself
                missing = re.match(r"^'([^']+)' is a required property", error.message)
                field_name = missing.group(1) if missing else "?"
                causes.append({"reason": "FieldValueRequired", "message": "Required value",
                               "field": f"{path}.{field_name}" if path else field_name})
                continue
            reason = {"type": "FieldValueTypeInvalid"}.get(error.validator, "FieldValueInvalid")
            causes.append({"reason": reason, "message": f"Invalid value: {error.message}", "field": path})
        return causes

    def webhook_problems(self, obj: dict, old: dict | None = None) -> list[str]:
        """What KServe's validating webhook refuses (v1beta1 ComponentExtensionSpec.Validate, the name
        check, validateDeploymentMode on updates: a raw string comparison with the status)."""
        problems = []
        was = ((old or {}).get("status") or {}).get("deploymentMode")
        now_mode = ((obj.get("metadata") or {}).get("annotations") or {}).get("serving.kserve.io/deploymentMode")
        if was and now_mode is not None and now_mode != was:
            problems.append(f"update rejected: deploymentMode cannot be changed from '{was}' to '{now_mode}'")
        name = (obj.get("metadata") or {}).get("name", "")
        if name and not DNS1035.match(name):
            problems.append(f"The InferenceService \"{name}\" is invalid: a DNS-1035 label must consist of lower case "
                            "alphanumeric characters or '-', start with an alphabetic character, and end with an "
                            "alphanumeric character")
        for component in ISVC_COMPONENTS:
            part = (obj.get("spec") or {}).get(component) or {}
            low, high = part.get("minReplicas"), part.get("maxReplicas")
            if low is not None and low < 0:
                problems.append("MinReplicas cannot be less than 0.")
            if low is not None and high is not None and high and high < low:
                problems.append("MaxReplicas cannot be less than MinReplicas.")
        return problems

    # --- the controllers ---------------------------------------------------------------------

    def _changed(self, entry: _Isvc) -> None:
        entry.observe_in = 1

    def _tick(self, entry: _Isvc) -> None:
        obj = entry.obj
        generation = obj["metadata"]["generation"]
        if entry.observe_in > 0:
            entry.observe_in -= 1
            return
        if entry.observed != generation:
            self._observe(entry)
            entry.observed = generation
        else:
            for revisions in entry.revisions.values():
                for rev in revisions:
                    if not rev.ready and not rev.failed:
                        rev.polls_left -= 1
                        if rev.polls_left <= 0:
                            rev.ready, rev.failed = rev.failure is None, rev.failure is not None
        self._status(entry)

    def _observe(self, entry: _Isvc) -> None:
        obj, spec = entry.obj, entry.obj["spec"]
        name = obj["metadata"]["name"]
        for component in ISVC_COMPONENTS:
            if not spec.get(component):
                entry.revisions.pop(component, None)
                entry.rolled_out.pop(component, None)
                entry.deployments.pop(component, None)
                continue
            template = _template(spec[component])
            revisions = entry.revisions.setdefault(component, [])
            if revisions and revisions[-1].template == template:
                continue
            fail_when = entry.script.fail_when
            failure = fail_when(component, spec[component]) if fail_when else None
            rev = _Revision(f"{name}-{component}-{len(revisions) + 1:05d}", json.loads(json.dumps(template)),
                            entry.script.polls_to_ready, failure)
            if rev.polls_left <= 0:
                rev.ready, rev.failed = failure is None, failure is not None
            revisions.append(rev)

    def _status(self, entry: _Isvc) -> None:
        obj = entry.obj
        meta, spec = obj["metadata"], obj["spec"]
        name, ns = meta["name"], meta["namespace"]
        annotations = meta.get("annotations") or {}
        written = annotations.get("serving.kserve.io/deploymentMode", "Knative")
        mode = {"Serverless": "Knative", "RawDeployment": "Standard"}.get(written, written)
        tags = annotations.get("serving.kserve.io/enable-tag-routing") == "true"
        components, conditions = {}, []
        failure_info = None
        for component in ISVC_COMPONENTS:
            revisions = entry.revisions.get(component)
            if not spec.get(component) or not revisions:
                continue
            created = revisions[-1]
            ready_revs = [r for r in revisions if r.ready]
            latest_ready = ready_revs[-1].name if ready_revs else None
            label = component.capitalize() + "Ready"
            if created.failed and created.failure:
                failure_info = created.failure
            if mode == "Knative":
                state = {"latestCreatedRevision": created.name, "url": f"http://{name}-{component}.{ns}.{ISVC_DOMAIN}",
                         "address": {"url": f"http://{name}-{component}.{ns}.svc.cluster.local"}}
                if latest_ready:
                    state["latestReadyRevision"] = latest_ready
                    canary = spec[component].get("canaryTrafficPercent")
                    rolled = entry.rolled_out.get(component)
                    if canary is not None and rolled:
                        traffic = [{"tag": "latest", "latestRevision": True, "revisionName": latest_ready,
                                    "percent": canary},
                                   {"tag": "prev", "latestRevision": False, "revisionName": rolled,
                                    "percent": 100 - canary}]
                    else:
                        traffic = [{"tag": "latest", "latestRevision": True, "revisionName": latest_ready,
                                    "percent": 100}]
                    for target in traffic:
                        if tags:
                            target["url"] = f"http://{target['tag']}-{name}-{component}.{ns}.{ISVC_DOMAIN}"
                        else:
                            target.pop("tag")
                    if sum(t["percent"] for t in traffic if t["revisionName"] == latest_ready) == 100:
                        if rolled and rolled != latest_ready:
                            entry.previous_rolled_out[component] = rolled
                        entry.rolled_out[component] = latest_ready
                    state["traffic"] = traffic
                if entry.rolled_out.get(component):
                    state["latestRolledoutRevision"] = entry.rolled_out[component]
                if entry.previous_rolled_out.get(component):
                    state["previousRolledoutRevision"] = entry.previous_rolled_out[component]
                if created.ready:
                    conditions.append({"type": label, "status": "True"})
                elif created.failed:
                    conditions.append({"type": label, "status": "False", "reason": created.failure.reason,
                                       "message": f'Revision "{created.name}" failed with message: '
                                                  f'{created.failure.message}.'})
                else:
                    conditions.append({"type": label, "status": "Unknown", "reason": "RevisionMissing",
                                       "message": f'Configuration "{name}-{component}" is waiting for a Revision to '
                                                  "become ready."})
                components[component] = state
            else:
                self._deployment(entry, component, revisions, spec[component])
                components[component] = {"url": f"http://{name}-{component}-{ns}.{ISVC_DOMAIN}",
                                          "address": {"url": f"http://{name}-{component}.{ns}.svc.cluster.local"}}
                if latest_ready:  # old pods still serve during a stuck rollout (kserve/kserve#4626)
                    conditions.append({"type": label, "status": "True"})
                elif created.failed:
                    conditions.append({"type": label, "status": "False", "reason": "MinimumReplicasUnavailable",
                                       "message": "Deployment does not have minimum availability."})
                else:
                    conditions.append({"type": label, "status": "Unknown", "reason": "MinimumReplicasUnavailable",
                                       "message": "Deployment does not have minimum availability."})
        ingress = all(entry.revisions.get(c) and any(r.ready for r in entry.revisions[c])
                      for c in ISVC_COMPONENTS if spec.get(c))
        conditions.append({"type": "IngressReady", "status": "True"} if ingress else
                          {"type": "IngressReady", "status": "Unknown", "reason": "IngressNotConfigured",
                           "message": "Predictor ingress not created"})
        blocking = next((c for c in conditions if c["status"] != "True"), None)
        conditions.append({"type": "Ready", "status": "True"} if blocking is None else
                          {"type": "Ready", "status": blocking["status"], "reason": blocking.get("reason", ""),
                           "message": blocking.get("message", "")})
        for cond in conditions:
            cond["lastTransitionTime"] = now()
        status = {"observedGeneration": entry.observed, "conditions": conditions, "components": components,
                  "deploymentMode": written,
                  "url": (f"http://{name}.{ns}.{ISVC_DOMAIN}" if mode == "Knative" else
                          f"http://{name}-{ns}.{ISVC_DOMAIN}"),
                  "address": {"url": f"http://{name}.{ns}.svc.cluster.local"},
                  "modelStatus": {"transitionStatus": "UpToDate",
                                  "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"}}}
        if failure_info:
            status["modelStatus"] = {"transitionStatus": "BlockedByFailedLoad",
                                     "states": {"activeModelState": "Loaded" if ingress else "FailedToLoad",
                                                "targetModelState": "FailedToLoad"},
                                     "lastFailureInfo": {"reason": "ModelLoadFailed", "message": failure_info.message}}
        obj["status"] = status

    def _deployment(self, entry: _Isvc, component: str, revisions: list, component_spec: dict) -> None:
        """Standard mode's Deployment for `component`, one generation per pod template."""
        meta = entry.obj["metadata"]
        dep_name = f"{meta['name']}-{component}"
        created = revisions[-1]
        replicas = max(1, component_spec.get("minReplicas") or 1)
        containers = [{"name": c.get("name", "kserve-container"), "image": c.get("image", "")}
                      for c in component_spec.get("containers") or []] or [{"name": "kserve-container", "image": ""}]
        labels = {"app": f"isvc.{dep_name}", "component": component,
                  "serving.kserve.io/inferenceservice": meta["name"]}
        previous_ready = any(r.ready for r in revisions[:-1])
        if created.ready:
            status = {"replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas,
                      "availableReplicas": replicas,
                      "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                                      "message": "Deployment has minimum availability."},
                                     {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                                      "message": f'ReplicaSet "{dep_name}-{len(revisions)}" has successfully '
                                                 "progressed."}]}
        else:
            old = replicas if previous_ready else 0
            progressing = ({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                            "message": f'ReplicaSet "{dep_name}-{len(revisions)}" has timed out progressing.'}
                           if created.failed else
                           {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                            "message": f'ReplicaSet "{dep_name}-{len(revisions)}" is progressing.'})
            status = {"replicas": old + 1, "updatedReplicas": 1, "readyReplicas": old, "availableReplicas": old,
                      "unavailableReplicas": 1,
                      "conditions": [{"type": "Available", "status": "True" if old else "False",
                                      "reason": "MinimumReplicasAvailable" if old else "MinimumReplicasUnavailable",
                                      "message": "Deployment has minimum availability." if old else
                                      "Deployment does not have minimum availability."}, progressing]}
        status["observedGeneration"] = len(revisions)
        entry.deployments[component] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": dep_name, "namespace": meta["namespace"], "generation": len(revisions),
                         "labels": labels, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, dep_name))},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": labels["app"]}},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": containers}}},
            "status": status}


def _kserve_handler(api: FakeKServeApi, base):
    class Handler(base):
        def _route(self, method: str):
            url = urlsplit(self.path)
            isvcs, deployments = ISVCS.match(url.path), DEPLOYMENTS.match(url.path)
            if not (isvcs or (deployments and method == "GET")):
                return super()._route(method)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                body = self._body() if method in ("POST", "DELETE", "PUT", "PATCH") else None
            except ValueError:
                return self._send(400, status_object(400, "BadRequest", "the body is not valid JSON"))
            with api.lock:
                api.requests.append(Recorded(method, url.path, query, body))
                api.content_types.append((method, url.path, self.headers.get("Content-Type", "")))
            if deployments:
                return self._deployment(deployments.group(1), deployments.group(2))
            ns, name = isvcs.group(1), isvcs.group(2)
            if method == "POST" and name is None:
                return self._isvc_create(ns, body, query)
            if method == "GET" and name is None:
                with api.lock:
                    for (ins, _), entry in api.isvcs.items():
                        if ins == ns:
                            api._tick(entry)
                    items = [json.loads(json.dumps(e.obj)) for (ins, _), e in api.isvcs.items() if ins == ns]
                return self._send(200, {"apiVersion": f"{ISVC_GROUP}/{ISVC_VERSION}", "kind": f"{ISVC_KIND}List",
                                        "metadata": {"resourceVersion": "1"}, "items": items})
            with api.lock:
                entry = api.isvcs.get((ns, name)) if name else None
                if entry is None:
                    return self._isvc_not_found(name or "")
                if method == "GET":
                    api._tick(entry)
                    return self._send(200, entry.obj)
                if method == "DELETE":
                    del api.isvcs[(ns, name)]
                    return self._send(200, {**status_object(200, "", ""), "status": "Success",
                                            "details": {"name": name, "group": ISVC_GROUP, "kind": ISVC_PLURAL,
                                                        "uid": entry.obj["metadata"]["uid"]}})
                if method == "PATCH":
                    content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
                    try:
                        if content_type == MERGE_PATCH:
                            patched = apply_merge_patch(entry.obj, body)
                        elif content_type == JSON_PATCH:
                            patched = apply_json_patch(entry.obj, body)
                        else:
                            return self._send(415, status_object(
                                415, "UnsupportedMediaType",
                                f"the body of the request was in an unknown format - accepted media types include: "
                                f"{JSON_PATCH}, {MERGE_PATCH}, application/apply-patch+yaml"))
                    except JsonPatchError as err:
                        return self._send(422, status_object(422, "Invalid", str(err)))
                    return self._isvc_update(entry, patched, query)
                if method == "PUT":
                    if (body.get("metadata") or {}).get("resourceVersion") != entry.obj["metadata"]["resourceVersion"]:
                        return self._send(409, status_object(
                            409, "Conflict", f'Operation cannot be fulfilled on {ISVC_PLURAL}.{ISVC_GROUP} "{name}": '
                                             "the object has been modified; please apply your changes to the latest "
                                             "version and try again"))
                    return self._isvc_update(entry, body, query)
            self._send(405, status_object(405, "MethodNotAllowed", f"{method} is not supported here"))

        def _isvc_not_found(self, name: str):
            self._send(404, status_object(404, "NotFound", f'{ISVC_PLURAL}.{ISVC_GROUP} "{name}" not found',
                                          {"name": name, "group": ISVC_GROUP, "kind": ISVC_PLURAL}))

        def _deployment(self, ns: str, name: str):
            with api.lock:
                for (ins, _), entry in api.isvcs.items():
                    for dep in entry.deployments.values():
                        if ins == ns and dep["metadata"]["name"] == name:
                            return self._send(200, dep)
            self._send(404, status_object(404, "NotFound", f'deployments.apps "{name}" not found',
                                          {"name": name, "group": "apps", "kind": "deployments"}))

        def _checked(self, body: dict, query: dict, old: dict | None = None):
            """(stored object, warnings) or None after sending the refusal."""
            name = (body.get("metadata") or {}).get("name", "")
            body = {k: v for k, v in body.items() if k != "status"}  # a subresource: not written here
            causes = api.isvc_causes(body)
            if causes:
                message = f'{ISVC_KIND}.{ISVC_GROUP} "{name}" is invalid: ' + ", ".join(
                    f"{c['field']}: {c['message']}" for c in causes)
                self._send(422, status_object(422, "Invalid", message,
                                              {"name": name, "group": ISVC_GROUP, "kind": ISVC_KIND, "causes": causes}))
                return None
            warnings = unknown_fields(api.isvc_schema, body)
            if warnings and query.get("fieldValidation") == "Strict":
                self._send(400, status_object(400, "BadRequest", "strict decoding error: " + ", ".join(
                    f'unknown field "{w}"' for w in warnings)))
                return None
            problems = api.webhook_problems(body, old)
            if problems:
                self._send(400, status_object(400, "BadRequest", 'admission webhook "inferenceservice.kserve-webhook-'
                                                                 'server.validator" denied the request: ' +
                                              " ".join(problems)))
                return None
            return prune(api.isvc_schema, body), warnings

        def _warned(self, code: int, obj: dict, warnings: list[str]):
            with api.lock:
                api.warnings += warnings
            headers = {"Warning": ", ".join(f'299 - "unknown field \\"{w}\\""' for w in warnings)} if warnings else None
            self._send(code, obj, headers)

        def _isvc_create(self, ns: str, body, query: dict):
            if not isinstance(body, dict):
                return self._send(400, status_object(400, "BadRequest", "the body must be a JSON object"))
            if body.get("apiVersion") != f"{ISVC_GROUP}/{ISVC_VERSION}" or body.get("kind") != ISVC_KIND:
                return self._send(400, status_object(
                    400, "BadRequest", f"the API version in the data ({body.get('apiVersion')}) and kind "
                                       f"({body.get('kind')}) do not match {ISVC_GROUP}/{ISVC_VERSION} {ISVC_KIND}"))
            if (body.get("metadata") or {}).get("namespace", ns) != ns:
                return self._send(400, status_object(400, "BadRequest", "the namespace of the provided object does "
                                                                        "not match the namespace sent on the request"))
            checked = self._checked(body, query)
            if checked is None:
                return None
            obj, warnings = checked
            name = obj["metadata"]["name"]
            with api.lock:
                if (ns, name) in api.isvcs:
                    return self._send(409, status_object(409, "AlreadyExists",
                                                         f'{ISVC_PLURAL}.{ISVC_GROUP} "{name}" already exists',
                                                         {"name": name, "group": ISVC_GROUP, "kind": ISVC_PLURAL}))
                obj["metadata"].update({"namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                                        "generation": 1, "creationTimestamp": now()})
                entry = _Isvc(obj, api.isvc_scripts.get(name, api.default_isvc_script))
                api.isvcs[(ns, name)] = entry
                api._changed(entry)
                out = json.loads(json.dumps(obj))
            self._warned(201, out, warnings)

        def _isvc_update(self, entry: _Isvc, new: dict, query: dict):
            old = entry.obj
            if not isinstance(new, dict):
                return self._send(422, status_object(422, "Invalid", "the patched object is not an object"))
            meta = new.get("metadata") or {}
            for key in ("name", "namespace", "uid"):
                if meta.get(key) != old["metadata"].get(key):
                    return self._send(422, status_object(422, "Invalid", f"metadata.{key}: field is immutable"))
            checked = self._checked(new, query, old)
            if checked is None:
                return None
            obj, warnings = checked
            for key in ("generation", "creationTimestamp"):
                obj["metadata"][key] = old["metadata"][key]
            if "status" in old:
                obj["status"] = old["status"]
            if obj == old:
                return self._warned(200, json.loads(json.dumps(old)), warnings)
            obj["metadata"]["resourceVersion"] = str(int(old["metadata"]["resourceVersion"]) + 1)
            if obj.get("spec") != old.get("spec"):
                obj["metadata"]["generation"] = old["metadata"]["generation"] + 1
            entry.obj = obj
            if obj["metadata"]["generation"] != old["metadata"]["generation"]:
                api._changed(entry)
            self._warned(200, json.loads(json.dumps(obj)), warnings)

    return Handler


@pytest.fixture
def fake_kserve():
    """A started FakeKServeApi (InferenceServices, Deployments, and all FakeKubernetesApi serves)."""
    api = FakeKServeApi().start()
    try:
        yield api
    finally:
        api.stop()
