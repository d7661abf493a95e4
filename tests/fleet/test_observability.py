"""fleet/observability.py: each env's PrometheusRule selects only its namespace (and promtool agrees:
the same series in another namespace fire nothing), the monitors select what the monitor Service
and the InferenceService expose, every dashboard panel filters by namespace, and retraining alerts
route to the monitor Service's /alerts."""
import json
import re
import shutil
import subprocess

import pytest
import yaml

from deployment.inferenceservice import HTTP_PORT, isvc_name
from fleet import monitor, observability
from tests.fleet.conftest import contexts
from tests.pipelines.test_alerts import metric_names

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")


def by_kind(objects):
    return {o["kind"]: o for o in objects}


def test_the_env_objects(fleet_ctx):
    objects = observability.objects(fleet_ctx)
    assert sorted(o["kind"] for o in objects) == ["AlertmanagerConfig", "ConfigMap", "PodMonitor", "PrometheusRule",
                                                   "ServiceMonitor"]
    for obj in objects:
        assert obj["metadata"]["namespace"] == fleet_ctx.namespace
        assert fleet_ctx.labels.items() <= obj["metadata"]["labels"].items()
    assert observability.platform_objects(fleet_ctx) == []


def test_the_dashboard_config_map_validates_strictly(fleet_ctx):
    import kubernetes_validate.utils as kv

    kv.validate(by_kind(observability.objects(fleet_ctx))["ConfigMap"], "1.31.0", strict=True)


def test_every_series_selector_of_every_rule_is_scoped_to_the_namespace(fleet_ctx):
    template = {r["alert"]: r["expr"] for g in observability.rule_groups() for r in g["rules"]}
    rule = by_kind(observability.objects(fleet_ctx))["PrometheusRule"]
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            names = metric_names(template[r["alert"]])
            assert metric_names(r["expr"]) == names, r["alert"]
            for name in names:
                label = "job_namespace" if name.startswith("training_operator_") else "namespace"
                uses = re.findall(rf"\b{name}\b(.{{0,80}})", r["expr"])
                scoped = f'{{{label}="{fleet_ctx.namespace}"'
                assert uses and all(u.startswith(scoped) for u in uses), (r["alert"], uses)
            assert '=~"flywheel.*"' not in r["expr"], r["alert"]


def test_scoping_replaces_a_matcher_on_the_label_and_leaves_promql_alone():
    expr = ('histogram_quantile(0.99, sum by (namespace, le) (rate(a_bucket{namespace=~"x.*", code=~"5.."}[5m])))'
            ' / on (namespace) group_left up > 0.5 unless bool training_operator_jobs_failed_total')
    assert observability.scope(expr, "ns") == (
        'histogram_quantile(0.99, sum by (namespace, le) (rate(a_bucket{namespace="ns", code=~"5.."}[5m])))'
        ' / on (namespace) group_left up{namespace="ns"} > 0.5 unless bool '
        'training_operator_jobs_failed_total{job_namespace="ns"}')
    with pytest.raises(ValueError, match="cannot read the matchers"):
        observability.scope("a{namespace=~x}", "ns")  # an unquoted value: not PromQL


def _unit_test(rules_file, namespace: str) -> dict:
    """Drift and a GPU pegged in the env's namespace and, identically, in another: only ours fire."""
    def series(name, labels, values):
        inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
        return {"series": f"{name}{{{inner}}}", "values": values}

    inputs, other = [], "someone-else"
    for ns in (namespace, other):
        inputs += [series("flywheel_monitor_feature_drift",
                          {"namespace": ns, "model_version": "7", "feature": "age", "stat": "psi"}, "0.5x60"),
                   series("DCGM_FI_DEV_GPU_UTIL", {"namespace": ns, "gpu": "0", "Hostname": f"n-{ns}",
                                                   "modelName": "A100"}, "99x60"),
                   series("training_operator_jobs_failed_total", {"job_namespace": ns, "framework": "pytorch",
                                                                  "namespace": "kubeflow"}, "0 0 1x30")]
    return {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": inputs,
        "alert_rule_test": [
            {"eval_time": "45m", "alertname": "FlywheelFeatureDrift", "exp_alerts": [{"exp_labels": {
                "namespace": namespace, "model_version": "7", "feature": "age", "severity": "warning",
                "flywheel_action": "retrain"}}]},
            {"eval_time": "30m", "alertname": "FlywheelGpuSaturated", "exp_alerts": [{"exp_labels": {
                "gpu": "0", "Hostname": f"n-{namespace}", "modelName": "A100", "severity": "info"}}]},
            {"eval_time": "5m", "alertname": "FlywheelTrainingJobFailed", "exp_alerts": [{"exp_labels": {
                "job_namespace": namespace, "severity": "warning"}}]}]}]}


@needs_promtool
@pytest.mark.parametrize("env", ["dev", "prod"])
def test_promtool_fires_the_scoped_rules_for_the_namespace_only(tmp_path, env):
    rule = by_kind(observability.objects(contexts(env)[0]))["PrometheusRule"]
    groups = rule["spec"]["groups"]
    for r in (r for g in groups for r in g["rules"]):
        r.pop("annotations")  # this test is about which series fire; test_alerts.py checks the texts
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    check = subprocess.run([PROMTOOL, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test_file = tmp_path / "test.yaml"
    test_file.write_text(yaml.safe_dump(_unit_test(rules_file, rule["metadata"]["namespace"]), sort_keys=False))
    result = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_service_monitor_selects_the_monitor_service_by_port_name(fleet_ctx):
    service = by_kind(monitor.objects(fleet_ctx))["Service"]
    spec = by_kind(observability.objects(fleet_ctx))["ServiceMonitor"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": [fleet_ctx.namespace]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"


def test_the_pod_monitor_scrapes_the_port_the_inferenceservice_declares(fleet_ctx):
    from deployment.inferenceservice import ServedModel, render
    from gateways.kube_api import serialize

    spec = by_kind(observability.objects(fleet_ctx))["PodMonitor"]["spec"]
    assert spec["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc_name(fleet_ctx.model_name)}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["portNumber"] == HTTP_PORT and endpoint["path"] == "/metrics"
    isvc = serialize(render(fleet_ctx.serving, image=fleet_ctx.image, namespace=fleet_ctx.namespace,
                            env=fleet_ctx.env, model=ServedModel(fleet_ctx.model_name, "1", "s3://b/m")))
    assert isvc["metadata"]["name"] == isvc_name(fleet_ctx.model_name)
    entry = isvc["spec"].get("transformer") or isvc["spec"]["predictor"]  # the client-facing component
    declared = {p["containerPort"] for c in entry["containers"] for p in c.get("ports") or []}
    assert HTTP_PORT in declared


def test_every_dashboard_panel_filters_by_the_namespace(fleet_ctx):
    board = json.loads(next(iter(by_kind(observability.objects(fleet_ctx))["ConfigMap"]["data"].values())))
    targets = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    assert targets and any("DCGM_" in e for _, e in targets)
    for title, expr in targets:
        selectors = re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\{([^}]*)\}", expr)
        assert selectors and all('namespace="$namespace"' in s for s in selectors), title
        for name in metric_names(expr):  # no bare metric escapes the filter
            assert all(m.group(1) == "{" for m in re.finditer(rf"\b{name}\b(.)", expr)), (title, name)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["namespace"]["type"] == variables["model"]["type"] == "query"
    assert variables["namespace"]["current"]["value"] == fleet_ctx.namespace
    assert variables["model"]["current"]["value"] == fleet_ctx.model_name
    assert 'namespace="$namespace"' in variables["model"]["definition"]


def test_each_env_has_its_own_dashboard_uid_and_file():
    maps = [by_kind(observability.objects(contexts(env)[0]))["ConfigMap"] for env in ("dev", "staging", "prod")]
    keys = [next(iter(m["data"])) for m in maps]
    uids = [json.loads(next(iter(m["data"].values())))["uid"] for m in maps]
    assert len(set(keys)) == len(set(uids)) == 3 and all(len(u) <= 40 for u in uids)
    assert len(observability.dashboard_uid("n" * 63)) <= 40


def test_the_alert_route_points_at_the_monitor_service(fleet_ctx):
    service = by_kind(monitor.objects(fleet_ctx))["Service"]
    (port,) = service["spec"]["ports"]
    spec = by_kind(observability.objects(fleet_ctx))["AlertmanagerConfig"]["spec"]
    (receiver,) = spec["receivers"]
    assert spec["route"]["receiver"] == receiver["name"]
    (hook,) = receiver["webhookConfigs"]
    assert hook["url"] == f"http://{service['metadata']['name']}.{fleet_ctx.namespace}.svc:{port['port']}/alerts"
    assert {"name": "namespace", "value": fleet_ctx.namespace, "matchType": "="} in spec["route"]["matchers"]
