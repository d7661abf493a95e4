"""The fake's Kubeflow Trainer v2 TrainJobs (trainer.kubeflow.org/v1alpha1): create, get, list and
delete the custom object, and the node pods JobSet runs for it.

A created TrainJob is parsed with the trainer API package's own `from_dict` (422 when it fails);
fields that parse drops are reported in a `Warning` header as pruned, and the CRD's CEL rules on the
name hold. Its script (`JobScript`) walks Created -> Running -> Complete or Failed; only the
terminal steps are conditions, as Trainer sets only those (and Suspended). Its node pods are named
and labelled as JobSet names and labels them (`<job>-node-0-<index>-<suffix>`,
jobset.sigs.k8s.io/jobset-name, batch.kubernetes.io/job-completion-index) and are built from
`spec.trainer` and the RuntimePatches of replicated job `node` (a plain merge, which is all our
patches need, not Trainer's strategic merge).

Kueue, scripted too: a step "Suspended" is Kueue suspending the TrainJob (`spec.suspend` true) and
Trainer v2.3 answering (pkg/controller/trainjob_controller.go setSuspendedCondition): condition
Suspended True, reason "Suspended", message "TrainJob is suspended"; the JobSet it suspends deletes
the node pods and counts its child Job suspended. "Resumed" is Kueue admitting it (the flag false):
Suspended False, reason "Resumed", message "TrainJob is resumed"; the Running/Complete steps after
it create the pods. Conditions are set as meta.SetStatusCondition sets them (one per type, updated
in place). A job carrying the queue label whose script starts "Suspended" is created suspended, as
Kueue's webhook does; with any other script there is no Kueue and the label is inert. The CRD's
default `spec.suspend: false` is applied on create (the fake applies no other CRD default).
"""
from __future__ import annotations

import json
import uuid

from tests.fakes.kube_core import (
    DNS1035,
    KUEUE_QUEUE_LABEL,
    CustomResource,
    Route,
    name_required,
    now,
    status_object,
    warning_headers,
)
from tests.fakes.kube_operators import JobScript, ScriptedJob, TrainingOperators

TRAINJOBS = CustomResource("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
TRAINJOB_STEPS = ("Created", "Suspended", "Resumed", "Running", "Complete", "Failed")
# What JobSet labels every pod with, and what an Indexed Job adds (the node's rank).
JOBSET_NAME, REPLICATED_JOB = "jobset.sigs.k8s.io/jobset-name", "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
NODE = "node"
# The terminal conditions Trainer copies from the JobSet's (jobset.x-k8s.io constants).
TRAINJOB_TERMINAL = {"Complete": ("AllJobsCompleted", "jobset completed successfully"),
                     "Failed": ("FailedJobs", "jobset failed due to one or more job failures")}
# Trainer's Suspended condition (trainjob_types.go TrainJobSuspendedReason/TrainJobResumedReason,
# constants.go TrainJobSuspendedMessage/TrainJobResumedMessage).
TRAINJOB_SUSPENDED = {True: ("True", "Suspended", "TrainJob is suspended"),
                      False: ("False", "Resumed", "TrainJob is resumed")}


def set_status_condition(status: dict, condition: dict) -> None:
    """apimachinery's meta.SetStatusCondition: a new type is appended; an existing one is updated in
    place (its lastTransitionTime only when its status changes)."""
    conditions = status.setdefault("conditions", [])
    current = next((c for c in conditions if c["type"] == condition["type"]), None)
    if current is None:
        conditions.append({**condition, "lastTransitionTime": now()})
        return
    if current["status"] != condition["status"]:
        current.update(status=condition["status"], lastTransitionTime=now())
    current.update(reason=condition["reason"], message=condition["message"])


def jobs_status(phase: str = "", suspended: bool = False) -> list[dict]:
    """The JobSet's one child Job (`node`) as Trainer counts it, its pods in `phase` ("": none yet)."""
    return [{"name": NODE, "ready": int(phase == "Running"), "succeeded": int(phase == "Succeeded"),
             "failed": int(phase == "Failed"), "active": int(phase in ("Pending", "Running")),
             "suspended": int(suspended)}]


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


class TrainJobs(TrainingOperators):
    """TrainJobs in `trainjobs`; `default_trainjob_script` for a job with no entry in `scripts`."""

    def __init__(self):
        super().__init__()
        self.trainjobs: dict[tuple[str, str], ScriptedJob] = {}
        self.default_trainjob_script = JobScript(steps=["Created", "Running", "Complete"])

    def routes(self) -> list[Route]:
        return [Route(TRAINJOBS.pattern, None, self._trainjobs), *super().routes()]

    def pod_script(self, ns: str, labels: dict) -> tuple[JobScript, bool] | None:
        if JOBSET_NAME not in labels:  # a TrainJob's node pod: node 0 logs the script's master log
            return super().pod_script(ns, labels)
        job = self.trainjobs.get((ns, labels[JOBSET_NAME]))
        return (job.script if job else self.default_trainjob_script), labels.get(COMPLETION_INDEX) == "0"

    # --- Trainer and JobSet -------------------------------------------------------------------

    def _advance_trainjob(self, job: ScriptedJob) -> None:
        """Move the TrainJob one step along its script; its status and node pods follow."""
        if job.step + 1 >= len(job.script.steps):
            return
        job.step += 1
        state = job.script.steps[job.step]
        if state not in TRAINJOB_STEPS:
            raise ValueError(f"a TrainJob script step is one of {TRAINJOB_STEPS}, got {state!r}")
        meta, status = job.obj["metadata"], job.obj.setdefault("status", {})
        ns, name = meta["namespace"], meta["name"]
        if any(c["type"] in TRAINJOB_TERMINAL and c["status"] == "True" for c in status.get("conditions") or []):
            raise ValueError(f"TrainJob {name} has finished: its script cannot go on to {state!r}")
        if state in ("Suspended", "Resumed"):
            return self._suspend_trainjob(job, state == "Suspended")
        if job.obj["spec"].get("suspend"):
            raise ValueError(f"TrainJob {name} is suspended: its JobSet runs no pods, so {state!r} needs a "
                             "'Resumed' step first")
        phase = {"Created": "Pending", "Running": "Running", "Complete": "Succeeded", "Failed": "Failed"}[state]
        if state in TRAINJOB_TERMINAL:
            reason, message = TRAINJOB_TERMINAL[state]
            set_status_condition(status, {"type": state, "status": "True", "reason": job.script.reason or reason,
                                          "message": job.script.message or message})
        # One child Job per replicated job: `node`.
        status["jobsStatus"] = jobs_status(phase)
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

    def _suspend_trainjob(self, job: ScriptedJob, suspend: bool) -> None:
        """Kueue sets `spec.suspend` (queues or preempts the job) or clears it (admits it); Trainer
        sets its Suspended condition and suspends or resumes the JobSet, whose Jobs' pods go."""
        meta, spec, status = job.obj["metadata"], job.obj["spec"], job.obj.setdefault("status", {})
        spec["suspend"] = suspend
        value, reason, message = TRAINJOB_SUSPENDED[suspend]
        was_suspended = any(c["type"] == "Suspended" and c["status"] == "True" for c in status.get("conditions") or [])
        if suspend or was_suspended:
            set_status_condition(status, {"type": "Suspended", "status": value, "reason": reason, "message": message})
        if suspend:
            self._delete_trainjob_pods(meta["namespace"], meta["name"])
            status["jobsStatus"] = jobs_status(suspended=True)
        elif was_suspended:
            status["jobsStatus"] = jobs_status()  # resumed; its pods come with the next steps

    def _delete_trainjob_pods(self, ns: str, name: str) -> None:
        for key in [k for k, p in self.pods.items() if k[0] == ns and p["metadata"]["labels"].get(JOBSET_NAME) == name]:
            del self.pods[key]

    # --- the API ----------------------------------------------------------------------------

    def _trainjobs(self, request, method: str, match, query: dict, body):
        ns, name = match.group(1), match.group(2)
        if method == "POST" and name is None:
            return self._create_trainjob(request, ns, body)
        if method == "GET" and name is None:
            with self.lock:
                items = [j.obj for (jns, _), j in self.trainjobs.items() if jns == ns]
            return request.reply(200, TRAINJOBS.listing(items))
        with self.lock:
            job = self.trainjobs.get((ns, name))
            if job is None:
                return request.reply(404, TRAINJOBS.not_found(name))
            if method == "GET":
                self._advance_trainjob(job)
                return request.reply(200, job.obj)
            if method == "DELETE":
                del self.trainjobs[(ns, name)]
                self._delete_trainjob_pods(ns, name)  # garbage collection of the JobSet and its pods
                return request.reply(200, TRAINJOBS.deleted(name, job.obj["metadata"]["uid"]))
        request.reply(405, status_object(405, "MethodNotAllowed", f"{method} is not supported here"))

    def _create_trainjob(self, request, ns: str, body):
        refusal = TRAINJOBS.refusal_of_create(ns, body)
        if refusal is not None:
            return request.reply(400, refusal)
        name = (body.get("metadata") or {}).get("name", "")
        causes, warnings = trainjob_problems(body)
        if not name:
            causes.insert(0, name_required())
        if causes:
            return request.reply(422, TRAINJOBS.invalid(name, causes))
        with self.lock:
            if (ns, name) in self.trainjobs:
                return request.reply(409, TRAINJOBS.already_exists(name))
            self.warnings += warnings
            obj = json.loads(json.dumps(body))
            obj.pop("status", None)  # status is a subresource: ignored on create
            obj["metadata"].update({"namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                                    "generation": 1, "creationTimestamp": now()})
            script = self.scripts.get(name, self.default_trainjob_script)
            obj["spec"].setdefault("suspend", False)  # the CRD's default
            if KUEUE_QUEUE_LABEL in (obj["metadata"].get("labels") or {}) and script.steps[:1] == ["Suspended"]:
                obj["spec"]["suspend"] = True  # Kueue's webhook: a queued job is created suspended
            self.trainjobs[(ns, name)] = ScriptedJob(obj, script)
        request.reply(201, obj, warning_headers(warnings))
