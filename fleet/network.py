"""NetworkPolicies: default deny for serving and monitor pods, then exactly the lifecycle's flows.

Complements manifests/base/networkpolicy.yaml (the training pods' policy, not repeated here). The
pods selected here:

* serving pods: every pod of the InferenceService and of its shadow challenger `<name>-challenger`
  (fleet/shadow.py: it answers mirrored copies of the same callers' requests, so it is held to the
  same flows), by the label KServe puts on predictor and transformer pods in both deployment modes,
  `serving.kserve.io/inferenceservice` (kserve pkg/constants `InferenceServicePodLabelKey`), `In`
  both names;
* monitor pods: `app.kubernetes.io/name: flywheel-monitor` (fleet/monitor.py).

Each gets a default deny (ingress and egress), then one ingress and one egress policy that list
every flow it needs, one rule per flow, each commented with why. Ports are the pod's own (container
or sidecar) ports: NetworkPolicy matches after the Service's port -> targetPort translation.

Flows to the serving pods:
  - the Istio ingress gateway (`auth.ingress_namespace`), and workloads of `auth.caller_namespaces`
    that call the model over the mesh, -> the entry port. Standard mode: the
    entry component's Service targets KServe's agent (9081) when a payload logger is set, else the
    container port (kserve reconcilers/service/service_reconciler.go, createDefaultSvc). Knative
    mode: queue-proxy, 8012 (http1) and 8013 (h2c).
  - Knative only, from `auth.knative_namespace`: the activator proxies and probes on 8012/8013, the
    autoscaler scrapes queue-proxy's 9090 (knative.dev/docs/serving/istio-authorization).
  - Prometheus (`auth.monitoring_namespace`) -> the metrics ports: the ModelServer's /metrics
    (8080), pilot-agent's merged metrics (15020, where Istio's metrics merging points the scrape
    annotations), and in Knative mode queue-proxy's user metrics (9091).
  - transformer -> predictor inside the InferenceService (separate transformer only): the
    predictor's declared port (8080 REST, 8081 gRPC) in Standard mode, queue-proxy in Knative.
  - kubelet probes need no rule: traffic from the pod's node is always allowed
    (kubernetes.io/docs/concepts/services-networking/network-policies, "isolated for ingress").
Flows from the serving pods: DNS; the monitor's 8080 (KServe's logger agent posts /events);
the object store (storage-initializer pulls the model); istiod's 15012 (the sidecar's xDS and
certificates); transformer -> predictor (separate), in Knative mode also through the activator or
the knative-local-gateway (pod port 8081).
Flows to the monitor: pods of this namespace (the serving pods' logger, the pipeline's monitoring
check posting /drift, a labelling job posting /ground_truth) and the monitoring namespace
(Prometheus /metrics, Alertmanager /alerts) on 8080; who may call which path is Istio's to decide
(fleet/auth.py). Flows from the monitor: DNS, the object store, MLflow, the KFP API (the retraining
trigger), istiod.
"""
from __future__ import annotations

from dataclasses import dataclass

from kubernetes import client as k8s

from deployment.inferenceservice import GRPC_PORT, HTTP_PORT, isvc_name, to_dict
from fleet.context import MONITOR, MONITOR_PORT, Endpoint, FleetContext
from fleet.shadow import challenger_name

FEATURE: str | None = "network-policies"
SCOPE = "env"

ISVC_LABEL = "serving.kserve.io/inferenceservice"  # on predictor and transformer pods, both modes
AGENT_PORT = 9081  # KServe's agent (logger/batcher) in the pod: the Standard-mode entry when logging
QUEUE_HTTP, QUEUE_H2C = 8012, 8013  # Knative queue-proxy: what the gateway and activator reach
QUEUE_AUTOSCALER_METRICS, QUEUE_USER_METRICS = 9090, 9091  # queue-proxy: autoscaler's, Prometheus'
ISTIO_AGENT_PORT = 15020  # pilot-agent: merged Prometheus metrics, rewritten probes (not intercepted)
ISTIOD_PORT = 15012  # istiod's xDS + CA (mTLS certificates) for every sidecar
ISTIOD_NAMESPACE, ISTIOD_LABELS = "istio-system", {"app": "istiod"}
LOCAL_GATEWAY_PORT = 8081  # the knative-local-gateway's pod port (its Service's 80 -> 8081)
DNS_NAMESPACE, DNS_LABELS = "kube-system", {"k8s-app": "kube-dns"}
NAMESPACE_NAME = "kubernetes.io/metadata.name"  # set by the API server on every namespace
ANYWHERE_BUT_METADATA = ("0.0.0.0/0", ["169.254.0.0/16"])  # not the cloud instance-metadata endpoint
HTTPS = 443


@dataclass(frozen=True)
class ServingPorts:
    """The serving pods' ports, per flow, for one env's deployment mode and topology (single: the one
    process takes the entry traffic where a collocated transformer would)."""

    entry: tuple[int, ...]  # where the ingress gateway (and the activator) deliver client requests
    hop: tuple[int, ...]  # where a separate transformer reaches the predictor's pods; () single or collocated
    metrics: tuple[int, ...]  # what Prometheus scrapes
    knative: tuple[int, ...]  # what Knative's activator and autoscaler reach; () in Standard mode


def knative(ctx: FleetContext) -> bool:
    return ctx.serving.deployment_mode == "Knative"


def serving_ports(ctx: FleetContext) -> ServingPorts:
    """The ports of each flow to the serving pods (see the module docstring for the sources)."""
    separate = ctx.serving.topology == "separate"
    if knative(ctx):
        queue = (QUEUE_HTTP, QUEUE_H2C)
        return ServingPorts(entry=queue, hop=queue if separate else (),
                            metrics=(HTTP_PORT, ISTIO_AGENT_PORT, QUEUE_USER_METRICS),
                            knative=(*queue, QUEUE_AUTOSCALER_METRICS))
    entry = (AGENT_PORT,) if ctx.serving.payload_logging.url else (HTTP_PORT,)
    hop = ((GRPC_PORT if ctx.serving.hop_protocol == "grpc-v2" else HTTP_PORT),) if separate else ()
    return ServingPorts(entry=entry, hop=hop, metrics=(HTTP_PORT, ISTIO_AGENT_PORT), knative=())


def serving_selector(ctx: FleetContext) -> dict[str, str]:
    """The champion's serving pods, as Istio selects them (`matchLabels` only: no `In`)."""
    return {ISVC_LABEL: isvc_name(ctx.model_name)}


def challenger_selector(ctx: FleetContext) -> dict[str, str]:
    """The shadow challenger's serving pods (`flywheel shadow start` serves it; none otherwise)."""
    return {ISVC_LABEL: challenger_name(ctx.model_name)}


def serving_pods(ctx: FleetContext) -> k8s.V1LabelSelector:
    """The champion's and the challenger's serving pods, as a NetworkPolicy selects them."""
    names = [isvc_name(ctx.model_name), challenger_name(ctx.model_name)]
    return k8s.V1LabelSelector(match_expressions=[
        k8s.V1LabelSelectorRequirement(key=ISVC_LABEL, operator="In", values=names)])


def monitor_selector(ctx: FleetContext) -> dict[str, str]:
    return {"app.kubernetes.io/name": MONITOR}


# --- peers and ports -----------------------------------------------------------------------------

def _ports(*ports: int, protocol: str = "TCP") -> list[k8s.V1NetworkPolicyPort]:
    return [k8s.V1NetworkPolicyPort(protocol=protocol, port=p) for p in ports]


def _namespace(name: str, pods: dict[str, str] | None = None) -> k8s.V1NetworkPolicyPeer:
    return k8s.V1NetworkPolicyPeer(namespace_selector=k8s.V1LabelSelector(match_labels={NAMESPACE_NAME: name}),
                                   pod_selector=k8s.V1LabelSelector(match_labels=pods) if pods else None)


def _local(pods: dict[str, str] | k8s.V1LabelSelector | None) -> k8s.V1NetworkPolicyPeer:
    """Pods of the policy's own namespace (all of them when `pods` is None)."""
    if isinstance(pods, k8s.V1LabelSelector):
        return k8s.V1NetworkPolicyPeer(pod_selector=pods)
    return k8s.V1NetworkPolicyPeer(pod_selector=k8s.V1LabelSelector(match_labels=pods or None))


def _anywhere() -> k8s.V1NetworkPolicyPeer:
    cidr, excepted = ANYWHERE_BUT_METADATA
    return k8s.V1NetworkPolicyPeer(ip_block=k8s.V1IPBlock(cidr=cidr, _except=excepted))


def endpoint_namespace(ctx: FleetContext, endpoint: Endpoint) -> str:
    """The namespace of an in-cluster service name: `svc.ns[.svc[.cluster.local]]`, else ours."""
    labels = endpoint.host.split(".")
    return labels[1] if len(labels) > 1 else ctx.namespace


def _to_endpoint(ctx: FleetContext, endpoint: Endpoint) -> k8s.V1NetworkPolicyEgressRule:
    """An in-cluster service: its namespace on its port (assumes the Service's port is the pod's,
    as with MLflow's and KFP's ml-pipeline Services); anything else: any address but the metadata
    endpoint on its port (an outside host resolves to addresses we cannot know here)."""
    peer = _namespace(endpoint_namespace(ctx, endpoint)) if endpoint.in_cluster else _anywhere()
    return k8s.V1NetworkPolicyEgressRule(to=[peer], ports=_ports(endpoint.port))


def _endpoint(ctx: FleetContext, key: str) -> Endpoint | None:
    return next((e for e in ctx.endpoints if e.key == key), None)


def _dns() -> k8s.V1NetworkPolicyEgressRule:
    return k8s.V1NetworkPolicyEgressRule(to=[_namespace(DNS_NAMESPACE, DNS_LABELS)],
                                         ports=_ports(53, protocol="UDP") + _ports(53))


def _istiod() -> k8s.V1NetworkPolicyEgressRule:
    # Istio policies bite only where a sidecar is injected (Kubeflow profiles label namespaces
    # istio-injection=enabled), and a sidecar without istiod has no config and no certificate.
    return k8s.V1NetworkPolicyEgressRule(to=[_namespace(ISTIOD_NAMESPACE, ISTIOD_LABELS)], ports=_ports(ISTIOD_PORT))


def _object_store(ctx: FleetContext) -> k8s.V1NetworkPolicyEgressRule:
    """kfp.object_store_endpoint when set (MinIO in the cluster, say), else S3/GCS over HTTPS."""
    endpoint = _endpoint(ctx, "kfp.object_store_endpoint")
    if endpoint is not None:
        return _to_endpoint(ctx, endpoint)
    return k8s.V1NetworkPolicyEgressRule(to=[_anywhere()], ports=_ports(HTTPS))


# --- policies ------------------------------------------------------------------------------------

def _policy(ctx: FleetContext, name: str, pods: dict[str, str] | k8s.V1LabelSelector, types: list[str], *,
            ingress=None, egress=None) -> dict:
    selector = pods if isinstance(pods, k8s.V1LabelSelector) else k8s.V1LabelSelector(match_labels=pods)
    return to_dict(k8s.V1NetworkPolicy(
        api_version="networking.k8s.io/v1", kind="NetworkPolicy",
        metadata=k8s.V1ObjectMeta(name=name, namespace=ctx.namespace, labels=dict(ctx.labels)),
        spec=k8s.V1NetworkPolicySpec(pod_selector=selector, policy_types=types,
                                     ingress=ingress, egress=egress)))


def _serving_ingress(ctx: FleetContext) -> list[k8s.V1NetworkPolicyIngressRule]:
    ports, auth = serving_ports(ctx), ctx.fleet.auth
    rules = [  # client requests through the ingress gateway
        k8s.V1NetworkPolicyIngressRule(_from=[_namespace(auth.ingress_namespace)], ports=_ports(*ports.entry)),
        # ... and from in-mesh callers' namespaces (`auth.caller_namespaces`), with a token all the same
        *([k8s.V1NetworkPolicyIngressRule(_from=[_namespace(n) for n in auth.caller_namespaces],
                                          ports=_ports(*ports.entry))] if auth.caller_namespaces else []),
        # Prometheus scrapes
        k8s.V1NetworkPolicyIngressRule(_from=[_namespace(auth.monitoring_namespace)], ports=_ports(*ports.metrics))]
    if ports.knative:  # the activator (requests, probes) and the autoscaler (queue-proxy metrics)
        rules.append(k8s.V1NetworkPolicyIngressRule(_from=[_namespace(auth.knative_namespace)],
                                                    ports=_ports(*ports.knative)))
    if ports.hop:  # the separate transformer -> the predictor, inside the InferenceService
        rules.append(k8s.V1NetworkPolicyIngressRule(_from=[_local(serving_pods(ctx))], ports=_ports(*ports.hop)))
    return rules


def _serving_egress(ctx: FleetContext) -> list[k8s.V1NetworkPolicyEgressRule]:
    ports, auth = serving_ports(ctx), ctx.fleet.auth
    rules = [_dns(), _istiod(), _object_store(ctx),
             # KServe's logger agent posts every request and response to the monitor's /events
             k8s.V1NetworkPolicyEgressRule(to=[_local(monitor_selector(ctx))], ports=_ports(MONITOR_PORT))]
    if ports.hop:
        rules.append(k8s.V1NetworkPolicyEgressRule(to=[_local(serving_pods(ctx))], ports=_ports(*ports.hop)))
    if ports.hop and ports.knative:
        # `<isvc>-predictor.<ns>` is a Knative route: the request may go through the activator
        # (scale from zero, burst capacity) or the knative-local-gateway instead of a pod.
        rules += [k8s.V1NetworkPolicyEgressRule(to=[_namespace(auth.knative_namespace)], ports=_ports(*ports.hop)),
                  k8s.V1NetworkPolicyEgressRule(to=[_namespace(auth.ingress_namespace)],
                                                ports=_ports(LOCAL_GATEWAY_PORT))]
    return rules


def _monitor_ingress(ctx: FleetContext) -> list[k8s.V1NetworkPolicyIngressRule]:
    return [k8s.V1NetworkPolicyIngressRule(_from=[_local(None)], ports=_ports(MONITOR_PORT)),
            k8s.V1NetworkPolicyIngressRule(_from=[_namespace(ctx.fleet.auth.monitoring_namespace)],
                                           ports=_ports(MONITOR_PORT))]


def _monitor_egress(ctx: FleetContext) -> list[k8s.V1NetworkPolicyEgressRule]:
    rules = [_dns(), _istiod(), _object_store(ctx)]
    # MLflow (the trigger resolves the champion) and the KFP API (the trigger starts the run), at
    # the addresses the config gives: kfp.host is what the trigger calls, so an outside URL (the
    # ingress gateway's) means HTTPS out, an in-cluster one (ml-pipeline.kubeflow:8888) that namespace.
    for key in ("mlflow.tracking_uri", "kfp.host"):
        endpoint = _endpoint(ctx, key)
        if endpoint is not None and (rule := _to_endpoint(ctx, endpoint)) not in rules:
            rules.append(rule)  # an outside KFP is the object store's HTTPS-out rule again: once is enough
    return rules


def objects(ctx: FleetContext) -> list[dict]:
    """Default deny for the serving and monitor pods, then their ingress and egress allow-lists."""
    serving, monitor, both = serving_pods(ctx), monitor_selector(ctx), ["Ingress", "Egress"]
    return [_policy(ctx, "flywheel-serving-default-deny", serving, both),
            _policy(ctx, "flywheel-monitor-default-deny", monitor, both),
            _policy(ctx, "flywheel-serving-ingress", serving, ["Ingress"], ingress=_serving_ingress(ctx)),
            _policy(ctx, "flywheel-serving-egress", serving, ["Egress"], egress=_serving_egress(ctx)),
            _policy(ctx, "flywheel-monitor-ingress", monitor, ["Ingress"], ingress=_monitor_ingress(ctx)),
            _policy(ctx, "flywheel-monitor-egress", monitor, ["Egress"], egress=_monitor_egress(ctx))]


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []
