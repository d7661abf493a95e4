"""`flywheel shadow --env ENV start|report|stop` on a cluster env (the local path is pipelines/shadow.py).

- `start`: the registry's `challenger` version as its own InferenceService, `<isvc>-challenger`
  (fleet/shadow.py `challenger_name`), rendered by the champion's builder (`render_for`: the same
  hardening, the same payload logger to the env's monitor sink) but serving model version
  `<V>-shadow`, so its rows land in a sink partition of their own (monitoring/shadow.py); and the
  Istio VirtualService fleet/shadow.py builds: the champion answers every request, and
  `evaluation.shadow.percent` of them are mirrored to the challenger. Both are validated against the
  vendored CRDs before anything is applied; the challenger takes the live champion's service account,
  node selector and tolerations (`placed`), is created or rolled out by deployment/rollout.py
  (readiness is its check, `serving.ready_timeout_seconds`), then the route is created or patched.
  The champion's InferenceService is read, never written. The env's auth and network policies
  (fleet/auth.py, fleet/network.py) already hold the challenger's pods to the champion's rules, and
  its logger forwards x-request-id, on which the report pairs the two versions' rows.
  One line says which traffic is mirrored (`mirrored`): in-mesh callers', not the ingress gateway's.
- `report`: the shadow report over the sink root's windows of the registry's champion and challenger.
- `stop`: the report; the route and the challenger deleted (absent is fine); the challenger promoted
  in the registry when the report passes (then `flywheel deploy` rolls the champion's
  InferenceService to it), else nothing is promoted.

Every Kubernetes call goes through gateways/kube_api.py; `kube` (a KubeApi) is injectable for tests.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from deployment.inferenceservice import ServedModel, isvc_name, render_for, validate_inferenceservice
from deployment.rollout import InferenceServiceDeployer, merge_patch
from fleet.shadow import challenger_name, route_name, shadow_virtual_service
from fleet.validate import problems
from gateways.kube_api import INFERENCE_SERVICES, VIRTUAL_SERVICES, KubeApi, KubeApiError
from monitoring.shadow import shadow_version
from pipelines.config import Settings
from pipelines.shadow import promote_if_passed
from storage.endpoints import doing

Echo = Callable[[str], None]
REPORT_DIR = Path("runs") / "shadow"


def _spec(settings: Settings):
    from specs.evaluation import ShadowSpec

    return settings.evaluation.shadow or ShadowSpec()


def refusal(settings: Settings) -> str | None:
    """Why ENV cannot shadow on its cluster, or None."""
    if settings.serving.deployment_mode != "Standard":
        return (f"env {settings.env!r} serves in serving.deployment_mode {settings.serving.deployment_mode}: a shadow "
                "route needs Standard (in Knative mode Knative owns the InferenceService's routes)")
    return None


def mirrored(settings: Settings) -> str:
    """The one line `start` says about which requests the route mirrors. It is bound to `mesh`: the
    client-side sidecars of in-mesh callers of the champion's Service. KServe's Standard mode exposes
    the InferenceService at the ingress gateway through its own Kubernetes Ingress (or HTTPRoute)
    on `<isvc>-<ns>.<domain>` (kserve reconcilers/ingress/kube_ingress_reconciler.go
    createRawIngress); a second route for that host on a gateway is merged with it in no set order
    (istio.io "Multiple virtual services and destination rules for the same host"; IST0109), so
    those requests are not mirrored. In-mesh callers reach the model only from the namespaces
    `fleet.auth.caller_namespaces` admits (fleet/network.py): with none, nothing is mirrored."""
    callers = settings.fleet.auth.caller_namespaces
    if not callers:
        return ("  mirrored: nothing yet: no in-mesh caller may reach the model\n"
                "  (fleet.auth.caller_namespaces is empty); via the ingress gateway: never")
    return f"  mirrored: requests of in-mesh callers in {', '.join(callers)}; not the ingress gateway's"


def placed(challenger: dict, champion: dict) -> dict:
    """`challenger` with the live champion's service account, node selector and tolerations: the
    GitOps tree places the champion (fleet/serving.py), and the monitor takes payload events from
    that service account alone (fleet/auth.py), so the challenger's logger needs it too. Topology
    spread is not copied: the champion's selects the champion's own pods."""
    for component in ("predictor", "transformer"):
        ours, theirs = challenger["spec"].get(component), (champion.get("spec") or {}).get(component)
        if ours is None or not theirs:
            continue
        for key in ("serviceAccountName", "nodeSelector", "tolerations"):
            if theirs.get(key) is not None:
                ours[key] = theirs[key]
    return challenger


def plan(settings: Settings, version: str, model_uri: str) -> tuple[dict, dict]:
    """(the challenger's InferenceService, the shadow VirtualService) for challenger `version`
    stored at `model_uri`, both validated; ValueError naming every problem."""
    name = settings.mlflow.registered_model
    model = ServedModel(name, shadow_version(str(version)), model_uri)
    isvc = validate_inferenceservice(render_for(settings, model, canary=False, name=challenger_name(name)))
    route = shadow_virtual_service(name, settings.namespace, settings.serving, percent=_spec(settings).percent)
    found = problems(route)
    if found:
        raise ValueError("the shadow VirtualService is invalid:\n" + "\n".join(f"  {line}" for line in found))
    return isvc, route


def challenger(settings: Settings) -> ServedModel | None:
    """The registry's `challenger`: its version and the storage URI of its model directory."""
    from deployment.deployers import registry_model
    from stages.registry import CHALLENGER

    return registry_model(settings.mlflow.tracking_uri, settings.mlflow.registered_model, CHALLENGER)


def _no_challenger(settings: Settings) -> str:
    return (f"no challenger: {settings.mlflow.registered_model} has no `challenger` alias in "
            f"{settings.mlflow.tracking_uri} (the gate sets it when evaluation.shadow is set)")


def dry_run(settings: Settings, version: str | None = None, model_uri: str | None = None) -> list[dict]:
    """What `start` would apply. With `version` and `model_uri` nothing is asked of the registry;
    with `version` alone the registry says where it is stored; with neither, which is the challenger."""
    if version is None:
        found = challenger(settings)
        if found is None:
            raise LookupError(_no_challenger(settings) + "; or name one: --version V --model-uri URI")
        version, model_uri = found.version, found.uri
    elif model_uri is None:
        from stages.versions import model_dir_uri

        model_uri = model_dir_uri(settings.mlflow.tracking_uri, settings.mlflow.registered_model, version)
    return list(plan(settings, version, model_uri))


def apply_route(kube: KubeApi, route: dict) -> str:
    """Create the VirtualService, or patch the live one into it; what was done."""
    ns, name = route["metadata"]["namespace"], route["metadata"]["name"]
    with doing(f"reading VirtualService {ns}/{name}"):
        live = kube.get(VIRTUAL_SERVICES, ns, name)
    if live is None:
        kube.create(VIRTUAL_SERVICES, ns, route)
        return f"created VirtualService {ns}/{name}"
    have = (live.get("metadata") or {}).get("labels") or {}
    labels = {k: v for k, v in route["metadata"]["labels"].items() if have.get(k) != v}
    body = {k: v for k, v in (("metadata", {"labels": labels} if labels else None),
                              ("spec", merge_patch(live.get("spec") or {}, route["spec"]))) if v}
    if not body:
        return f"VirtualService {ns}/{name} already routes this way: unchanged"
    kube.patch(VIRTUAL_SERVICES, ns, name, body)
    return f"updated VirtualService {ns}/{name}"


def start(settings: Settings, echo: Echo = print, *, kube: KubeApi | None = None, poll_interval: float = 5.0) -> int:
    """Serve the challenger beside the champion and mirror the champion's traffic to it."""
    found = challenger(settings)
    if found is None:
        echo(_no_challenger(settings))
        return 1
    isvc, route = plan(settings, found.version, found.uri)
    kube = kube or KubeApi()
    ns, champion = settings.namespace, isvc_name(settings.mlflow.registered_model)
    with doing(f"reading InferenceService {ns}/{champion}"):
        live = kube.get(INFERENCE_SERVICES, ns, champion)
    if live is None:
        echo(f"no champion to shadow: InferenceService {ns}/{champion} does not exist "
             f"(`flywheel deploy --env {settings.env}` serves it)")
        return 1
    isvc = validate_inferenceservice(placed(isvc, live))
    echo(f"challenger v{found.version}: InferenceService {ns}/{isvc['metadata']['name']} as model version "
         f"{shadow_version(found.version)}")
    deployer = InferenceServiceDeployer(ns, kube=kube, timeout=settings.serving.ready_timeout_seconds,
                                        poll_interval=poll_interval, log=echo, progress=True)
    rollout = deployer.deploy(isvc, None, canary=False)
    if not rollout.ok:
        echo(f"the challenger is not serving ({rollout.reason}): no traffic is mirrored to it")
        return 1
    echo(apply_route(kube, route))
    echo(f"shadowing {settings.mlflow.registered_model} v{found.version} behind InferenceService {ns}/{champion}: "
         f"{_spec(settings).percent:g}% of its requests mirrored; `flywheel shadow --env {settings.env} report` "
         "compares them")
    echo(mirrored(settings))
    return 0


def report(settings: Settings, echo: Echo = print, out: str | Path | None = None):
    """The shadow report of the registry's challenger against its champion, from the env's sink
    root, written as HTML + JSON under `out` (default runs/shadow/<env>); None when there is no pair."""
    from monitoring import shadow as shadow_report
    from stages.registry import CHALLENGER
    from stages.versions import CHAMPION, version_behind

    uri, name, root = settings.mlflow.tracking_uri, settings.mlflow.registered_model, settings.monitoring.sink.root
    version = version_behind(uri, name, CHALLENGER)
    if version is None:
        echo(_no_challenger(settings))
        return None
    champion = version_behind(uri, name, CHAMPION)
    if champion is None:
        echo(f"no champion: {name} has no `champion` alias in {uri}, nothing to compare v{version} with")
        return None
    result = shadow_report.load(root, champion, version, _spec(settings))
    html, data = shadow_report.write(result, out or REPORT_DIR / settings.env)
    echo(f"shadow v{version} vs champion v{champion} ({root}): {result.summary()}")
    echo(f"  report: {html} ({data})")
    return result


def remove(settings: Settings, kube: KubeApi) -> list[str]:
    """Delete the route, then the challenger's InferenceService; a missing one is fine."""
    ns, name, done = settings.namespace, settings.mlflow.registered_model, []
    for kind, obj in ((VIRTUAL_SERVICES, route_name(name)), (INFERENCE_SERVICES, challenger_name(name))):
        try:
            with doing(f"deleting {kind.kind} {ns}/{obj}"):
                kube.delete(kind, ns, obj)
            done.append(f"deleted {kind.kind} {ns}/{obj}")
        except KubeApiError as err:
            if err.status != 404:
                raise
            done.append(f"{kind.kind} {ns}/{obj} was not there")
    return done


def stop(settings: Settings, echo: Echo = print, *, kube: KubeApi | None = None,
         out: str | Path | None = None) -> int:
    """Report, stop the shadow, and promote the challenger when the report passes."""
    result = report(settings, echo, out)
    for line in remove(settings, kube or KubeApi()):
        echo(line)
    champion = isvc_name(settings.mlflow.registered_model)
    return promote_if_passed(settings, result, echo, "shadows it again", f"`flywheel deploy --env {settings.env}` "
                             f"rolls InferenceService {settings.namespace}/{champion} to it")
