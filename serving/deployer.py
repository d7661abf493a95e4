"""Put the champion on a cluster as an InferenceService and roll it out safely.

    deploy(settings, model, smoke_test)   create, or update with a rollout, then report what is live
    rollback(settings, previous)          serve the registry's previous champion again
    plan(settings, model)                 the validated object `deploy` would apply (--dry-run)
    registry_model(tracking_uri, name, alias)  champion / previous-champion from MLflow

`settings` is a pipelines.config Settings or a specs.DeploySpec (what the deploy task receives);
`serving.deploy` is what picks this deployer or the local one by `serving.deployer`.

Rollouts (KServe docs, "Canary rollout" and "Rollout strategies"):

- Knative with canary_percent > 0: the new spec goes on with `canaryTrafficPercent: N` (N% to the
  latest ready revision, the rest to the last rolled-out one). Once the canary revision is ready,
  the smoke test sends a real request to its `latest-` tagged URL
  (`serving.kserve.io/enable-tag-routing`). Pass: the field is removed (100% to the latest revision:
  promoted). Fail: `canaryTrafficPercent: 0` pins all traffic to the previous revision at once;
  then the previous spec is restored (still at 0%, so the bad revision never gets traffic while
  the restored one starts) and, once its revision is ready, the field is removed again.
- Standard (Deployment + HPA), or Knative without a canary: a rolling update (patch), wait until
  it is rolled out, the same smoke test on the service URL; a failure or a timeout re-applies the
  previous spec. Standard mode's InferenceService can report Ready while its Deployment is still
  rolling out (kserve/kserve#4626), so the Deployments are checked as `kubectl rollout status` does.

Calls go through `kserve.KServeClient`'s API clients (in-cluster config by default, or a
`kubernetes.client.Configuration`). Not through `KServeClient.patch` itself: it serializes a model
object, which drops None, so it cannot send the JSON-merge-patch nulls that remove a field
(`canaryTrafficPercent`, or a transformer a new spec no longer has).
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from serving.inferenceservice import (
    COMPONENTS,
    DEPLOYMENT_MODE,
    MANAGED_PREFIXES,
    MODEL_VERSION,
    ServedModel,
    render,
    render_for,
    steady_state,
    validate_inferenceservice,
)
from specs import DeploySpec
from storage.endpoints import doing, one_line, probe

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
# The names before KServe 0.15; an object created then still carries them in status.deploymentMode.
LEGACY_MODES = {"Serverless": "Knative", "RawDeployment": "Standard"}
# (connect, read) seconds for each API call: the Kubernetes client waits forever by default
# (`_request_timeout`, kubernetes/client/rest.py); waits for a rollout are our own polling loops.
REQUEST_TIMEOUT = (5, 60)


class DeployError(RuntimeError):
    """The API refused a call, or a rollout could not finish (see `reason`)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class RolloutTimeout(DeployError):
    """A wait ran out; `reason` is what the status said last."""

    def __init__(self, what: str, timeout: float, reason: str, obj: dict | None):
        super().__init__(f"{what}: not done after {timeout:g}s: {reason}", reason)
        self.obj = obj


class SmokeFailed(DeployError):
    """The smoke test rejected the new model."""


@dataclass(frozen=True)
class SmokeTarget:
    """What a smoke test calls: `url` is the component that takes client traffic (the
    transformer when separate), the canary's `latest-` URL during a canary."""

    url: str
    model_name: str
    model_version: str
    canary: bool
    revision: str | None = None
    predictor_url: str | None = None


SmokeTest = Callable[[SmokeTarget], Any]


@dataclass
class Rollout:
    """What a deploy or rollback left live."""

    name: str
    namespace: str
    mode: str
    outcome: str  # created | updated | promoted | unchanged | rolled_back | failed
    candidate_version: str
    live_version: str | None
    url: str | None
    traffic: list[dict] = field(default_factory=list)  # [{revision, percent, tag, model_version}]
    reason: str | None = None
    steps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the candidate (the model deployed, or rolled back to) is what serves now."""
        return self.outcome != "failed" and self.live_version == self.candidate_version

    def summary(self) -> str:
        split = ", ".join(f"{t.get('percent')}% " + (f"{t['revision']} " if t.get("revision") else "") +
                          f"(v{t.get('model_version')})" for t in self.traffic)
        text = (f"InferenceService {self.namespace}/{self.name} ({self.mode}): {self.outcome}; live model version "
                f"{self.live_version}; url {self.url}; traffic {split or 'n/a'}")
        return text + (f"; reason: {self.reason}" if self.reason else "")


def kserve_client(client_configuration=None):
    """A `kserve.KServeClient`: in-cluster config in a pod (else ~/.kube/config), or `client_configuration`.
    KServeClient's constructor always loads a kubeconfig into the process-wide default, even when
    given a Configuration, so with one it gets API clients of its own instead."""
    from kserve import KServeClient
    from kubernetes import client as k8s
    from kubernetes.config import ConfigException

    if client_configuration is None:
        try:
            kserve = KServeClient()
        except (ConfigException, OSError) as err:  # neither a pod's service account nor a kubeconfig
            raise DeployError(f"no Kubernetes API configured: {one_line(err)} (run in a pod, or point $KUBECONFIG "
                              "or ~/.kube/config at the cluster)") from None
        client_configuration = kserve.api_instance.api_client.configuration
    else:
        api = k8s.ApiClient(client_configuration)
        kserve = KServeClient.__new__(KServeClient)
        kserve.core_api, kserve.app_api = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
        kserve.api_instance, kserve.hpa_v2_api = k8s.CustomObjectsApi(api), k8s.AutoscalingV2Api(api)
    # Before the first call: a server that is not there fails in seconds, not after the client's
    # retries of connects that have no timeout (storage/endpoints.py).
    probe("the Kubernetes API", client_configuration.host, proxy=client_configuration.proxy)
    return kserve


def merge_patch(current, desired):
    """The RFC 7386 JSON merge patch that turns `current` into `desired` (None removes a key;
    lists are replaced whole)."""
    if not isinstance(current, dict) or not isinstance(desired, dict):
        return desired
    patch = {key: None for key in current if key not in desired}
    for key, value in desired.items():
        if key not in current:
            patch[key] = value
        elif current[key] != value:
            patch[key] = merge_patch(current[key], value) if isinstance(value, dict) else value
    return patch


def _managed(mapping: dict | None) -> dict:
    return {k: v for k, v in (mapping or {}).items() if k.startswith(MANAGED_PREFIXES)}


def _restorable(obj: dict) -> dict:
    """The part of a live object a rollback puts back: our labels and annotations, and the spec."""
    meta = obj.get("metadata") or {}
    return steady_state({"metadata": {"labels": _managed(meta.get("labels")),
                                      "annotations": _managed(meta.get("annotations"))},
                         "spec": obj.get("spec") or {}})


def _patch_body(live: dict, desired: dict) -> dict:
    meta, want = live.get("metadata") or {}, desired.get("metadata") or {}
    body = {"metadata": {"labels": merge_patch(_managed(meta.get("labels")), want.get("labels") or {}),
                         "annotations": merge_patch(_managed(meta.get("annotations")), want.get("annotations") or {})},
            "spec": merge_patch(live.get("spec") or {}, desired.get("spec") or {})}
    body["metadata"] = {k: v for k, v in body["metadata"].items() if v}
    return {k: v for k, v in body.items() if v}


# --- reading status ---------------------------------------------------------------------------


def _conditions(obj: dict | None) -> dict[str, dict]:
    return {c.get("type"): c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def _observed(obj: dict) -> bool:
    observed = (obj.get("status") or {}).get("observedGeneration") or 0
    return observed >= ((obj.get("metadata") or {}).get("generation") or 0)


def _mode(obj: dict) -> str | None:
    """Standard or Knative (legacy names mapped), from the status, else the annotation."""
    mode = ((obj.get("status") or {}).get("deploymentMode") or
            ((obj.get("metadata") or {}).get("annotations") or {}).get(DEPLOYMENT_MODE))
    return LEGACY_MODES.get(mode, mode)


def _ready(obj: dict) -> bool:
    return _observed(obj) and _conditions(obj).get("Ready", {}).get("status") == "True"


def _components(obj: dict) -> list[str]:
    return [c for c in COMPONENTS if (obj.get("spec") or {}).get(c)]


def _entry(obj: dict) -> str:
    """The component clients call: the separate transformer, else the predictor."""
    return "transformer" if (obj.get("spec") or {}).get("transformer") else "predictor"


def _status_of(obj: dict | None, component: str) -> dict:
    return (((obj or {}).get("status") or {}).get("components") or {}).get(component) or {}


def not_ready_reason(obj: dict | None) -> str:
    """The status's own words for why it is not (yet) serving."""
    if obj is None:
        return "the InferenceService does not exist"
    if not obj.get("status"):
        return "no status yet (is the KServe controller running?)"
    if not _observed(obj):
        return (f"generation {obj['metadata'].get('generation')} not observed yet (observedGeneration "
                f"{obj['status'].get('observedGeneration')})")
    conditions = _conditions(obj)
    order = [t for t in conditions if t != "Ready"] + ["Ready"]
    for kind in order:
        cond = conditions.get(kind)
        if cond and cond.get("status") != "True":
            detail = ": ".join(p for p in (cond.get("reason"), cond.get("message")) if p)
            return f"{kind} is {cond.get('status')}" + (f" ({detail})" if detail else "")
    return "Ready"


def _last_failure(obj: dict | None) -> str:
    """KServe's record of the last model load failure, when it has one."""
    info = (((obj or {}).get("status") or {}).get("modelStatus") or {}).get("lastFailureInfo") or {}
    detail = ": ".join(p for p in (info.get("reason"), info.get("message")) if p)
    return f"; last failure: {detail}" if detail else ""


def _percent_to(obj: dict, component: str, revision: str | None) -> int:
    return sum(t.get("percent") or 0 for t in _status_of(obj, component).get("traffic") or []
               if revision and t.get("revisionName") == revision)


def _tag_url(obj: dict, component: str, tag: str) -> str | None:
    for target in _status_of(obj, component).get("traffic") or []:
        if target.get("tag") == tag and target.get("url"):
            return target["url"]
    return None


def _url(obj: dict) -> str | None:
    status = obj.get("status") or {}
    return status.get("url") or _status_of(obj, _entry(obj)).get("url")


# --- the deployer -----------------------------------------------------------------------------


class InferenceServiceDeployer:
    """Create-or-patch one namespace's InferenceServices, wait for them, roll out and back."""

    def __init__(self, namespace: str, *, client=None, client_configuration=None, timeout: float = 300.0,
                 poll_interval: float = 5.0, log: Callable[[str], None] = print):
        self.namespace, self.timeout, self.poll_interval, self.log = namespace, timeout, poll_interval, log
        self._client, self._configuration = client, client_configuration
        self._steps: list[str] = []

    @property
    def client(self):
        """Created on first use: rendering and validating need no cluster."""
        if self._client is None:
            self._client = kserve_client(self._configuration)
        return self._client

    def _say(self, message: str) -> None:
        self._steps.append(message)
        self.log(message)

    # API calls -------------------------------------------------------------------------------

    def _api_error(self, verb: str, name: str, err) -> DeployError:
        try:
            message = json.loads(err.body).get("message") or err.body
        except (TypeError, ValueError):
            message = err.body or str(err)
        return DeployError(f"{verb} InferenceService {self.namespace}/{name}: {err.status} {err.reason}: {message}",
                           f"{err.status} {err.reason}")

    def get(self, name: str) -> dict | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.client.api_instance.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                                         _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status == 404:
                return None
            raise self._api_error("get", name, err) from None

    def create(self, body: dict) -> dict:
        from kubernetes.client.rest import ApiException

        try:
            return self.client.api_instance.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                                            body, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            raise self._api_error("create", body["metadata"]["name"], err) from None

    def patch(self, name: str, body: dict) -> dict:
        """A JSON merge patch (the content type the Kubernetes client sends for custom objects)."""
        from kubernetes.client.rest import ApiException

        try:
            return self.client.api_instance.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                                           name, body, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            raise self._api_error("patch", name, err) from None

    def delete(self, name: str) -> None:
        self.client.delete(name, namespace=self.namespace)

    def _patch_to(self, live: dict, desired: dict) -> tuple[dict, bool]:
        """Patch `live` into `desired`; (the object after, whether its spec changed)."""
        body = _patch_body(live, desired)
        if not body:
            return live, False
        after = self.patch(live["metadata"]["name"], body)
        changed = (after["metadata"].get("generation") or 0) != (live["metadata"].get("generation") or 0)
        return after, changed

    def _set_canary(self, obj: dict, percent: int | None) -> dict:
        """canaryTrafficPercent on every component (None removes it)."""
        body = {"spec": {c: {"canaryTrafficPercent": percent} for c in _components(obj)}}
        return self.patch(obj["metadata"]["name"], body)

    # waiting ---------------------------------------------------------------------------------

    def _deployment_reason(self, name: str, component: str) -> str | None:
        """None when the component's Deployment is rolled out (or cannot be read); else why not."""
        from kubernetes.client.rest import ApiException

        try:
            dep = self.client.app_api.read_namespaced_deployment(f"{name}-{component}", self.namespace,
                                                                 _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status in (403, 404):
                return None  # no such Deployment to check (or no right to): the InferenceService status decides
            raise
        spec_replicas = dep.spec.replicas if dep.spec.replicas is not None else 1
        status = dep.status
        for cond in status.conditions or []:
            if cond.type == "Progressing" and cond.reason == "ProgressDeadlineExceeded":
                return f"Deployment {dep.metadata.name}: {cond.reason}: {cond.message}"
        if (status.observed_generation or 0) < (dep.metadata.generation or 0):
            return f"Deployment {dep.metadata.name}: new spec not observed yet"
        updated, available = status.updated_replicas or 0, status.available_replicas or 0
        if updated < spec_replicas:
            return f"Deployment {dep.metadata.name}: {updated} of {spec_replicas} replicas updated"
        if (status.replicas or 0) > updated:
            return f"Deployment {dep.metadata.name}: {status.replicas - updated} old replicas pending termination"
        if available < updated:
            return f"Deployment {dep.metadata.name}: {available} of {updated} updated replicas available"
        return None

    def _wait(self, name: str, what: str, check: Callable[[dict], str | None]) -> dict:
        """Poll until `check(obj)` returns None (done); it returns why not otherwise."""
        deadline = time.monotonic() + self.timeout
        while True:
            obj = self.get(name)
            reason = check(obj) if obj is not None else "the InferenceService does not exist"
            if reason is None:
                return obj
            if time.monotonic() >= deadline:
                raise RolloutTimeout(f"{self.namespace}/{name}: {what}", self.timeout, reason + _last_failure(obj), obj)
            time.sleep(self.poll_interval)

    def _serving_check(self, components: list[str] | None = None, before: dict | None = None,
                       canary: int | None = None) -> Callable[[dict], str | None]:
        """Done when the current generation is Ready and each component's newest spec serves:
        Knative, its latest created revision (a new one for `components` changed since `before`)
        is ready, and gets `canary`% when given; Standard, its Deployment is rolled out."""

        def check(obj: dict) -> str | None:
            knative = _mode(obj) == "Knative"
            if not _observed(obj):
                return not_ready_reason(obj)
            for component in _components(obj):
                state = _status_of(obj, component)
                if knative:
                    created, ready = state.get("latestCreatedRevision"), state.get("latestReadyRevision")
                    if components and component in components and created == (before or {}).get(component):
                        return f"{component}: no new revision yet (latest created {created})"
                    if not created or ready != created:
                        return f"{component}: revision {created} not ready (latest ready {ready}): " + \
                            not_ready_reason(obj)
                    if canary is not None and component in (components or []) and \
                            _percent_to(obj, component, created) != canary:
                        return f"{component}: revision {created} has {_percent_to(obj, component, created)}% " \
                               f"of traffic, waiting for {canary}%"
                else:
                    reason = self._deployment_reason(obj["metadata"]["name"], component)
                    if reason:
                        return reason
            if not _ready(obj):
                return not_ready_reason(obj)
            return None

        return check

    def _traffic_check(self, revisions: dict[str, str], percent: int) -> Callable[[dict], str | None]:
        """Done when each component's `revisions[component]` gets `percent`% of its traffic."""

        def check(obj: dict) -> str | None:
            if not _observed(obj):
                return not_ready_reason(obj)
            for component, revision in revisions.items():
                got = _percent_to(obj, component, revision)
                if got != percent:
                    return f"{component}: revision {revision} has {got}% of traffic, waiting for {percent}%"
            return None

        return check

    # smoke test ------------------------------------------------------------------------------

    def _smoke(self, smoke_test: SmokeTest | None, target: SmokeTarget) -> str | None:
        """None when it passes (or there is none); else the failure."""
        if smoke_test is None:
            self._say("no smoke test given: readiness is the only check")
            return None
        self._say(f"smoke test: {target.url} (model version {target.model_version})")
        try:
            verdict = smoke_test(target)
        except Exception as err:  # whatever the test raises is its verdict
            return f"smoke test failed: {type(err).__name__}: {err}"
        return "smoke test failed: it returned False" if verdict is False else None

    # reports ---------------------------------------------------------------------------------

    def _report(self, obj: dict | None, name: str, mode: str, outcome: str, candidate: str,
                versions: dict[str, str] | None = None, reason: str | None = None) -> Rollout:
        live = ((obj or {}).get("metadata") or {}).get("annotations", {}).get(MODEL_VERSION) if obj else None
        traffic = []
        if obj is not None and mode == "Knative":
            for target in _status_of(obj, _entry(obj)).get("traffic") or []:
                revision = target.get("revisionName")
                traffic.append({"revision": revision, "percent": target.get("percent"), "tag": target.get("tag"),
                                "model_version": (versions or {}).get(revision, live)})
        elif obj is not None:
            traffic.append({"revision": None, "percent": 100, "tag": None, "model_version": live})
        result = Rollout(name, self.namespace, mode, outcome, candidate, live, _url(obj) if obj else None, traffic,
                         reason, list(self._steps))
        self.log(result.summary())
        return result

    # rollouts --------------------------------------------------------------------------------

    def deploy(self, isvc, smoke_test: SmokeTest | None = None, *, canary: bool = True,
               revert: bool = True) -> Rollout:
        """Create the InferenceService, or roll the new spec out over the live one (canary in
        Knative mode when the spec carries canaryTrafficPercent and `canary`), with the smoke test
        and rollback described in this module's docstring. `revert=False` leaves a rolling update
        that failed in place (a rollback must not roll back to what it replaces)."""
        desired = validate_inferenceservice(isvc)
        self._steps = []
        name = desired["metadata"]["name"]
        mode = desired["metadata"]["annotations"][DEPLOYMENT_MODE]
        candidate = desired["metadata"]["annotations"][MODEL_VERSION]
        if desired["metadata"].get("namespace") != self.namespace:
            raise DeployError(f"InferenceService {name} is for namespace {desired['metadata'].get('namespace')!r}, "
                              f"this deployer deploys to {self.namespace!r}")
        with doing(f"reading InferenceService {self.namespace}/{name}"):
            live = self.get(name)
        if live is None:
            return self._first(desired, mode, candidate, smoke_test)
        live_mode = (live.get("status") or {}).get("deploymentMode")
        if _mode(live) != mode:
            # KServe's webhook refuses it (validateDeploymentMode): the object must be recreated.
            raise DeployError(f"{self.namespace}/{name} runs in {_mode(live)} mode; changing it to {mode} in place is "
                              "rejected by KServe: delete the InferenceService and deploy again")
        if live_mode in LEGACY_MODES:
            # The webhook compares the annotation with status.deploymentMode as strings: keep its spelling.
            desired["metadata"]["annotations"][DEPLOYMENT_MODE] = live_mode
        if not _changed_components(live, desired):
            # Same pods as now: only our labels/annotations (and a stray canary field) to align.
            after, _ = self._patch_to(live, steady_state(desired))
            self._say(f"{self.namespace}/{name} already serves this spec: nothing to roll out")
            return self._report(self.get(name) or after, name, mode, "unchanged", candidate)
        percent = max((desired["spec"][c].get("canaryTrafficPercent") or 0) for c in _components(desired))
        if mode == "Knative" and canary and percent > 0:
            return self._canary(live, desired, mode, candidate, percent, smoke_test)
        return self._rolling(live, steady_state(desired), mode, candidate, smoke_test, revert)

    def _first(self, desired: dict, mode: str, candidate: str, smoke_test) -> Rollout:
        name = desired["metadata"]["name"]
        # Nothing to split traffic with yet: KServe gives the first revision everything anyway.
        self._say(f"creating InferenceService {self.namespace}/{name} ({mode}, model version {candidate})")
        self.create(steady_state(desired))
        try:
            obj = self._wait(name, "first rollout", self._serving_check())
        except RolloutTimeout as err:
            self._say(f"not ready: {err.reason}")
            return self._report(err.obj, name, mode, "failed", candidate, reason=err.reason)
        failure = self._smoke(smoke_test, SmokeTarget(_url(obj), _model_name(obj), candidate, canary=False,
                                                      predictor_url=_status_of(obj, "predictor").get("url")))
        if failure:
            self._say(failure + " (nothing to roll back to: the first deployment is left for inspection)")
            return self._report(obj, name, mode, "failed", candidate, reason=failure)
        return self._report(obj, name, mode, "created", candidate)

    def _rolling(self, live: dict, desired: dict, mode: str, candidate: str, smoke_test,
                 revert: bool = True) -> Rollout:
        name = live["metadata"]["name"]
        previous = _restorable(live)
        before = {c: _status_of(live, c).get("latestCreatedRevision") for c in _components(live)}
        changed_components = _changed_components(live, desired)
        self._say(f"rolling update of {self.namespace}/{name} to model version {candidate} ({mode})")
        after, changed = self._patch_to(live, desired)
        if not changed:
            self._say("spec unchanged: nothing to roll out")
            return self._report(self.get(name) or after, name, mode, "unchanged", candidate)
        try:
            obj = self._wait(name, "rolling update", self._serving_check(changed_components, before))
            failure = self._smoke(smoke_test, SmokeTarget(_url(obj), _model_name(obj), candidate, canary=False,
                                                          predictor_url=_status_of(obj, "predictor").get("url")))
        except RolloutTimeout as err:
            failure = f"not ready: {err.reason}"
        if not failure:
            return self._report(obj, name, mode, "updated", candidate)
        if not revert:
            self._say(f"{failure}; left as it is")
            return self._report(self.get(name), name, mode, "failed", candidate, reason=failure)
        self._say(f"{failure}; re-applying the previous spec")
        return self._restore(name, previous, mode, candidate, failure)

    def _restore(self, name: str, previous: dict, mode: str, candidate: str, failure: str) -> Rollout:
        current = self.get(name)
        before = {c: _status_of(current, c).get("latestCreatedRevision") for c in _components(current)}
        changed_components = _changed_components(current, previous)
        self._patch_to(current, previous)
        try:
            obj = self._wait(name, "rollback", self._serving_check(changed_components, before))
        except RolloutTimeout as err:
            self._say(f"rollback not ready either: {err.reason}")
            return self._report(err.obj, name, mode, "failed", candidate,
                                reason=f"{failure}; rollback not ready: {err.reason}")
        return self._report(obj, name, mode, "rolled_back", candidate, reason=failure)

    def _canary(self, live: dict, desired: dict, mode: str, candidate: str, percent: int, smoke_test) -> Rollout:
        name = live["metadata"]["name"]
        previous = _restorable(live)
        previous_version = (live["metadata"].get("annotations") or {}).get(MODEL_VERSION)
        before = {c: _status_of(live, c).get("latestCreatedRevision") for c in _components(live)}
        changed_components = _changed_components(live, desired)
        self._say(f"canary of {self.namespace}/{name}: model version {candidate} gets {percent}% "
                  f"(version {previous_version} keeps the rest)")
        after, changed = self._patch_to(live, desired)
        if not changed:
            self._say("spec unchanged: nothing to roll out")
            return self._report(self.get(name) or after, name, mode, "unchanged", candidate)
        versions: dict[str, str] = {}
        try:
            obj = self._wait(name, "canary revision", self._serving_check(changed_components, before, canary=percent))
            revisions = {c: _status_of(obj, c)["latestCreatedRevision"] for c in changed_components}
            versions.update({r: candidate for r in revisions.values()})
            entry = _entry(obj)
            url = _tag_url(obj, entry, "latest")
            if url is None:
                failure = (f"smoke test impossible: {entry} has no 'latest' tagged URL (is "
                           f"serving.kserve.io/enable-tag-routing on?)")
            else:
                failure = self._smoke(smoke_test, SmokeTarget(
                    url, _model_name(obj), candidate, canary=True, revision=_status_of(obj, entry).get(
                        "latestCreatedRevision"), predictor_url=_tag_url(obj, "predictor", "latest")))
        except RolloutTimeout as err:
            failure = f"canary not ready: {err.reason}"
        if not failure:
            self._say(f"promoting model version {candidate} to 100%")
            self._set_canary(obj, None)
            try:
                obj = self._wait(name, "promotion", self._traffic_check(revisions, 100))
            except RolloutTimeout as err:
                return self._report(err.obj, name, mode, "failed", candidate, versions,
                                    reason=f"promotion did not finish: {err.reason}")
            return self._report(obj, name, mode, "promoted", candidate, versions)
        self._say(f"{failure}; pinning all traffic to the previous revision")
        return self._canary_rollback(name, previous, previous_version, mode, candidate, failure, versions)

    def _canary_rollback(self, name: str, previous: dict, previous_version: str | None, mode: str, candidate: str,
                         failure: str, versions: dict[str, str]) -> Rollout:
        current = self.get(name)
        # 1. canaryTrafficPercent 0: everything to the last rolled-out revision, at once.
        rolled_out = {c: _status_of(current, c).get("latestRolledoutRevision") for c in _components(current)}
        versions.update({r: previous_version for r in rolled_out.values() if r})
        current = self._set_canary(current, 0)
        try:
            self._wait(name, "rollback to the previous revision",
                       self._traffic_check({c: r for c, r in rolled_out.items() if r}, 100))
            # 2. The previous spec back, still at 0%: the restored revision starts without traffic.
            current = self.get(name)
            before = {c: _status_of(current, c).get("latestCreatedRevision") for c in _components(current)}
            restore = json.loads(json.dumps(previous))
            for component in _components(restore):
                restore["spec"][component]["canaryTrafficPercent"] = 0
            changed_components = _changed_components(current, restore)
            self._say("restoring the previous spec (at 0% until its revision is ready)")
            self._patch_to(current, restore)
            obj = self._wait(name, "restored revision", self._serving_check(changed_components, before, canary=0))
            restored = {c: _status_of(obj, c)["latestCreatedRevision"] for c in changed_components}
            versions.update({r: previous_version for r in restored.values()})
            # 3. The restored revision takes over: the previous spec exactly, no canary field.
            self._set_canary(obj, None)
            obj = self._wait(name, "restored revision at 100%", self._traffic_check(restored, 100))
        except RolloutTimeout as err:
            self._say(f"rollback incomplete: {err.reason}")
            return self._report(err.obj, name, mode, "failed", candidate, versions,
                                reason=f"{failure}; rollback incomplete: {err.reason}")
        return self._report(obj, name, mode, "rolled_back", candidate, versions, reason=failure)


def _model_name(obj: dict) -> str:
    """The --model_name the entry container serves (the path of /v1/models/NAME)."""
    for component in ("transformer", "predictor"):
        for container in ((obj.get("spec") or {}).get(component) or {}).get("containers") or []:
            args = container.get("args") or []
            if "--model_name" in args[:-1]:
                return args[args.index("--model_name") + 1]
    return obj["metadata"]["name"]


def _changed_components(live: dict, desired: dict) -> list[str]:
    """Components whose pod template differs (canaryTrafficPercent aside): each gets a new revision."""
    old, new = steady_state({"spec": live.get("spec") or {}}), steady_state({"spec": desired.get("spec") or {}})
    return [c for c in COMPONENTS if new["spec"].get(c) and old["spec"].get(c) != new["spec"].get(c)]


# --- what the CLI calls -----------------------------------------------------------------------


def _render(settings, model: ServedModel, *, canary: bool = True):
    """`render_for(settings, ...)`; a `specs.DeploySpec` (what the deploy task receives) carries
    the same pieces under its own names and renders through `render` directly."""
    if isinstance(settings, DeploySpec):
        return render(settings.serving, image=settings.image, namespace=settings.namespace, env=settings.env,
                      model=model, object_store_endpoint=settings.object_store_endpoint, canary=canary,
                      decision_threshold=settings.decision_threshold)
    return render_for(settings, model, canary=canary)


def plan(settings, model: ServedModel, *, canary: bool = True) -> dict:
    """The validated InferenceService `deploy` would apply for `settings` (a pipelines.config
    Settings, or a specs.DeploySpec), as a dict: print it for --dry-run. Raises InferenceServiceInvalid."""
    return validate_inferenceservice(_render(settings, model, canary=canary))


def _deployer(settings, options: dict) -> InferenceServiceDeployer:
    options.setdefault("timeout", settings.serving.ready_timeout_seconds)
    return InferenceServiceDeployer(settings.namespace, **options)


def deploy(settings, model: ServedModel, smoke_test: SmokeTest | None = None, **options) -> Rollout:
    """Serve `model` in `settings`' environment: create, or roll out (canary in Knative mode with
    canary_percent > 0, else a rolling update), smoke-test, promote or roll back. `options` go to
    InferenceServiceDeployer (client, client_configuration, timeout, poll_interval, log)."""
    return _deployer(settings, options).deploy(_render(settings, model), smoke_test)


def rollback(settings, previous: ServedModel, smoke_test: SmokeTest | None = None, **options) -> Rollout:
    """Serve `previous` (the registry's previous champion) again, at once: no canary, since the
    live model is the one being abandoned. A failed smoke test is reported, not undone."""
    deployer = _deployer(settings, options)
    result = deployer.deploy(_render(settings, previous, canary=False), smoke_test, canary=False, revert=False)
    if result.outcome == "updated":
        result.outcome = "rolled_back"
    return result


def registry_model(tracking_uri: str, registered_model: str, alias: str | None = None) -> ServedModel | None:
    """The model version behind `alias` (default `champion`; `previous-champion` for a rollback)
    and the storage URI of the flywheel model directory inside it, or None when there is none."""
    from stages import versions

    version = versions.version_behind(tracking_uri, registered_model, alias or versions.CHAMPION)
    if version is None:
        return None
    return ServedModel(registered_model, version, versions.model_dir_uri(tracking_uri, registered_model, version))


# --- a smoke test over HTTP -------------------------------------------------------------------


def http_smoke_test(records: list[dict], *, ingress: str | None = None, timeout: float = 10.0,
                    headers: dict[str, str] | None = None) -> SmokeTest:
    """A smoke test that POSTs `records` to `{url}/v1/models/{name}:predict` and wants one
    prediction per record. With `ingress` (e.g. http://istio-ingressgateway.istio-system) the
    request goes there with the target's host in the Host header, as from outside the mesh."""

    def smoke(target: SmokeTarget) -> dict:
        parts = urlsplit(target.url)
        base = ingress.rstrip("/") if ingress else f"{parts.scheme}://{parts.netloc}"
        extra = {"Host": parts.netloc} if ingress else {}
        request = urllib.request.Request(
            f"{base}/v1/models/{target.model_name}:predict", data=json.dumps({"instances": records}).encode(),
            headers={"content-type": "application/json", **extra, **(headers or {})}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise SmokeFailed(f"POST {request.full_url} -> {err.code}: "
                              f"{err.read().decode(errors='replace')[:300]}") from None
        except (urllib.error.URLError, OSError) as err:
            raise SmokeFailed(f"POST {request.full_url}: {err}") from None
        predictions = answer.get("predictions")
        if not isinstance(predictions, list) or len(predictions) != len(records):
            raise SmokeFailed(f"expected {len(records)} predictions, got {str(answer)[:300]}")
        return answer

    return smoke
