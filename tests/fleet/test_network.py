"""fleet/network.py: the NetworkPolicies of every cluster of every env, strictly valid, and, through
a small evaluator of NetworkPolicy semantics, allowing exactly the lifecycle's flows.

The evaluator answers "may pod A open a connection to B on port P": A's egress and B's ingress must
both allow it; a pod no policy selects (for that direction) is not isolated. Peers: podSelector
(the policy's namespace), namespaceSelector (by `kubernetes.io/metadata.name`), both (AND), ipBlock
(cidr minus except). kubernetes.io/docs/concepts/services-networking/network-policies.
"""
from __future__ import annotations

import dataclasses
import ipaddress

import pytest
import yaml

from fleet import network
from fleet.context import FleetContext
from tests.fleet.conftest import contexts
from tests.support import ROOT

K8S_VERSIONS = ("1.31.0", "1.37.0")  # as tests/pipelines/test_manifests.py


@dataclasses.dataclass(frozen=True)
class Pod:
    namespace: str
    labels: tuple  # ((key, value), ...)
    ip: str

    @property
    def label_map(self) -> dict:
        return dict(self.labels)


@dataclasses.dataclass(frozen=True)
class Host:
    """An address outside the cluster."""
    ip: str


def pod(namespace: str, ip: str, **labels: str) -> Pod:
    return Pod(namespace, tuple(sorted(labels.items())), ip)


def selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def peer_matches(peer: dict, policy_namespace: str, other) -> bool:
    if "ipBlock" in peer:
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except") or [])
    if isinstance(other, Host):
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": other.namespace}):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector"), other.label_map)


def port_matches(ports: list | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    return any(p.get("protocol", "TCP") == protocol and (
        p.get("port") is None or p["port"] == port or (p.get("endPort") and p["port"] <= port <= p["endPort"]))
        for p in ports)


def admits(policies: list[dict], subject: Pod, direction: str, other, port: int, protocol: str) -> bool:
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [p for p in policies if p["metadata"]["namespace"] == subject.namespace
                 and selects(p["spec"]["podSelector"], subject.label_map)
                 and direction in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True  # not isolated in this direction
    return any((not rule.get(peers_key) or any(peer_matches(peer, p["metadata"]["namespace"], other)
                                               for peer in rule[peers_key]))
               and port_matches(rule.get("ports"), port, protocol)
               for p in selecting for rule in p["spec"].get(key) or [])


def may_reach(policies: list[dict], source, target, port: int, protocol: str = "TCP") -> bool:
    out = isinstance(source, Host) or admits(policies, source, "Egress", target, port, protocol)
    into = isinstance(target, Host) or admits(policies, target, "Ingress", source, port, protocol)
    return out and into


class World:
    """The pods and hosts of one cluster as the lifecycle sees them."""

    def __init__(self, ctx: FleetContext):
        auth, ns, isvc = ctx.fleet.auth, ctx.namespace, network.serving_selector(ctx)[network.ISVC_LABEL]
        self.predictor = pod(ns, "10.0.0.10", **{network.ISVC_LABEL: isvc, "component": "predictor"})
        self.transformer = pod(ns, "10.0.0.11", **{network.ISVC_LABEL: isvc, "component": "transformer"})
        self.entry = self.transformer if ctx.serving.topology == "separate" else self.predictor
        self.monitor = pod(ns, "10.0.0.20", **{"app.kubernetes.io/name": "flywheel-monitor"})
        self.neighbour = pod(ns, "10.0.0.30", app="notebook")
        self.trainer = pod(ns, "10.0.0.31", **{"app.kubernetes.io/part-of": "flywheel",
                                               "app.kubernetes.io/component": "training"})
        self.gateway = pod(auth.ingress_namespace, "10.1.0.1", app="istio-ingressgateway", istio="ingressgateway")
        self.istiod = pod("istio-system", "10.1.0.2", app="istiod")
        self.activator = pod(auth.knative_namespace, "10.2.0.1", app="activator")
        self.autoscaler = pod(auth.knative_namespace, "10.2.0.2", app="autoscaler")
        self.prometheus = pod(auth.monitoring_namespace, "10.3.0.1", **{"app.kubernetes.io/name": "prometheus"})
        self.alertmanager = pod(auth.monitoring_namespace, "10.3.0.2", **{"app.kubernetes.io/name": "alertmanager"})
        self.dns = pod("kube-system", "10.4.0.1", **{"k8s-app": "kube-dns"})
        self.kfp_in_cluster = pod("kubeflow", "10.5.0.1", app="ml-pipeline")
        self.intruder = pod("someone-else", "10.6.0.1", app="curl")
        mlflow = next(e for e in ctx.endpoints if e.key == "mlflow.tracking_uri")
        self.mlflow = pod(network.endpoint_namespace(ctx, mlflow), "10.7.0.1", app="mlflow")
        self.mlflow_port = mlflow.port
        self.object_store = Host("52.95.1.1")  # S3
        self.internet = Host("93.184.216.34")
        self.metadata = Host("169.254.169.254")  # cloud instance metadata: credentials


def entry_port(ctx: FleetContext) -> int:
    """Where client requests land (independent of the builder): queue-proxy's 8012 in Knative mode
    (knative serving pkg/networking PortNumberHTTP1); in Standard mode KServe's Service targets the
    agent's 9081 when a logger is set (kserve createDefaultSvc), else the container's 8080."""
    if ctx.serving.deployment_mode == "Knative":
        return 8012
    return 9081 if ctx.serving.payload_logging.url else 8080


@pytest.fixture
def world(fleet_ctx):
    return fleet_ctx, network.objects(fleet_ctx), World(fleet_ctx)


def test_every_policy_validates_strictly_and_carries_the_env(fleet_ctx):
    import kubernetes_validate.utils as kv

    policies = network.objects(fleet_ctx)
    assert network.platform_objects(fleet_ctx) == []
    for policy in policies:
        assert policy["metadata"]["namespace"] == fleet_ctx.namespace
        assert fleet_ctx.labels.items() <= policy["metadata"]["labels"].items()
        for version in K8S_VERSIONS:
            kv.validate(policy, version, strict=True)
    assert len({p["metadata"]["name"] for p in policies}) == len(policies)


def test_the_lifecycle_flows_are_allowed(world):
    ctx, policies, w = world
    reach = lambda a, b, port, protocol="TCP": may_reach(policies, a, b, port, protocol)
    assert reach(w.gateway, w.entry, entry_port(ctx))  # a client request through the ingress gateway
    assert reach(w.entry, w.monitor, 8080)  # KServe's logger agent -> /events
    for serving in (w.predictor, w.transformer):
        assert reach(serving, w.dns, 53, "UDP") and reach(serving, w.dns, 53)
        assert reach(serving, w.object_store, 443)  # storage-initializer pulls the model
        assert reach(serving, w.istiod, 15012)  # the sidecar's config and certificate
        assert reach(w.prometheus, serving, 8080) and reach(w.prometheus, serving, 15020)
    assert reach(w.prometheus, w.monitor, 8080) and reach(w.alertmanager, w.monitor, 8080)
    assert reach(w.neighbour, w.monitor, 8080)  # the pipeline's monitoring check, a labelling step
    assert reach(w.monitor, w.dns, 53, "UDP") and reach(w.monitor, w.istiod, 15012)
    assert reach(w.monitor, w.object_store, 443)
    assert reach(w.monitor, w.mlflow, w.mlflow_port)
    kfp = next(e for e in ctx.endpoints if e.key == "kfp.host")
    assert not kfp.in_cluster and reach(w.monitor, Host("198.51.100.7"), kfp.port)  # the KFP API by its URL


def test_in_mesh_callers_reach_the_model_only_from_the_namespaces_config_admits(fleet_ctx):
    """`auth.caller_namespaces`: their workloads call the entry port over the mesh (a shadow route
    mirrors their requests); nothing else of the model or the monitor, and no other namespace."""
    ctx = dataclasses.replace(fleet_ctx, fleet=fleet_ctx.fleet.model_copy(update={
        "auth": fleet_ctx.fleet.auth.model_copy(update={"caller_namespaces": ["payments"]})}))
    policies, w = network.objects(ctx), World(ctx)
    caller, stranger = pod("payments", "10.8.0.1", app="checkout"), pod("marketing", "10.8.0.2", app="checkout")
    port = entry_port(ctx)
    assert may_reach(policies, caller, w.entry, port, "TCP")
    assert not may_reach(policies, stranger, w.entry, port, "TCP")
    assert not may_reach(policies, caller, w.monitor, 8080, "TCP")
    if port != 8080:
        assert not may_reach(policies, caller, w.entry, 8080, "TCP"), "the entry port only, not the model's own"
    assert not may_reach(network.objects(fleet_ctx), caller, w.entry, port, "TCP"), "admitted by config only"


def test_everything_else_is_denied(world):
    ctx, policies, w = world
    reach = lambda a, b, port, protocol="TCP": may_reach(policies, a, b, port, protocol)
    port = entry_port(ctx)
    assert not reach(w.intruder, w.entry, port) and not reach(w.intruder, w.predictor, 8080)
    assert not reach(w.neighbour, w.entry, port)  # same namespace, not part of the InferenceService
    assert not reach(w.intruder, w.monitor, 8080) and not reach(w.gateway, w.monitor, 8080)
    if port != 8080:  # Prometheus reaches the metrics ports, not the request port
        assert not reach(w.prometheus, w.entry, port)
    assert not reach(w.monitor, w.internet, 80) and not reach(w.monitor, w.metadata, 443)
    assert not reach(w.monitor, w.kfp_in_cluster, 8888)  # KFP only at kfp.host (an outside URL here)
    for serving in (w.predictor, w.transformer):
        assert not reach(serving, w.kfp_in_cluster, 8888)  # serving pods never start runs
        assert not reach(serving, w.mlflow, w.mlflow_port)  # nor read the registry
        assert not reach(serving, w.internet, 80) and not reach(serving, w.metadata, 80)
        assert not reach(serving, w.metadata, 443)
        assert not reach(serving, w.intruder, 8080)


def test_the_activator_reaches_the_pods_only_in_knative_mode(world):
    ctx, policies, w = world
    if ctx.serving.deployment_mode == "Knative":
        assert may_reach(policies, w.activator, w.entry, 8012)  # proxied requests and /healthz probes
        assert may_reach(policies, w.autoscaler, w.entry, 9090)  # queue-proxy's autoscaling metrics
        assert may_reach(policies, w.prometheus, w.entry, 9091)  # queue-proxy's user metrics
        assert not may_reach(policies, w.activator, w.monitor, 8080)
    else:
        for port in (8012, 8080, 9081, 9090):
            assert not may_reach(policies, w.activator, w.entry, port)
            assert not may_reach(policies, w.autoscaler, w.entry, port)


def test_the_envs_cover_both_modes_and_placements():
    # The per-cluster tests above exercise both branches only if the example fleet does (single and
    # collocated have the same flows: the entry is the predictor pod, no pod-to-pod hop).
    modes = {env: contexts(env)[0].serving for env in ("dev", "staging", "prod")}
    assert modes["dev"].deployment_mode == "Standard" and modes["dev"].topology == "single"
    assert modes["staging"].deployment_mode == "Knative" and modes["staging"].topology == "separate"


def test_transformer_to_predictor_only_when_separate(world):
    ctx, policies, w = world
    if ctx.serving.topology == "separate":
        port = 8012 if ctx.serving.deployment_mode == "Knative" else (
            8081 if ctx.serving.hop_protocol == "grpc-v2" else 8080)
        assert may_reach(policies, w.transformer, w.predictor, port)
        if ctx.serving.deployment_mode == "Knative":  # through the activator or the local gateway
            assert may_reach(policies, w.transformer, w.activator, 8012)
            assert may_reach(policies, w.transformer, w.gateway, 8081)
    else:  # single (no hop) or collocated (the hop is localhost): no pod-to-pod rule at all
        for port in (8080, 8081, 8085, 8086, 8012):
            assert not may_reach(policies, w.transformer, w.predictor, port)


def test_one_policy_set_per_env_whatever_the_cluster():
    first, second = contexts("prod")[:2]
    assert first.cluster.name != second.cluster.name
    assert network.objects(first) == network.objects(second)  # SCOPE env: the env overlay holds them
    assert network.SCOPE == "env" and network.FEATURE == "network-policies"


def test_training_pods_keep_their_own_policy(world):
    ctx, policies, w = world
    base = yaml.safe_load((ROOT / "manifests/base/networkpolicy.yaml").read_text())
    selected = [p["metadata"]["name"] for p in policies if selects(p["spec"]["podSelector"], w.trainer.label_map)]
    assert selected == []  # nothing here duplicates or widens manifests/base/networkpolicy.yaml
    with_base = [*policies, {**base, "metadata": {**base["metadata"], "namespace": ctx.namespace}}]
    assert not may_reach(with_base, w.trainer, w.monitor, 8080)  # the base policy still isolates them


def test_an_in_cluster_object_store_is_reached_by_its_namespace_and_port(fleet_ctx):
    store = network.Endpoint("kfp.object_store_endpoint", "minio-service.kubeflow.svc.cluster.local", 9000, True)
    ctx = dataclasses.replace(fleet_ctx, endpoints=(*fleet_ctx.endpoints, store))
    policies, w = network.objects(ctx), World(ctx)
    minio = pod("kubeflow", "10.8.0.1", app="minio")
    assert may_reach(policies, w.predictor, minio, 9000) and may_reach(policies, w.monitor, minio, 9000)
    assert not may_reach(policies, w.predictor, w.object_store, 443)  # the configured store only


# ---- the evaluator itself: planted violations it must see ----------------------------------------

def test_the_evaluator_sees_a_planted_allow_all(world):
    ctx, policies, w = world
    assert not may_reach(policies, w.intruder, w.entry, entry_port(ctx))
    planted = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "planted", "namespace": ctx.namespace},
               "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}}
    assert may_reach([*policies, planted], w.intruder, w.entry, entry_port(ctx))


def test_the_evaluator_needs_both_ends(world):
    ctx, policies, w = world
    without_deny = [p for p in policies if not p["metadata"]["name"].endswith("default-deny")]
    # Egress side alone: the monitor's egress allow-list still isolates it; ingress alone the same.
    assert not may_reach(without_deny, w.monitor, w.internet, 80)
    only_ingress = [p for p in policies if "Egress" not in p["spec"]["policyTypes"]]
    assert may_reach(only_ingress, w.monitor, w.internet, 80)  # nothing isolates its egress now
    assert not may_reach(only_ingress, w.intruder, w.monitor, 8080)
    assert may_reach([], w.intruder, w.predictor, 1234)  # no policy: not isolated


def test_serving_and_monitor_pods_start_from_default_deny(world):
    _, policies, _ = world
    names = {p["metadata"]["name"]: p for p in policies}
    for deny in ("flywheel-serving-default-deny", "flywheel-monitor-default-deny"):
        spec = names[deny]["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"] and not spec.get("ingress") and not spec.get("egress")


def test_no_policy_repeats_a_rule(fleet_ctx):
    import json

    for policy in network.objects(fleet_ctx):
        for direction in ("ingress", "egress"):
            rules = [json.dumps(r, sort_keys=True) for r in policy["spec"].get(direction) or []]
            assert len(rules) == len(set(rules)), f"{policy['metadata']['name']}: a {direction} rule twice"


def test_the_shadow_challengers_pods_get_exactly_the_champions_flows(world):
    ctx, policies, w = world
    # The challenger's pods as KServe labels them: its InferenceService's name (fleet/shadow.py)
    name = f"{network.serving_selector(ctx)[network.ISVC_LABEL]}-challenger"
    challenger = pod(ctx.namespace, w.entry.ip.replace(".0.", ".9."), **{network.ISVC_LABEL: name,
                                                                        "component": w.entry.label_map["component"]})
    other = pod(ctx.namespace, "10.0.9.99", **{network.ISVC_LABEL: "someone-elses-model", "component": "predictor"})
    for source, target, port in ((w.gateway, None, entry_port(ctx)), (None, w.monitor, 8080),
                                 (w.prometheus, None, 15020), (None, w.dns, 53), (w.neighbour, None, entry_port(ctx)),
                                 (w.intruder, None, entry_port(ctx)), (None, w.internet, 80)):
        champion_flow = may_reach(policies, source or w.entry, target or w.entry, port)
        assert may_reach(policies, source or challenger, target or challenger, port) == champion_flow
    assert may_reach(policies, challenger, w.monitor, 8080)  # its logger posts its own events
    assert not may_reach(policies, w.intruder, challenger, entry_port(ctx))
    # Another InferenceService in the namespace is not selected: not isolated, the planted check
    assert may_reach(policies, w.intruder, other, entry_port(ctx))
