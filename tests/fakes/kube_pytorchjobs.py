"""The fake's PyTorchJobs (kubeflow.org/v1), as the Training Operator serves them: create, get,
list and delete the custom object, and the operator's pods.

Every created job is validated against the official CRD schema in crds/ (read on its own, not
through the code under test) and refused with the API server's 422 `Status`; unknown fields are
reported in a `Warning` header (and recorded). The operator's part is scripted (`JobScript`): each
GET of a job moves it one step along its script (Created -> Running -> Succeeded or Failed), with
pods named and labelled as the operator names and labels them (training.kubeflow.org/*), and
deleted with the job. Conditions are set as the operator sets them (pkg/util/status.go
UpdateJobConditions: one condition per type, replaced; Running goes False on Succeeded/Failed).

Kueue, scripted too: a step "Suspended" is Kueue suspending the job (`spec.runPolicy.suspend`
true) and the operator answering as v1.9's ReconcileJobs does (pkg/controller.v1/common/job.go):
the job's pods deleted, active replicas 0, Running False and Suspended True, both with reason
PyTorchJobSuspended. "Resumed" is Kueue admitting it (the flag false) and the operator setting
Suspended False, reason PyTorchJobResumed, and a new startTime; the Running/Succeeded steps after
it create the pods. A job carrying the queue label whose script starts "Suspended" is created
suspended, as Kueue's webhook does; with any other script there is no Kueue and the label is inert.
The CRD's default `spec.runPolicy.suspend: false` is applied on create (the fake applies no other
CRD default).
"""
from __future__ import annotations

import json
import uuid

import jsonschema

from tests.fakes.kube_core import (
    KUEUE_QUEUE_LABEL,
    CustomResource,
    Route,
    load_crd_schema,
    name_required,
    now,
    schema_errors,
    status_object,
    unknown_fields,
    warning_headers,
)
from tests.fakes.kube_operators import JobScript, ScriptedJob, TrainingOperators

PYTORCHJOBS = CustomResource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
KIND = PYTORCHJOBS.kind
JOB_NAME = "training.kubeflow.org/job-name"
REPLICA_TYPE = "training.kubeflow.org/replica-type"
PYTORCHJOB_STEPS = ("Created", "Suspended", "Resumed", "Running", "Succeeded", "Failed")


def crd_schema() -> dict:
    """The PyTorchJob CRD's openAPIV3Schema, from the repository's copy of the upstream file."""
    return load_crd_schema("kubeflow.org_pytorchjobs.yaml", PYTORCHJOBS.version)


def pytorchjob_causes(validator, body: dict) -> list[dict]:
    """The 422 causes the API server finds in a PyTorchJob: the name, then the schema's errors."""
    causes = [] if (body.get("metadata") or {}).get("name", "") else [name_required()]
    for error, path in schema_errors(validator, body):
        reason = {"required": "FieldValueRequired",
                  "type": "FieldValueTypeInvalid"}.get(error.validator, "FieldValueInvalid")
        causes.append({"reason": reason, "message": f"Invalid value: {error.message}", "field": path})
    return causes


def set_condition(status: dict, kind: str, value: str, reason: str, message: str) -> None:
    """The Training Operator's UpdateJobConditions (v1.9 pkg/util/status.go setCondition): nothing
    once the job Failed or when type, status and reason are unchanged; else the condition of that
    type (and Running for Restarting, and the reverse) is replaced by the new one at the end, and
    Succeeded/Failed set Running False."""
    conditions = status.setdefault("conditions", [])
    if any(c["type"] == "Failed" and c["status"] == "True" for c in conditions):
        return
    current = next((c for c in conditions if c["type"] == kind), None)
    if current is not None and current["status"] == value and current.get("reason") == reason:
        return
    stamp = now()
    kept = []
    for cond in conditions:
        if cond["type"] == kind or {kind, cond["type"]} == {"Running", "Restarting"}:
            continue
        if kind in ("Succeeded", "Failed") and cond["type"] == "Running":
            cond = {**cond, "status": "False"}
        kept.append(cond)
    changed = current is None or current["status"] != value
    status["conditions"] = kept + [{"type": kind, "status": value, "reason": reason, "message": message,
                                    "lastUpdateTime": stamp,
                                    "lastTransitionTime": stamp if changed else current["lastTransitionTime"]}]


def is_true(status: dict, kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in status.get("conditions") or [])


class PyTorchJobs(TrainingOperators):
    """PyTorchJobs in `jobs`; `default_script` for a job with no entry in `scripts`."""

    def __init__(self):
        super().__init__()
        self.pytorchjob_schema = crd_schema()
        self.pytorchjob_validator = jsonschema.Draft4Validator(self.pytorchjob_schema)
        self.jobs: dict[tuple[str, str], ScriptedJob] = {}
        self.default_script = JobScript()

    def routes(self) -> list[Route]:
        return [Route(PYTORCHJOBS.pattern, None, self._pytorchjobs), *super().routes()]

    def pod_script(self, ns: str, labels: dict) -> tuple[JobScript, bool] | None:
        if JOB_NAME not in labels:
            return super().pod_script(ns, labels)
        job = self.jobs.get((ns, labels[JOB_NAME]))
        return (job.script if job else self.default_script), labels.get(REPLICA_TYPE) == "master"

    # --- the "operator" ---------------------------------------------------------------------

    def _advance(self, job: ScriptedJob) -> None:
        """Move the job one step along its script and make its status and pods match."""
        if job.step + 1 >= len(job.script.steps):
            return
        job.step += 1
        state = job.script.steps[job.step]
        if state not in PYTORCHJOB_STEPS:
            raise ValueError(f"a PyTorchJob script step is one of {PYTORCHJOB_STEPS}, got {state!r}")
        meta, status = job.obj["metadata"], job.obj.setdefault("status", {})
        ns, name = meta["namespace"], meta["name"]
        if is_true(status, "Succeeded") or is_true(status, "Failed"):
            raise ValueError(f"PyTorchJob {name} has finished: its script cannot go on to {state!r}")
        if state == "Suspended":
            return self._suspend(job)
        if state == "Resumed":
            return self._resume(job)
        if job.obj["spec"].get("runPolicy", {}).get("suspend"):
            raise ValueError(f"PyTorchJob {name} is suspended: the operator creates no pods for it, so "
                             f"{state!r} needs a 'Resumed' step first")
        reason = job.script.reason if state in ("Succeeded", "Failed") and job.script.reason else f"{KIND}{state}"
        default_message = {
            "Created": f"{KIND} {name} is created.",
            "Running": f"{KIND} {ns}/{name} is running.",
            "Succeeded": f"{KIND} {ns}/{name} successfully completed.",
            "Failed": f"{KIND} {ns}/{name} is failed because 1 Master replica(s) failed.",
        }[state]
        message = job.script.message if state in ("Succeeded", "Failed") and job.script.message else default_message
        if state in ("Succeeded", "Failed"):
            status["completionTime"] = now()
        if state == "Running":
            status["startTime"] = now()
        set_condition(status, state, "True", reason, message)
        phase = {"Created": "Pending", "Running": "Running", "Succeeded": "Succeeded", "Failed": "Failed"}[state]
        status["replicaStatuses"] = {}
        for rtype, rspec in job.obj["spec"]["pytorchReplicaSpecs"].items():
            count = rspec.get("replicas", 1)
            for index in range(count):
                self._replica_pod(ns, name, rtype, rspec, index, phase)
            key = {"Pending": "active", "Running": "active", "Succeeded": "succeeded", "Failed": "failed"}[phase]
            status["replicaStatuses"][rtype] = {key: count}

    def _suspend(self, job: ScriptedJob) -> None:
        """Kueue suspends the job (it queues or preempts it); the operator deletes its pods (every
        pod of an unfinished job, whatever cleanPodPolicy) and reports it suspended."""
        meta, status = job.obj["metadata"], job.obj.setdefault("status", {})
        ns, name = meta["namespace"], meta["name"]
        job.obj["spec"].setdefault("runPolicy", {})["suspend"] = True
        if not any(c["type"] == "Created" for c in status.get("conditions") or []):
            # The operator's create handler sets Created whether or not the job is suspended.
            set_condition(status, "Created", "True", f"{KIND}Created", f"{KIND} {name} is created.")
        self._delete_pods(ns, name)
        for replica in (status.get("replicaStatuses") or {}).values():
            replica["active"] = 0
        message = f"{KIND} {name} is suspended."
        if is_true(status, "Running"):
            set_condition(status, "Running", "False", f"{KIND}Suspended", message)
        if not is_true(status, "Suspended"):
            set_condition(status, "Suspended", "True", f"{KIND}Suspended", message)

    def _resume(self, job: ScriptedJob) -> None:
        """Kueue admits the job (clears the flag); the operator marks it resumed and restarts its
        clock. Its pods come with the script's next steps."""
        meta, status = job.obj["metadata"], job.obj.setdefault("status", {})
        job.obj["spec"].setdefault("runPolicy", {})["suspend"] = False
        if is_true(status, "Suspended"):
            set_condition(status, "Suspended", "False", f"{KIND}Resumed", f"{KIND} {meta['name']} is resumed.")
            status["startTime"] = now()

    def _delete_pods(self, ns: str, name: str) -> None:
        for key in [k for k, p in self.pods.items() if k[0] == ns and p["metadata"]["labels"].get(JOB_NAME) == name]:
            del self.pods[key]

    def _replica_pod(self, ns: str, name: str, rtype: str, rspec: dict, index: int, phase: str) -> None:
        """The operator's pod for one replica, created on first sight, its phase following the job's."""
        pod_name = f"{name}-{rtype.lower()}-{index}"
        labels = {**(rspec["template"].get("metadata") or {}).get("labels", {}),
                  JOB_NAME: name,
                  "training.kubeflow.org/operator-name": "pytorchjob-controller",
                  REPLICA_TYPE: rtype.lower(),
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

    # --- the API ----------------------------------------------------------------------------

    def _pytorchjobs(self, request, method: str, match, query: dict, body):
        ns, name = match.group(1), match.group(2)
        if method == "POST" and name is None:
            return self._create_pytorchjob(request, ns, body)
        if method == "GET" and name is None:
            with self.lock:
                items = [j.obj for (jns, _), j in self.jobs.items() if jns == ns]
            return request.reply(200, PYTORCHJOBS.listing(items))
        with self.lock:
            job = self.jobs.get((ns, name))
            if job is None:
                return request.reply(404, PYTORCHJOBS.not_found(name))
            if method == "GET":
                self._advance(job)
                return request.reply(200, job.obj)
            if method == "DELETE":
                del self.jobs[(ns, name)]
                self._delete_pods(ns, name)  # garbage collection of the job's pods
                return request.reply(200, PYTORCHJOBS.deleted(name, job.obj["metadata"]["uid"]))
        request.reply(405, status_object(405, "MethodNotAllowed", f"{method} is not supported here"))

    def _create_pytorchjob(self, request, ns: str, body):
        refusal = PYTORCHJOBS.refusal_of_create(ns, body)
        if refusal is not None:
            return request.reply(400, refusal)
        name = (body.get("metadata") or {}).get("name", "")
        causes = pytorchjob_causes(self.pytorchjob_validator, body)
        if causes:
            return request.reply(422, PYTORCHJOBS.invalid(name, causes))
        warnings = unknown_fields(self.pytorchjob_schema, body)
        with self.lock:
            if (ns, name) in self.jobs:
                return request.reply(409, PYTORCHJOBS.already_exists(name))
            self.warnings += warnings
            obj = json.loads(json.dumps(body))
            obj.pop("status", None)  # status is a subresource: ignored on create
            obj["metadata"].update({"namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                                    "generation": 1, "creationTimestamp": now()})
            script = self.scripts.get(name, self.default_script)
            if isinstance(obj["spec"].get("runPolicy"), dict):
                obj["spec"]["runPolicy"].setdefault("suspend", False)  # the CRD's default
            if KUEUE_QUEUE_LABEL in (obj["metadata"].get("labels") or {}) and script.steps[:1] == ["Suspended"]:
                obj["spec"].setdefault("runPolicy", {})["suspend"] = True  # Kueue's webhook: created suspended
            self.jobs[(ns, name)] = ScriptedJob(obj, script)
        request.reply(201, obj, warning_headers(warnings))
