"""Roll the champion out on a cluster as an InferenceService, and back when it fails.

    InferenceServiceDeployer(namespace).deploy(isvc, smoke_test)   create, or roll out; what is live

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

Each step is a patch and then a wait until a pure status reader (deployment/status.py) says the
state is reached; the calls go through the Kubernetes gateway (gateways/kube_api.py), whose merge
patches carry the nulls that remove a field (`canaryTrafficPercent`, or a transformer a new spec no
longer has).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from deployment import status
from deployment.inferenceservice import (
    DEPLOYMENT_MODE,
    MANAGED_PREFIXES,
    MODEL_VERSION,
    PLACEMENT_FIELDS,
    steady_state,
    validate_inferenceservice,
)
from deployment.smoke import DeployError, SmokeTarget, SmokeTest
from gateways.kube_api import INFERENCE_SERVICES, KubeApi, KubeApiError
from storage.endpoints import doing


class RolloutTimeout(DeployError):
    """A wait ran out; `reason` is what the status said last."""

    def __init__(self, what: str, timeout: float, reason: str, obj: dict | None):
        super().__init__(f"{what}: not done after {timeout:g}s: {reason}", reason)
        self.obj = obj


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


def restorable(obj: dict) -> dict:
    """The part of a live object a rollback puts back: our labels and annotations, and the spec."""
    meta = obj.get("metadata") or {}
    return steady_state({"metadata": {"labels": _managed(meta.get("labels")),
                                      "annotations": _managed(meta.get("annotations"))},
                         "spec": obj.get("spec") or {}})


def _keep_placement(spec_patch: dict) -> dict:
    """Placement the GitOps tree gives a cluster (service account, node selector, tolerations,
    spread) is not the deploy step's to remove: drop the deletions of those keys from the patch."""
    for component in ("predictor", "transformer"):
        part = spec_patch.get(component)
        if isinstance(part, dict):
            for key in PLACEMENT_FIELDS:
                if key in part and part[key] is None:
                    del part[key]
    return spec_patch


def patch_body(live: dict, desired: dict) -> dict:
    """The merge patch from `live` to `desired`, touching only our labels and annotations and
    keeping the cluster's placement (`PLACEMENT_FIELDS`) when the render has none."""
    meta, want = live.get("metadata") or {}, desired.get("metadata") or {}
    body = {"metadata": {"labels": merge_patch(_managed(meta.get("labels")), want.get("labels") or {}),
                         "annotations": merge_patch(_managed(meta.get("annotations")), want.get("annotations") or {})},
            "spec": _keep_placement(merge_patch(live.get("spec") or {}, desired.get("spec") or {}))}
    body["metadata"] = {k: v for k, v in body["metadata"].items() if v}
    return {k: v for k, v in body.items() if v}


def service_target(obj: dict, candidate: str) -> SmokeTarget:
    """The smoke test's target outside a canary: the service URL clients call."""
    return SmokeTarget(status.url(obj), status.model_name(obj), candidate, canary=False,
                       predictor_url=status.component_status(obj, "predictor").get("url"))


class InferenceServiceDeployer:
    """Create-or-patch one namespace's InferenceServices, wait for them, roll out and back."""

    def __init__(self, namespace: str, *, kube: KubeApi | None = None, client_configuration=None,
                 timeout: float = 300.0, poll_interval: float = 5.0, log: Callable[[str], None] = print,
                 progress: bool = False):
        self.namespace, self.timeout, self.poll_interval, self.log = namespace, timeout, poll_interval, log
        self.progress = progress  # log each new reason a wait is still waiting for
        # Connected on first use: rendering and validating need no cluster.
        self.kube = kube or KubeApi(client_configuration)
        self._steps: list[str] = []

    def _say(self, message: str) -> None:
        self._steps.append(message)
        self.log(message)

    # API calls -------------------------------------------------------------------------------

    def _call(self, call: Callable, *args):
        try:
            return call(INFERENCE_SERVICES, self.namespace, *args)
        except KubeApiError as err:
            raise DeployError(str(err), f"{err.status} {err.reason}" if err.status else err.reason) from None

    def get(self, name: str) -> dict | None:
        return self._call(self.kube.get, name)

    def create(self, body: dict) -> dict:
        return self._call(self.kube.create, body)

    def patch(self, name: str, body: dict) -> dict:
        """A JSON merge patch: None removes a field."""
        return self._call(self.kube.patch, name, body)

    def delete(self, name: str) -> None:
        self._call(self.kube.delete, name)

    def _patch_to(self, live: dict, desired: dict) -> tuple[dict, bool]:
        """Patch `live` into `desired`; (the object after, whether its spec changed)."""
        body = patch_body(live, desired)
        if not body:
            return live, False
        after = self.patch(live["metadata"]["name"], body)
        changed = (after["metadata"].get("generation") or 0) != (live["metadata"].get("generation") or 0)
        return after, changed

    def _set_canary(self, obj: dict, percent: int | None) -> dict:
        """canaryTrafficPercent on every component (None removes it)."""
        body = {"spec": {c: {"canaryTrafficPercent": percent} for c in status.components(obj)}}
        return self.patch(obj["metadata"]["name"], body)

    # waiting ---------------------------------------------------------------------------------

    def _wait(self, name: str, what: str, check: Callable[[dict], str | None]) -> dict:
        """Poll until `check(obj)` returns None (done); it returns why not otherwise."""
        deadline, said = time.monotonic() + self.timeout, None
        while True:
            obj = self.get(name)
            reason = check(obj) if obj is not None else "the InferenceService does not exist"
            if reason is None:
                return obj
            if self.progress and reason != said:
                said = reason
                self.log(f"  waiting for {name} ({what}): {reason}")
            if time.monotonic() >= deadline:
                raise RolloutTimeout(f"{self.namespace}/{name}: {what}", self.timeout,
                                     reason + status.last_failure(obj), obj)
            time.sleep(self.poll_interval)

    def _serving_check(self, changed: list[str] | None = None, before: dict | None = None,
                       canary: int | None = None) -> Callable[[dict], str | None]:
        """`status.serving_reason`, with each component's Deployment read in Standard mode."""

        def check(obj: dict) -> str | None:
            deployments = {} if status.mode(obj) == "Knative" else {
                c: self.kube.read_deployment(self.namespace, f"{obj['metadata']['name']}-{c}")
                for c in status.components(obj)}
            return status.serving_reason(obj, deployments, changed, before, canary)

        return check

    @staticmethod
    def _traffic_check(wanted: dict[str, str], percent: int) -> Callable[[dict], str | None]:
        return lambda obj: status.traffic_reason(obj, wanted, percent)

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
        result = Rollout(name, self.namespace, mode, outcome, candidate, live, status.url(obj) if obj else None,
                         status.traffic_split(obj, mode, versions, live), reason, list(self._steps))
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
        if status.mode(live) != mode:
            # KServe's webhook refuses it (validateDeploymentMode): the object must be recreated.
            raise DeployError(f"{self.namespace}/{name} runs in {status.mode(live)} mode; changing it to {mode} in "
                              "place is rejected by KServe: delete the InferenceService and deploy again")
        if live_mode in status.LEGACY_MODES:
            # The webhook compares the annotation with status.deploymentMode as strings: keep its spelling.
            desired["metadata"]["annotations"][DEPLOYMENT_MODE] = live_mode
        if not status.changed_components(live, desired):
            # Same pods as now: only our labels/annotations (and a stray canary field) to align.
            after, _ = self._patch_to(live, steady_state(desired))
            self._say(f"{self.namespace}/{name} already serves this spec: nothing to roll out")
            return self._report(self.get(name) or after, name, mode, "unchanged", candidate)
        percent = max((desired["spec"][c].get("canaryTrafficPercent") or 0) for c in status.components(desired))
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
        failure = self._smoke(smoke_test, service_target(obj, candidate))
        if failure:
            self._say(failure + " (nothing to roll back to: the first deployment is left for inspection)")
            return self._report(obj, name, mode, "failed", candidate, reason=failure)
        return self._report(obj, name, mode, "created", candidate)

    def _rolling(self, live: dict, desired: dict, mode: str, candidate: str, smoke_test,
                 revert: bool = True) -> Rollout:
        name = live["metadata"]["name"]
        previous = restorable(live)
        before = status.revisions(live)
        changed_components = status.changed_components(live, desired)
        self._say(f"rolling update of {self.namespace}/{name} to model version {candidate} ({mode})")
        after, changed = self._patch_to(live, desired)
        if not changed:
            self._say("spec unchanged: nothing to roll out")
            return self._report(self.get(name) or after, name, mode, "unchanged", candidate)
        try:
            obj = self._wait(name, "rolling update", self._serving_check(changed_components, before))
            failure = self._smoke(smoke_test, service_target(obj, candidate))
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
        before = status.revisions(current)
        changed_components = status.changed_components(current, previous)
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
        previous = restorable(live)
        previous_version = (live["metadata"].get("annotations") or {}).get(MODEL_VERSION)
        before = status.revisions(live)
        changed_components = status.changed_components(live, desired)
        self._say(f"canary of {self.namespace}/{name}: model version {candidate} gets {percent}% "
                  f"(version {previous_version} keeps the rest)")
        after, changed = self._patch_to(live, desired)
        if not changed:
            self._say("spec unchanged: nothing to roll out")
            return self._report(self.get(name) or after, name, mode, "unchanged", candidate)
        versions: dict[str, str] = {}
        try:
            obj = self._wait(name, "canary revision", self._serving_check(changed_components, before, canary=percent))
            revisions = {c: status.component_status(obj, c)["latestCreatedRevision"] for c in changed_components}
            versions.update({r: candidate for r in revisions.values()})
            entry = status.entry(obj)
            url = status.tag_url(obj, entry, "latest")
            if url is None:
                failure = (f"smoke test impossible: {entry} has no 'latest' tagged URL (is "
                           f"serving.kserve.io/enable-tag-routing on?)")
            else:
                failure = self._smoke(smoke_test, SmokeTarget(
                    url, status.model_name(obj), candidate, canary=True,
                    revision=status.component_status(obj, entry).get("latestCreatedRevision"),
                    predictor_url=status.tag_url(obj, "predictor", "latest")))
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
        rolled_out = status.revisions(current, "latestRolledoutRevision")
        versions.update({r: previous_version for r in rolled_out.values() if r})
        current = self._set_canary(current, 0)
        try:
            self._wait(name, "rollback to the previous revision",
                       self._traffic_check({c: r for c, r in rolled_out.items() if r}, 100))
            # 2. The previous spec back, still at 0%: the restored revision starts without traffic.
            current = self.get(name)
            before = status.revisions(current)
            restore = json.loads(json.dumps(previous))
            for component in status.components(restore):
                restore["spec"][component]["canaryTrafficPercent"] = 0
            changed_components = status.changed_components(current, restore)
            self._say("restoring the previous spec (at 0% until its revision is ready)")
            self._patch_to(current, restore)
            obj = self._wait(name, "restored revision", self._serving_check(changed_components, before, canary=0))
            restored = {c: status.component_status(obj, c)["latestCreatedRevision"] for c in changed_components}
            versions.update({r: previous_version for r in restored.values()})
            # 3. The restored revision takes over: the previous spec exactly, no canary field.
            self._set_canary(obj, None)
            obj = self._wait(name, "restored revision at 100%", self._traffic_check(restored, 100))
        except RolloutTimeout as err:
            self._say(f"rollback incomplete: {err.reason}")
            return self._report(err.obj, name, mode, "failed", candidate, versions,
                                reason=f"{failure}; rollback incomplete: {err.reason}")
        return self._report(obj, name, mode, "rolled_back", candidate, versions, reason=failure)


