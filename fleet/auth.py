"""Istio RequestAuthentication and AuthorizationPolicies for the inference endpoint and the monitor.

Upstream KServe has no auth of its own (`security.opendatahub.io/enable-auth` is OpenDataHub's
fork), so the pods are guarded by Istio (security.istio.io/v1, istio.io/latest/docs/reference/
config/security/): a `RequestAuthentication` validates a bearer token where one is sent, an
`AuthorizationPolicy` (ALLOW) says who may call which port and path. Kubeflow ships a
`global-deny-all`, so a flow no rule here allows is refused. Kubeflow's own JWT policy selects only
the ingress gateway, which strips the token unless its rule sets `forwardOriginalToken: true`; ours
sets it at the pods too, so the transformer can forward the token (serving/hop.py) and a separate
predictor checks it again.

Who reaches what (ports and paths exact; `fleet/network.py` `serving_ports` has the ports):

serving pods (`serving.kserve.io/inferenceservice: <isvc>`), and the same rules again for the shadow
challenger's (`<isvc>-challenger`, fleet/shadow.py): an AuthorizationPolicy selector has
`matchLabels` only, so it gets its own RequestAuthentication and policy. A mirrored copy leaves
the caller's own sidecar (Envoy mirrors where the route is applied: `gateways: [mesh]`) with the
caller's mTLS identity and every header of the original, its bearer token included (only the
authority gets `-shadow`), so the token rule below admits exactly the copies of admitted calls;
  - a valid token (any, or one of `auth.principals`): the model's inference, metadata and health
    paths, REST and gRPC, on the entry ports (gateway -> entry) and the hop ports (transformer ->
    separate predictor, token forwarded);
  - any mesh workload (mTLS), no token: health and metadata only, on the hop ports: a separate
    transformer's readiness checks of its predictor carry no caller's token;
  - Prometheus' principal: GET /metrics on the metrics ports Envoy intercepts (pilot-agent's 15020
    is not intercepted: istio.io "Application Requirements", ports used by Istio);
  - Knative only, the activator and autoscaler (`auth.knative_namespace`, sidecar injected as
    knative.dev/docs/serving/istio-authorization asks): /healthz on queue-proxy (probes) and
    /metrics on 9090 (autoscaler), nothing else: client requests through the activator keep their token.
  - kubelet probes need no rule: Istio rewrites them to pilot-agent's 15020 by default
    (`sidecar.istio.io/rewriteAppHTTPProbers`, default true), which calls the app over localhost.
monitor pods (`app.kubernetes.io/name: flywheel-monitor`), port 8080
  - POST /events: the serving pods' ServiceAccount (KServe's logger agent) only;
  - POST /ground_truth and /drift: the pipeline runner's ServiceAccount (the monitoring check, a
    labelling step), or a token of a subject that may call the model (`auth.principals`; any valid
    token where none are listed) for a labelling job;
  - GET /metrics: Prometheus only; POST /alerts: Alertmanager only; GET /healthz: any mesh workload.
"""
from __future__ import annotations

from deployment.inferenceservice import isvc_name
from fleet.context import MONITOR_PORT, PIPELINE_RUNNER, FleetContext
from fleet.network import (
    QUEUE_AUTOSCALER_METRICS,
    QUEUE_H2C,
    QUEUE_HTTP,
    challenger_selector,
    knative,
    monitor_selector,
    serving_ports,
    serving_selector,
)
from fleet.serving import SERVICE_ACCOUNT
from fleet.shadow import challenger_name

FEATURE: str | None = "jwt-auth"
SCOPE = "env"

API_VERSION = "security.istio.io/v1"
# The serving pods' identity: the tree's InferenceService runs both components as this account
# (fleet/serving.py), so the monitor's /events rule admits the serving pods alone.
SERVING_SERVICE_ACCOUNT = SERVICE_ACCOUNT
GRPC_SERVICE = "/inference.GRPCInferenceService"  # Open Inference Protocol v2 gRPC (KServe's proto)
KNATIVE_PROBE_PATH = "/healthz"  # knative.dev/networking network.ProbePath: the activator's probes
METRICS_PATH = "/metrics"
UNINTERCEPTED = {15020, 15021, 15090}  # pilot-agent and Envoy's own ports: Istio's iptables skip them


def inference_paths(model: str) -> list[str]:
    """The requests that run the model: v1 and v2 REST, v2 gRPC (ModelInfer)."""
    return [f"/v1/models/{model}:predict", f"/v2/models/{model}/infer", f"{GRPC_SERVICE}/ModelInfer"]


def health_paths(model: str) -> list[str]:
    """Readiness, liveness and metadata: what a caller checks before calling, REST and gRPC."""
    return ["/v2/health/ready", "/v2/health/live", f"/v1/models/{model}", f"/v2/models/{model}",
            f"/v2/models/{model}/ready", f"{GRPC_SERVICE}/ServerLive", f"{GRPC_SERVICE}/ServerReady",
            f"{GRPC_SERVICE}/ModelReady", f"{GRPC_SERVICE}/ModelMetadata"]


def trust_domain(ctx: FleetContext) -> str:
    """The mesh's trust domain, as the configured Prometheus principal spells it."""
    principal = ctx.fleet.auth.prometheus
    return principal.split("/ns/")[0] if "/ns/" in principal else "cluster.local"


def principal(ctx: FleetContext, service_account: str) -> str:
    """The mTLS identity of a ServiceAccount of this namespace (`<trust domain>/ns/<ns>/sa/<sa>`)."""
    return f"{trust_domain(ctx)}/ns/{ctx.namespace}/sa/{service_account}"


def request_principals(ctx: FleetContext) -> list[str]:
    """Whose tokens may call the model: the configured `<iss>/<sub>` list, else any valid token."""
    return list(ctx.fleet.auth.principals) or ["*"]


def _meta(ctx: FleetContext, name: str) -> dict:
    return {"name": name, "namespace": ctx.namespace, "labels": dict(ctx.labels)}


def _rule(source: dict, *, ports, paths: list[str], methods: list[str] | None = None) -> dict:
    operation = {"ports": [str(p) for p in sorted(ports)], "paths": list(paths)}
    if methods:
        operation["methods"] = list(methods)
    return {"from": [{"source": source}], "to": [{"operation": operation}]}


def request_authentication(ctx: FleetContext, name: str, selector: dict[str, str]) -> dict:
    """Validate a bearer token from the configured issuer; keep it in the request
    (`forwardOriginalToken`) so that the next hop can check it too. A request without a token
    passes here; the AuthorizationPolicy decides whether it needed one."""
    auth = ctx.fleet.auth
    rule = {"issuer": auth.issuer, "jwksUri": auth.jwks_uri, "forwardOriginalToken": True}
    if auth.audiences:
        rule["audiences"] = list(auth.audiences)
    return {"apiVersion": API_VERSION, "kind": "RequestAuthentication", "metadata": _meta(ctx, name),
            "spec": {"selector": {"matchLabels": selector}, "jwtRules": [rule]}}


def serving_rules(ctx: FleetContext) -> list[dict]:
    """The serving pods' ALLOW rules (see the module docstring)."""
    model, ports, auth = ctx.model_name, serving_ports(ctx), ctx.fleet.auth
    callers = {*ports.entry, *ports.hop}
    rules = [_rule({"requestPrincipals": request_principals(ctx)}, ports=callers,
                   paths=inference_paths(model) + health_paths(model)),
             _rule({"principals": [auth.prometheus]}, ports=set(ports.metrics) - UNINTERCEPTED,
                   paths=[METRICS_PATH], methods=["GET"])]
    if ports.hop:
        rules.append(_rule({"principals": ["*"]}, ports=ports.hop, paths=health_paths(model)))
    if knative(ctx):
        system = {"namespaces": [auth.knative_namespace]}
        rules += [_rule(system, ports=(QUEUE_HTTP, QUEUE_H2C), paths=[KNATIVE_PROBE_PATH]),
                  _rule(system, ports=(QUEUE_AUTOSCALER_METRICS,), paths=[METRICS_PATH])]
    return rules


def monitor_rules(ctx: FleetContext) -> list[dict]:
    """The monitor's ALLOW rules: each path from exactly its callers (see the module docstring)."""
    auth, port = ctx.fleet.auth, (MONITOR_PORT,)
    return [_rule({"principals": [principal(ctx, SERVING_SERVICE_ACCOUNT)]}, ports=port, paths=["/events"],
                  methods=["POST"]),
            _rule({"principals": [principal(ctx, PIPELINE_RUNNER)]}, ports=port,
                  paths=["/ground_truth", "/drift"], methods=["POST"]),
            # A labelling job (ground truth) or a check run elsewhere (drift) with a token: the same
            # subjects that may call the model (auth.principals), never payload events (the logger's).
            _rule({"requestPrincipals": request_principals(ctx)}, ports=port, paths=["/ground_truth", "/drift"],
                  methods=["POST"]),
            _rule({"principals": [auth.prometheus]}, ports=port, paths=[METRICS_PATH], methods=["GET"]),
            _rule({"principals": [auth.alertmanager]}, ports=port, paths=["/alerts"], methods=["POST"]),
            _rule({"principals": ["*"]}, ports=port, paths=["/healthz"], methods=["GET"])]


def authorization_policy(ctx: FleetContext, name: str, selector: dict[str, str], rules: list[dict]) -> dict:
    return {"apiVersion": API_VERSION, "kind": "AuthorizationPolicy", "metadata": _meta(ctx, name),
            "spec": {"selector": {"matchLabels": selector}, "action": "ALLOW", "rules": rules}}


def objects(ctx: FleetContext) -> list[dict]:
    """Token validation and the ALLOW policies for the serving and monitor pods; [] without an issuer."""
    if not ctx.fleet.auth.issuer:
        return []
    serving, challenger, monitor = serving_selector(ctx), challenger_selector(ctx), monitor_selector(ctx)
    name, shadow = isvc_name(ctx.model_name), challenger_name(ctx.model_name)
    return [request_authentication(ctx, f"{name}-jwt", serving),
            request_authentication(ctx, f"{shadow}-jwt", challenger),
            request_authentication(ctx, "flywheel-monitor-jwt", monitor),
            authorization_policy(ctx, name, serving, serving_rules(ctx)),
            authorization_policy(ctx, shadow, challenger, serving_rules(ctx)),
            authorization_policy(ctx, "flywheel-monitor", monitor, monitor_rules(ctx))]


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []
