"""The KServe and Knative controllers of the fake's InferenceServices, scripted per InferenceService
(`IsvcScript`), one step per GET (kube_inferenceservices.py calls `changed` on a new generation and
`tick` on each read):

- the first GET after a change still shows the old status (observedGeneration behind);
- then each component whose pod template changed gets a new Knative revision
  (<name>-<component>-0000N) or a new Deployment generation, ready after `polls_to_ready` GETs,
  or never (`fail_when`), with the reason in the status as Knative/KServe put it;
- Knative traffic follows KServe's rules: canaryTrafficPercent N sends N% to the latest ready
  revision (tag `latest`) and the rest to the last rolled-out one (tag `prev`); without it 100%
  goes to the latest ready revision, which then becomes the rolled-out one. Tag URLs only with
  serving.kserve.io/enable-tag-routing: "true".
- Standard mode: the InferenceService stays Ready while old pods serve during a stuck rollout
  (kserve/kserve#4626); the Deployment's status tells the truth (ProgressDeadlineExceeded).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from tests.fakes.kube_core import now

ISVC_COMPONENTS = ("predictor", "transformer")
ISVC_DOMAIN = "example.com"


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
class Revision:
    name: str
    template: dict
    polls_left: int
    failure: Failure | None
    ready: bool = False
    failed: bool = False


@dataclass
class Isvc:
    """A stored InferenceService and what its controllers have made of it."""

    obj: dict
    script: IsvcScript
    observe_in: int = 0  # GETs before the controller sees the current generation
    observed: int = 0
    revisions: dict = field(default_factory=dict)  # component -> [Revision]
    rolled_out: dict = field(default_factory=dict)  # component -> revision name
    previous_rolled_out: dict = field(default_factory=dict)
    deployments: dict = field(default_factory=dict)  # component -> Deployment object (Standard)


def changed(entry: Isvc) -> None:
    """A new generation: the controllers see it one GET later."""
    entry.observe_in = 1


def tick(entry: Isvc) -> None:
    """One GET's worth of the controllers' work, then the status written."""
    generation = entry.obj["metadata"]["generation"]
    if entry.observe_in > 0:
        entry.observe_in -= 1
        return
    if entry.observed != generation:
        _observe(entry)
        entry.observed = generation
    else:
        for revisions in entry.revisions.values():
            for rev in revisions:
                if not rev.ready and not rev.failed:
                    rev.polls_left -= 1
                    if rev.polls_left <= 0:
                        rev.ready, rev.failed = rev.failure is None, rev.failure is not None
    _write_status(entry)


def _template(component_spec: dict) -> dict:
    return {k: v for k, v in component_spec.items() if k != "canaryTrafficPercent"}


def _observe(entry: Isvc) -> None:
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
        rev = Revision(f"{name}-{component}-{len(revisions) + 1:05d}", json.loads(json.dumps(template)),
                       entry.script.polls_to_ready, failure)
        if rev.polls_left <= 0:
            rev.ready, rev.failed = failure is None, failure is not None
        revisions.append(rev)


def _write_status(entry: Isvc) -> None:
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
        if revisions[-1].failed and revisions[-1].failure:
            failure_info = revisions[-1].failure
        if mode == "Knative":
            components[component], condition = _knative_component(entry, component, tags)
        else:
            components[component], condition = _standard_component(entry, component)
        conditions.append(condition)
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


def _knative_component(entry: Isvc, component: str, tags: bool) -> tuple[dict, dict]:
    """(status.components[component], its <Component>Ready condition) in Knative mode; traffic moves."""
    meta, spec = entry.obj["metadata"], entry.obj["spec"]
    name, ns = meta["name"], meta["namespace"]
    revisions = entry.revisions[component]
    created = revisions[-1]
    ready_revs = [r for r in revisions if r.ready]
    latest_ready = ready_revs[-1].name if ready_revs else None
    label = component.capitalize() + "Ready"
    state = {"latestCreatedRevision": created.name, "url": f"http://{name}-{component}.{ns}.{ISVC_DOMAIN}",
             "address": {"url": f"http://{name}-{component}.{ns}.svc.cluster.local"}}
    if latest_ready:
        state["latestReadyRevision"] = latest_ready
        canary = spec[component].get("canaryTrafficPercent")
        rolled = entry.rolled_out.get(component)
        if canary is not None and rolled:
            traffic = [{"tag": "latest", "latestRevision": True, "revisionName": latest_ready, "percent": canary},
                       {"tag": "prev", "latestRevision": False, "revisionName": rolled, "percent": 100 - canary}]
        else:
            traffic = [{"tag": "latest", "latestRevision": True, "revisionName": latest_ready, "percent": 100}]
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
        return state, {"type": label, "status": "True"}
    if created.failed:
        return state, {"type": label, "status": "False", "reason": created.failure.reason,
                       "message": f'Revision "{created.name}" failed with message: {created.failure.message}.'}
    return state, {"type": label, "status": "Unknown", "reason": "RevisionMissing",
                   "message": f'Configuration "{name}-{component}" is waiting for a Revision to become ready.'}


def _standard_component(entry: Isvc, component: str) -> tuple[dict, dict]:
    """(status.components[component], its <Component>Ready condition) in Standard mode; the Deployment follows."""
    meta = entry.obj["metadata"]
    name, ns = meta["name"], meta["namespace"]
    revisions = entry.revisions[component]
    _deployment(entry, component, revisions, entry.obj["spec"][component])
    state = {"url": f"http://{name}-{component}-{ns}.{ISVC_DOMAIN}",
             "address": {"url": f"http://{name}-{component}.{ns}.svc.cluster.local"}}
    label = component.capitalize() + "Ready"
    if any(r.ready for r in revisions):  # old pods still serve during a stuck rollout (kserve/kserve#4626)
        return state, {"type": label, "status": "True"}
    return state, {"type": label, "status": "False" if revisions[-1].failed else "Unknown",
                   "reason": "MinimumReplicasUnavailable",
                   "message": "Deployment does not have minimum availability."}


def _deployment(entry: Isvc, component: str, revisions: list, component_spec: dict) -> None:
    """Standard mode's Deployment for `component`, one generation per pod template."""
    meta = entry.obj["metadata"]
    dep_name = f"{meta['name']}-{component}"
    created = revisions[-1]
    replicas = max(1, component_spec.get("minReplicas") or 1)
    containers = [{"name": c.get("name", "kserve-container"), "image": c.get("image", "")}
                  for c in component_spec.get("containers") or []] or [{"name": "kserve-container", "image": ""}]
    labels = {"app": f"isvc.{dep_name}", "component": component, "serving.kserve.io/inferenceservice": meta["name"]}
    previous_ready = any(r.ready for r in revisions[:-1])
    replica_set = f'ReplicaSet "{dep_name}-{len(revisions)}"'
    if created.ready:
        status = {"replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas,
                  "availableReplicas": replicas,
                  "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                                  "message": "Deployment has minimum availability."},
                                 {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                                  "message": f"{replica_set} has successfully progressed."}]}
    else:
        old = replicas if previous_ready else 0
        progressing = ({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                        "message": f"{replica_set} has timed out progressing."}
                       if created.failed else
                       {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                        "message": f"{replica_set} is progressing."})
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
