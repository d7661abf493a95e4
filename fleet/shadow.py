"""Shadow traffic on a cluster: an Istio `VirtualService` (networking.istio.io/v1) in front of the
champion's InferenceService that routes every request to it and mirrors a share to the
challenger's InferenceService.

KServe has no mirror node (kserve/kserve#2978, #2240) and owns the routes of its own objects, so
this route is ours: it is bound to the mesh (sidecars of in-mesh clients, `gateways: [mesh]`) on
the host clients call, the champion's Service `<isvc>-predictor` (or `<isvc>-transformer` when the
transformer is its own component), port 80, as KServe creates it in Standard (raw Deployment)
mode. Knative mode routes through Knative's own VirtualServices and is refused here. Requests that
enter through the ingress gateway are not mirrored: KServe exposes a Standard-mode
InferenceService there by its own Ingress (or HTTPRoute) for `<isvc>-<ns>.<domain>` (kserve
reconcilers/ingress/kube_ingress_reconciler.go), and two routes for one host on a gateway are
merged in no set order (istio.io, "Multiple virtual services and destination rules for the same
host"); on the mesh only one route per host may exist (IST0109), which KServe does not create.

Envoy sends the mirrored copy fire-and-forget: its answer is discarded and never delays or fails
the client's request (Istio "Mirroring" task; Envoy `RequestMirrorPolicy`), and the copy's
authority gets `-shadow` appended. The challenger is its own InferenceService named
`<isvc>-challenger` (same builder, its own model version), whose logger posts its payload events,
under its own model version, to the same sink.

Pure: from specs and names, no kfp, no cluster calls.
"""
from __future__ import annotations

from deployment.inferenceservice import isvc_name
from specs import ServingSpec

API_VERSION = "networking.istio.io/v1"
SERVICE_PORT = 80  # KServe's Standard-mode component Services listen on 80 (-> the container's 8080)
CHALLENGER_SUFFIX = "-challenger"


def challenger_name(model_name: str) -> str:
    """The challenger InferenceService's name beside the champion's."""
    return f"{isvc_name(model_name)}{CHALLENGER_SUFFIX}"


def route_name(model_name: str) -> str:
    """The shadow VirtualService's name: the champion InferenceService's, with `-shadow`."""
    return f"{isvc_name(model_name)}-shadow"


def client_host(isvc: str, namespace: str, spec: ServingSpec) -> str:
    """The Service an InferenceService's clients call: its transformer when separate, else its predictor
    (the one-process server, or the collocated transformer, takes the traffic in the predictor pod)."""
    component = "transformer" if spec.topology == "separate" else "predictor"
    return f"{isvc}-{component}.{namespace}.svc.cluster.local"


def shadow_virtual_service(model_name: str, namespace: str, spec: ServingSpec, *, percent: float = 100.0,
                           challenger: str | None = None) -> dict:
    """The VirtualService that keeps every answer the champion's and mirrors `percent` of the
    requests to the challenger InferenceService (`challenger`, default `<isvc>-challenger`)."""
    if spec.deployment_mode != "Standard":
        raise ValueError("shadow traffic needs serving.deployment_mode Standard: in Knative mode Knative owns the "
                         "InferenceService's routes (its own VirtualServices)")
    if not 0.0 < percent <= 100.0:
        raise ValueError(f"mirror percent must be in (0, 100], got {percent}")
    champion = isvc_name(model_name)
    challenger = challenger or challenger_name(model_name)
    host = client_host(champion, namespace, spec)
    return {
        "apiVersion": API_VERSION,
        "kind": "VirtualService",
        "metadata": {"name": route_name(model_name), "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "flywheel", "app.kubernetes.io/component": "shadow",
                                "flywheel/champion": champion, "flywheel/challenger": challenger}},
        "spec": {
            "hosts": [host],
            "gateways": ["mesh"],
            "http": [{
                "name": "champion-answers-challenger-shadows",
                "route": [{"destination": {"host": host, "port": {"number": SERVICE_PORT}}, "weight": 100}],
                "mirror": {"host": client_host(challenger, namespace, spec), "port": {"number": SERVICE_PORT}},
                "mirrorPercentage": {"value": float(percent)},
            }],
        },
    }
