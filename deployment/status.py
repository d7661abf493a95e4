"""Reading an InferenceService's (and a Deployment's) status: pure functions of the dicts the API
returns, no I/O, so every state a rollout can meet is a unit test of a dict.

The checks answer "why not done yet" (a one-line reason) or None when done; the rollout
(deployment/rollout.py) waits on them. Fields: KServe's InferenceServiceStatus
(pkg/apis/serving/v1beta1/inference_service_status.go: conditions, components[c].traffic,
latestCreatedRevision/latestReadyRevision/latestRolledoutRevision, modelStatus.lastFailureInfo)
and apps/v1 DeploymentStatus.
"""
from __future__ import annotations

from deployment.inferenceservice import COMPONENTS, DEPLOYMENT_MODE, steady_state

# The names before KServe 0.15; an object created then still carries them in status.deploymentMode.
LEGACY_MODES = {"Serverless": "Knative", "RawDeployment": "Standard"}


def conditions(obj: dict | None) -> dict[str, dict]:
    return {c.get("type"): c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def observed(obj: dict) -> bool:
    """The controller has seen the current generation."""
    seen = (obj.get("status") or {}).get("observedGeneration") or 0
    return seen >= ((obj.get("metadata") or {}).get("generation") or 0)


def mode(obj: dict) -> str | None:
    """Standard or Knative (legacy names mapped), from the status, else the annotation."""
    found = ((obj.get("status") or {}).get("deploymentMode") or
             ((obj.get("metadata") or {}).get("annotations") or {}).get(DEPLOYMENT_MODE))
    return LEGACY_MODES.get(found, found)


def ready(obj: dict) -> bool:
    return observed(obj) and conditions(obj).get("Ready", {}).get("status") == "True"


def components(obj: dict | None) -> list[str]:
    return [c for c in COMPONENTS if ((obj or {}).get("spec") or {}).get(c)]


def entry(obj: dict) -> str:
    """The component clients call: the separate transformer, else the predictor."""
    return "transformer" if (obj.get("spec") or {}).get("transformer") else "predictor"


def component_status(obj: dict | None, component: str) -> dict:
    return (((obj or {}).get("status") or {}).get("components") or {}).get(component) or {}


def revisions(obj: dict | None, field: str = "latestCreatedRevision") -> dict[str, str | None]:
    """Each component's `field` revision (latestCreatedRevision, latestRolledoutRevision)."""
    return {c: component_status(obj, c).get(field) for c in components(obj)}


def not_ready_reason(obj: dict | None) -> str:
    """The status's own words for why it is not (yet) serving."""
    if obj is None:
        return "the InferenceService does not exist"
    if not obj.get("status"):
        return "no status yet (is the KServe controller running?)"
    if not observed(obj):
        return (f"generation {obj['metadata'].get('generation')} not observed yet (observedGeneration "
                f"{obj['status'].get('observedGeneration')})")
    found = conditions(obj)
    for kind in [t for t in found if t != "Ready"] + ["Ready"]:
        cond = found.get(kind)
        if cond and cond.get("status") != "True":
            detail = ": ".join(p for p in (cond.get("reason"), cond.get("message")) if p)
            return f"{kind} is {cond.get('status')}" + (f" ({detail})" if detail else "")
    return "Ready"


def last_failure(obj: dict | None) -> str:
    """KServe's record of the last model load failure (`; last failure: ...`), or ''."""
    info = (((obj or {}).get("status") or {}).get("modelStatus") or {}).get("lastFailureInfo") or {}
    detail = ": ".join(p for p in (info.get("reason"), info.get("message")) if p)
    return f"; last failure: {detail}" if detail else ""


def percent_to(obj: dict, component: str, revision: str | None) -> int:
    return sum(t.get("percent") or 0 for t in component_status(obj, component).get("traffic") or []
               if revision and t.get("revisionName") == revision)


def tag_url(obj: dict, component: str, tag: str) -> str | None:
    for target in component_status(obj, component).get("traffic") or []:
        if target.get("tag") == tag and target.get("url"):
            return target["url"]
    return None


def url(obj: dict) -> str | None:
    return (obj.get("status") or {}).get("url") or component_status(obj, entry(obj)).get("url")


def model_name(obj: dict) -> str:
    """The --model_name the entry container serves (the path of /v1/models/NAME)."""
    for component in ("transformer", "predictor"):
        for container in ((obj.get("spec") or {}).get(component) or {}).get("containers") or []:
            args = container.get("args") or []
            if "--model_name" in args[:-1]:
                return args[args.index("--model_name") + 1]
    return obj["metadata"]["name"]


def changed_components(live: dict | None, desired: dict) -> list[str]:
    """Components whose pod template differs (canaryTrafficPercent aside): each gets a new revision."""
    old, new = steady_state({"spec": (live or {}).get("spec") or {}}), steady_state({"spec": desired.get("spec") or {}})
    return [c for c in COMPONENTS if new["spec"].get(c) and old["spec"].get(c) != new["spec"].get(c)]


def deployment_reason(dep: dict | None) -> str | None:
    """Why an apps/v1 Deployment is not rolled out yet, as `kubectl rollout status` reads it
    (kubectl/pkg/polymorphichelpers/rollout_status.go); None when it is, or when there is none to read."""
    if dep is None:
        return None
    meta, spec, status = dep.get("metadata") or {}, dep.get("spec") or {}, dep.get("status") or {}
    name = meta.get("name")
    wanted = spec.get("replicas") if spec.get("replicas") is not None else 1
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return f"Deployment {name}: {cond.get('reason')}: {cond.get('message')}"
    if (status.get("observedGeneration") or 0) < (meta.get("generation") or 0):
        return f"Deployment {name}: new spec not observed yet"
    updated, available = status.get("updatedReplicas") or 0, status.get("availableReplicas") or 0
    if updated < wanted:
        return f"Deployment {name}: {updated} of {wanted} replicas updated"
    if (status.get("replicas") or 0) > updated:
        return f"Deployment {name}: {status['replicas'] - updated} old replicas pending termination"
    if available < updated:
        return f"Deployment {name}: {available} of {updated} updated replicas available"
    return None


def revision_reason(obj: dict, component: str, changed: list[str], before: dict | None,
                    canary: int | None) -> str | None:
    """Knative: why `component`'s newest revision does not serve yet. A `changed` component needs a
    revision created since `before`; with `canary`, that revision must get exactly `canary`%."""
    state = component_status(obj, component)
    created, latest_ready = state.get("latestCreatedRevision"), state.get("latestReadyRevision")
    if component in changed and created == (before or {}).get(component):
        return f"{component}: no new revision yet (latest created {created})"
    if not created or latest_ready != created:
        return f"{component}: revision {created} not ready (latest ready {latest_ready}): " + not_ready_reason(obj)
    if canary is not None and component in changed and percent_to(obj, component, created) != canary:
        return (f"{component}: revision {created} has {percent_to(obj, component, created)}% of traffic, "
                f"waiting for {canary}%")
    return None


def serving_reason(obj: dict, deployments: dict[str, dict | None], changed: list[str] | None = None,
                   before: dict | None = None, canary: int | None = None) -> str | None:
    """Why the current generation does not serve yet, or None: Knative, each component's newest
    revision is ready (`revision_reason`); Standard, each component's Deployment (`deployments`,
    by component) is rolled out; then the Ready condition."""
    if not observed(obj):
        return not_ready_reason(obj)
    knative = mode(obj) == "Knative"
    for component in components(obj):
        if knative:
            reason = revision_reason(obj, component, changed or [], before, canary)
        else:
            reason = deployment_reason(deployments.get(component))
        if reason:
            return reason
    return None if ready(obj) else not_ready_reason(obj)


def traffic_reason(obj: dict, wanted: dict[str, str], percent: int) -> str | None:
    """Why each component's `wanted[component]` revision does not get `percent`% yet, or None."""
    if not observed(obj):
        return not_ready_reason(obj)
    for component, revision in wanted.items():
        got = percent_to(obj, component, revision)
        if got != percent:
            return f"{component}: revision {revision} has {got}% of traffic, waiting for {percent}%"
    return None


def traffic_split(obj: dict | None, mode_: str, versions: dict[str, str] | None, live: str | None) -> list[dict]:
    """[{revision, percent, tag, model_version}] of the entry component: Knative's revisions, or
    everything to the one Deployment in Standard mode."""
    if obj is None:
        return []
    if mode_ != "Knative":
        return [{"revision": None, "percent": 100, "tag": None, "model_version": live}]
    return [{"revision": t.get("revisionName"), "percent": t.get("percent"), "tag": t.get("tag"),
             "model_version": (versions or {}).get(t.get("revisionName"), live)}
            for t in component_status(obj, entry(obj)).get("traffic") or []]
