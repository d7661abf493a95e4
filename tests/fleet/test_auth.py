"""fleet/auth.py: token validation kept for the next hop, and who reaches which port and path of the
serving and monitor pods, read through a small evaluator of Istio ALLOW rules
(istio.io/latest/docs/reference/config/security/authorization-policy: a request is allowed when
any rule matches; a rule matches when any `from` source and any `to` operation match, each field of
a source/operation ANDed; values are exact, `prefix*`, `*suffix` or `*` = present)."""
from __future__ import annotations

import dataclasses

import pytest

from deployment.inferenceservice import ServedModel, render, to_dict
from fleet import auth, network
from fleet.context import MODEL_URI_PLACEHOLDER, FleetContext
from tests.fleet.conftest import contexts


@dataclasses.dataclass(frozen=True)
class Request:
    port: int
    path: str
    method: str = "POST"
    principal: str | None = None  # the caller's mTLS identity (a sidecar-injected workload)
    token: str | None = None  # the request principal `<iss>/<sub>` of a valid JWT
    namespace: str | None = None  # the caller's namespace (from its mTLS identity)


def value_matches(pattern: str, value: str | None) -> bool:
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def source_matches(source: dict, r: Request) -> bool:
    checks = {"principals": r.principal, "requestPrincipals": r.token, "namespaces": r.namespace}
    return all(any(value_matches(p, checks[key]) for p in patterns) for key, patterns in source.items())


def operation_matches(operation: dict, r: Request) -> bool:
    checks = {"ports": str(r.port), "paths": r.path, "methods": r.method}
    return all(any(value_matches(p, checks[key]) for p in patterns) for key, patterns in operation.items())


def allowed(policy: dict, r: Request) -> bool:
    assert policy["spec"]["action"] == "ALLOW"
    return any(any(source_matches(f["source"], r) for f in rule.get("from", [{"source": {}}]))
               and any(operation_matches(t["operation"], r) for t in rule.get("to", [{"operation": {}}]))
               for rule in policy["spec"]["rules"])


def built(ctx: FleetContext) -> dict:
    return {(o["kind"], o["metadata"]["name"]): o for o in auth.objects(ctx)}


def policies(ctx: FleetContext) -> tuple[dict, dict]:
    objs = built(ctx)
    name = network.serving_selector(ctx)[network.ISVC_LABEL]
    return objs[("AuthorizationPolicy", name)], objs[("AuthorizationPolicy", "flywheel-monitor")]


TOKEN = "https://auth.example.internal/dex/someone"


def sa(ctx: FleetContext, account: str, namespace: str | None = None) -> str:
    return f"cluster.local/ns/{namespace or ctx.namespace}/sa/{account}"


def entry(ctx: FleetContext) -> int:
    return network.serving_ports(ctx).entry[0]


def test_tokens_are_validated_and_kept_for_the_next_hop(fleet_ctx):
    objs = built(fleet_ctx)
    authn = [o for o in objs.values() if o["kind"] == "RequestAuthentication"]
    selectors = [o["spec"]["selector"]["matchLabels"] for o in authn]
    assert selectors == [network.serving_selector(fleet_ctx), network.challenger_selector(fleet_ctx),
                         network.monitor_selector(fleet_ctx)]
    for obj in objs.values():
        assert obj["apiVersion"] == "security.istio.io/v1" and obj["metadata"]["namespace"] == fleet_ctx.namespace
        assert fleet_ctx.labels.items() <= obj["metadata"]["labels"].items()
    for o in authn:
        (rule,) = o["spec"]["jwtRules"]
        assert rule == {"issuer": fleet_ctx.fleet.auth.issuer, "jwksUri": fleet_ctx.fleet.auth.jwks_uri,
                        "audiences": ["flywheel"], "forwardOriginalToken": True}
    assert auth.platform_objects(fleet_ctx) == []


def test_the_shadow_challenger_gets_the_champions_rules_and_admits_a_mirrored_copy(fleet_ctx):
    objs, name = built(fleet_ctx), network.serving_selector(fleet_ctx)[network.ISVC_LABEL]
    champion, challenger = objs[("AuthorizationPolicy", name)], objs[("AuthorizationPolicy", f"{name}-challenger")]
    # The challenger's pods, by the label KServe puts on them (its InferenceService's name), and no others
    assert challenger["spec"]["selector"]["matchLabels"] == {network.ISVC_LABEL: f"{name}-challenger"}
    authn = objs[("RequestAuthentication", f"{name}-challenger-jwt")]
    assert authn["spec"]["selector"] == challenger["spec"]["selector"]
    assert challenger["spec"]["rules"] == champion["spec"]["rules"]
    # A mirrored copy: the caller's sidecar sends it with the caller's identity and the original's token
    caller, token = sa(fleet_ctx, "some-client"), fleet_ctx.fleet.auth.principals[:1] or [TOKEN]
    path = f"/v1/models/{fleet_ctx.model_name}:predict"
    assert allowed(challenger, Request(entry(fleet_ctx), path, principal=caller, token=token[0]))
    assert not allowed(challenger, Request(entry(fleet_ctx), path, principal=caller))  # a copy of a refused call


def test_a_valid_token_calls_the_model_and_nothing_else_does(fleet_ctx):
    serving, _ = policies(fleet_ctx)
    model, port = fleet_ctx.model_name, entry(fleet_ctx)
    token = TOKEN if not fleet_ctx.fleet.auth.principals else fleet_ctx.fleet.auth.principals[0]
    for path in (f"/v2/models/{model}/infer", f"/v1/models/{model}:predict",
                 "/inference.GRPCInferenceService/ModelInfer"):
        assert allowed(serving, Request(port, path, token=token))
        assert not allowed(serving, Request(port, path))  # no token
        assert not allowed(serving, Request(port, path, principal=sa(fleet_ctx, "default")))  # mTLS is no token
    assert not allowed(serving, Request(port, "/v2/models/another-model/infer", token=token))
    assert not allowed(serving, Request(port, "/v2/repository/index", token=token))  # not a path we serve


def test_the_configured_principals_narrow_the_token_rule():
    prod, dev = contexts("prod")[0], contexts("dev")[0]
    model, path = prod.model_name, f"/v2/models/{prod.model_name}/infer"
    (allowed_principal,) = prod.fleet.auth.principals
    serving, _ = policies(prod)
    assert allowed(serving, Request(entry(prod), path, token=allowed_principal))
    assert not allowed(serving, Request(entry(prod), path, token=TOKEN))  # valid token, other subject
    # dev lists none: any valid token; the same list set on dev narrows it the same way
    assert allowed(policies(dev)[0], Request(entry(dev), f"/v2/models/{model}/infer", token=TOKEN))
    narrowed = dataclasses.replace(dev, fleet=dev.fleet.model_copy(update={
        "auth": dev.fleet.auth.model_copy(update={"principals": [allowed_principal]})}))
    assert not allowed(policies(narrowed)[0], Request(entry(dev), f"/v2/models/{model}/infer", token=TOKEN))
    assert allowed(policies(narrowed)[0], Request(entry(dev), f"/v2/models/{model}/infer", token=allowed_principal))


def test_prometheus_scrapes_metrics_only(fleet_ctx):
    serving, monitor = policies(fleet_ctx)
    prometheus = fleet_ctx.fleet.auth.prometheus
    assert allowed(serving, Request(8080, "/metrics", "GET", principal=prometheus))
    assert not allowed(serving, Request(8080, "/metrics", "GET", principal=sa(fleet_ctx, "default")))
    assert not allowed(serving, Request(entry(fleet_ctx), f"/v2/models/{fleet_ctx.model_name}/infer",
                                        principal=prometheus))
    assert allowed(monitor, Request(8080, "/metrics", "GET", principal=prometheus))
    assert not allowed(monitor, Request(8080, "/alerts", principal=prometheus))
    assert not allowed(monitor, Request(8080, "/ground_truth", principal=prometheus))


def test_the_monitor_takes_each_path_from_its_callers_only(fleet_ctx):
    _, monitor = policies(fleet_ctx)
    serving_sa, runner = sa(fleet_ctx, auth.SERVING_SERVICE_ACCOUNT), sa(fleet_ctx, "flywheel-pipeline-runner")
    alertmanager, stranger = fleet_ctx.fleet.auth.alertmanager, sa(fleet_ctx, "default", "someone-else")
    assert allowed(monitor, Request(8080, "/events", principal=serving_sa))  # KServe's logger agent
    assert not allowed(monitor, Request(8080, "/alerts", principal=serving_sa))
    assert not allowed(monitor, Request(8080, "/events", "GET", principal=serving_sa))
    assert allowed(monitor, Request(8080, "/alerts", principal=alertmanager))
    assert not allowed(monitor, Request(8080, "/events", principal=alertmanager))
    assert allowed(monitor, Request(8080, "/drift", principal=runner))  # the pipeline's monitoring check
    labeller = (fleet_ctx.fleet.auth.principals or [TOKEN])[0]  # a labelling job with a token
    assert allowed(monitor, Request(8080, "/ground_truth", token=labeller))
    assert not allowed(monitor, Request(8080, "/events", token=labeller))  # payload events: the logger only
    if fleet_ctx.fleet.auth.principals:  # prod: a valid token of another subject writes nothing
        assert not allowed(monitor, Request(8080, "/ground_truth", token=TOKEN))
        assert not allowed(monitor, Request(8080, "/drift", token=TOKEN))
    assert not allowed(monitor, Request(8080, "/ground_truth", principal=stranger))
    assert not allowed(monitor, Request(8080, "/events", principal=stranger))
    assert not allowed(monitor, Request(8080, "/alerts", token=TOKEN))  # a token is no Alertmanager
    assert allowed(monitor, Request(8080, "/healthz", "GET", principal=stranger))  # in-mesh health is fine
    assert not allowed(monitor, Request(9090, "/events", principal=serving_sa))  # only the service port


def test_knative_system_pods_probe_and_scrape_but_cannot_call_the_model(fleet_ctx):
    serving, _ = policies(fleet_ctx)
    system = dict(namespace=fleet_ctx.fleet.auth.knative_namespace,
                  principal=f"cluster.local/ns/{fleet_ctx.fleet.auth.knative_namespace}/sa/controller")
    probe, scrape = Request(8012, "/healthz", "GET", **system), Request(9090, "/metrics", "GET", **system)
    if fleet_ctx.serving.deployment_mode == "Knative":
        assert allowed(serving, probe) and allowed(serving, scrape)
        assert not allowed(serving, Request(8012, f"/v2/models/{fleet_ctx.model_name}/infer", **system))
    else:
        assert not allowed(serving, probe) and not allowed(serving, scrape)


def test_a_separate_predictor_rechecks_the_forwarded_token(fleet_ctx):
    serving, _ = policies(fleet_ctx)
    hop = network.serving_ports(fleet_ctx).hop
    if not hop:
        pytest.skip("single or collocated: no hop, or a localhost one the sidecar does not see")
    model, transformer = fleet_ctx.model_name, sa(fleet_ctx, auth.SERVING_SERVICE_ACCOUNT)
    assert allowed(serving, Request(hop[0], f"/v2/models/{model}/infer", principal=transformer, token=TOKEN))
    assert not allowed(serving, Request(hop[0], f"/v2/models/{model}/infer", principal=transformer))
    # the transformer's readiness checks carry no caller's token
    assert allowed(serving, Request(hop[0], "/inference.GRPCInferenceService/ModelReady", principal=transformer))
    assert not allowed(serving, Request(hop[0], "/inference.GRPCInferenceService/ModelReady"))  # not in mesh


def test_paths_name_the_model_the_servers_serve_and_probes_stay_rewritten(fleet_ctx):
    # The rendered InferenceService (the builder `flywheel deploy` uses): --model_name is the name in
    # the policy's paths, and no pod opts out of Istio's probe rewrite (else the kubelet's probes
    # would meet the ALLOW policies without a token: sidecar.istio.io/rewriteAppHTTPProbers).
    isvc = to_dict(render(fleet_ctx.serving, image=fleet_ctx.image, namespace=fleet_ctx.namespace,
                          env=fleet_ctx.env, model=ServedModel(fleet_ctx.model_name, "1", MODEL_URI_PLACEHOLDER)))
    assert isvc["metadata"]["name"] == network.serving_selector(fleet_ctx)[network.ISVC_LABEL]
    for component in ("predictor", "transformer"):
        part = isvc["spec"].get(component)
        if not part:
            continue
        assert (part.get("annotations") or {}).get("sidecar.istio.io/rewriteAppHTTPProbers") != "false"
        for container in part["containers"]:
            args = container["args"]
            assert args[args.index("--model_name") + 1] == fleet_ctx.model_name
            for probe in ("readinessProbe", "livenessProbe"):
                assert "httpGet" in container.get(probe, {"httpGet": {}})
    assert isvc["metadata"]["annotations"].get("sidecar.istio.io/rewriteAppHTTPProbers") != "false"


def test_no_issuer_no_objects(fleet_ctx):
    open_ctx = dataclasses.replace(fleet_ctx, fleet=fleet_ctx.fleet.model_copy(update={
        "auth": fleet_ctx.fleet.auth.model_copy(update={"issuer": None, "jwks_uri": None, "principals": []})}))
    assert auth.objects(open_ctx) == []
    assert auth.FEATURE == "jwt-auth" and auth.SCOPE == "env"
    first, second = contexts("prod")[:2]
    assert auth.objects(first) == auth.objects(second)


def test_the_evaluator_sees_a_planted_open_rule(fleet_ctx):
    serving, _ = policies(fleet_ctx)
    call = Request(entry(fleet_ctx), f"/v2/models/{fleet_ctx.model_name}/infer")
    assert not allowed(serving, call)
    planted = {**serving, "spec": {**serving["spec"], "rules": [*serving["spec"]["rules"], {}]}}
    assert allowed(planted, call)  # an empty rule matches every request
    widened = {**serving, "spec": {**serving["spec"], "rules": [
        {"to": [{"operation": {"paths": ["/v2/models/*"]}}]}]}}
    assert allowed(widened, call)
