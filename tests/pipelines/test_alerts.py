"""The alert path: the rule template (fleet/data/prometheus-rules.yaml) passes `promtool check rules`
and fires (and only fires) as its unit tests on synthetic series say (`promtool test rules`); the
plain rules file (manifests/monitoring/) is rendered from it; retraining alerts route to the
monitor's /alerts; the Grafana dashboard is valid and every expression names only metrics that
exist. Each env's objects built from these: tests/fleet/test_observability.py."""
import json
import re
import shutil
import subprocess

import pytest
import yaml

from fleet import observability
from fleet.observability import DASHBOARD_FILE as DASHBOARD
from fleet.observability import RULES_FILE as RULES
from pipelines.alerts import PLAIN_RULES, plain_rules, rule_groups
from pipelines.config import load_settings
from tests.fleet.conftest import contexts

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install -y prometheus; .ci/run installs it)")

# Metrics that others export (not this project): where each name comes from.
EXTERNAL_METRICS = {
    # KServe ModelServer (kserve/protocol/rest/..., label model_name)
    **{f"request_{stage}_seconds{suffix}": "kserve" for stage in ("preprocess", "predict", "postprocess")
       for suffix in ("_bucket", "_count", "_sum")},
    # NVIDIA dcgm-exporter's default counters
    **{name: "dcgm-exporter" for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE",
                                          "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_XID_ERRORS")},
    # Kubeflow Training Operator v1, pkg/common/metrics.go (labels job_namespace, framework)
    **{f"training_operator_jobs_{what}_total": "training-operator"
       for what in ("created", "deleted", "successful", "failed", "restarted")},
    # kube-state-metrics, job metrics
    "kube_job_failed": "kube-state-metrics", "kube_job_status_failed": "kube-state-metrics",
    "up": "prometheus",
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan", "le"}


def _sample_names(name: str, kind: str) -> set[str]:
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created", ""), "gauge": ("",), "info": ("_info",)}[kind]
    return {name + s for s in suffixes}


def _registry_names(registry) -> set[str]:
    return {n for family in registry.collect() for n in _sample_names(family.name, family.type)}


@pytest.fixture(scope="module")
def project_metrics(tmp_path_factory) -> set[str]:
    """Every metric name serving/ and monitoring/ export, read from their Prometheus registries."""
    from prometheus_client.metrics import MetricWrapperBase

    import serving.server_metrics as serving_metrics
    from monitoring import service, sink_metrics
    from monitoring.sink import PayloadSink

    names = set()
    for value in vars(serving_metrics).values():
        if isinstance(value, MetricWrapperBase):  # registered in the default registry, read one by one
            names |= {n for family in value.describe() for n in _sample_names(family.name, family.type)}
    sink = PayloadSink(str(tmp_path_factory.mktemp("sink")), start=False)
    service.create_app(sink)  # registers the app's counters beside the sink's
    names |= _registry_names(sink.metrics.registry) | _registry_names(sink_metrics.DRIFT_REGISTRY)
    sink.close()
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names in matchers or grouping clauses, durations or template variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings ("5..", "$namespace")
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name, rest = match.group(0), text[match.end():].lstrip()
        if rest.startswith("(") or name.lower() in PROMQL_WORDS:
            continue
        found.add(name)
    return found


def rules():
    return [rule for group in rule_groups(RULES) for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    # template variables: Grafana's label_values(SELECTOR, LABEL), of which SELECTOR is PromQL
    exprs += [re.fullmatch(r"label_values\((.*),\s*\w+\)", v["definition"]).group(1)
              for v in dashboard["templating"]["list"] if v.get("definition")]
    return exprs


# --- the rules ----------------------------------------------------------------------------------

def test_the_plain_rules_file_is_rendered_from_the_prometheus_rule():
    doc = yaml.safe_load(RULES.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert PLAIN_RULES.read_text() == plain_rules(RULES), "python -m pipelines.alerts --write"
    assert yaml.safe_load(PLAIN_RULES.read_text())["groups"] == doc["spec"]["groups"]


def test_the_alerts_cover_drift_errors_latency_traffic_training_and_gpus():
    names = {r["alert"] for r in rules()}
    assert names == {"FlywheelFeatureDrift", "FlywheelPredictionDrift", "FlywheelLiveRocAucLow",
                     "FlywheelServingErrors", "FlywheelServingClientErrors", "FlywheelServingLatencyHigh",
                     "FlywheelNoTraffic", "FlywheelPayloadsNotRecorded", "FlywheelMonitorRejectingEvents",
                     "FlywheelTrainingJobFailed",
                     "FlywheelTrainJobFailed", "FlywheelGpuSaturated", "FlywheelGpuMemoryHigh"}
    for rule in rules():
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_drift_thresholds_are_base_configs_and_only_drift_asks_for_retraining():
    spec = load_settings("dev").monitoring  # dev keeps config/base.yaml's monitoring section
    by_name = {r["alert"]: r for r in rules()}
    assert by_name["FlywheelFeatureDrift"]["expr"].endswith(f"> {spec.psi_threshold:g}")
    assert by_name["FlywheelPredictionDrift"]["expr"].endswith(f"> {spec.prediction_psi_threshold:g}")
    assert by_name["FlywheelLiveRocAucLow"]["expr"].endswith(f"< {spec.min_roc_auc:g}")
    assert by_name["FlywheelFeatureDrift"]["for"] == "30m"
    retrain = {r["alert"] for r in rules() if r["labels"].get("flywheel_action") == "retrain"}
    assert retrain == {"FlywheelFeatureDrift", "FlywheelPredictionDrift", "FlywheelLiveRocAucLow"}


def test_every_rule_reads_only_metrics_that_exist(project_metrics):
    known = project_metrics | set(EXTERNAL_METRICS)
    for rule in rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= known, f"{rule['alert']}: unknown metrics {sorted(names - known)}"


def test_the_metric_name_reader_sees_through_promql():
    expr = ('histogram_quantile(0.99, sum by (namespace, le) (rate(flywheel_serving_request_seconds_bucket'
            '{component="transformer", code=~"5.."}[5m]))) / on (namespace) group_left up > 0.5 unless bool x_y')
    assert metric_names(expr) == {"flywheel_serving_request_seconds_bucket", "up", "x_y"}


@needs_promtool
def test_promtool_checks_the_rules():
    result = subprocess.run([PROMTOOL, "check", "rules", str(PLAIN_RULES)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


PROD = {"namespace": "flywheel-prod"}
SERVING = {**PROD, "model_name": "credit-default", "model_version": "7", "component": "transformer",
           "protocol": "v1"}


def series(name: str, labels: dict, values: str) -> dict:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def alert(name: str, at: str, labels: dict, summary: str | None = None) -> dict:
    """An alert_rule_test: at AT, NAME fires with LABELS (and the rule's own), or not at all (None)."""
    rule = next(r for r in rules() if r["alert"] == name)
    if labels is None:
        return {"eval_time": at, "alertname": name, "exp_alerts": []}
    annotations = dict(rule["annotations"])
    if summary is not None:
        annotations["summary"] = summary
    for key, value in annotations.items():  # the description's templates read labels only
        annotations[key] = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], value)
    return {"eval_time": at, "alertname": name,
            "exp_alerts": [{"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": annotations}]}


def unit_tests() -> list[dict]:
    drift = {**PROD, "model_version": "7"}
    return [
        {  # feature drift has to last 30 minutes; a feature under the threshold never fires
            "interval": "1m",
            "input_series": [
                series("flywheel_monitor_feature_drift", {**drift, "feature": "age", "stat": "psi", "job": "m"},
                       "0.05x9 0.35x60"),
                series("flywheel_monitor_feature_drift", {**drift, "feature": "income", "stat": "psi", "job": "m"},
                       "0.05x70"),
                series("flywheel_monitor_feature_drift", {**drift, "feature": "age", "stat": "p_adjusted"},
                       "0.0001x70"),
                series("flywheel_monitor_drift", {**drift, "metric": "prediction_psi"}, "0.1x10 0.3x60"),
                series("flywheel_monitor_drift", {**drift, "metric": "live_roc_auc"}, "0.8x20 0.6x50"),
            ],
            "alert_rule_test": [
                alert("FlywheelFeatureDrift", "30m", None),
                alert("FlywheelFeatureDrift", "45m", {**drift, "feature": "age"},
                      "Feature age drifted: PSI 0.350 > 0.2 for v7"),
                alert("FlywheelPredictionDrift", "30m", None),
                alert("FlywheelPredictionDrift", "50m", drift, "Score distribution drifted: PSI 0.300 > 0.2 for v7"),
                alert("FlywheelLiveRocAucLow", "40m", None),
                alert("FlywheelLiveRocAucLow", "55m", drift, "Live ROC AUC 0.600 < 0.65 for v7"),
            ],
        },
        {  # 10% 5xx for 10 minutes; 4xx share under 20%
            "interval": "1m",
            "input_series": [
                series("flywheel_serving_requests_total", {**SERVING, "code": "200"}, "0+85x40"),
                series("flywheel_serving_requests_total", {**SERVING, "code": "500"}, "0+10x40"),
                series("flywheel_serving_requests_total", {**SERVING, "code": "422"}, "0+5x40"),
                series("flywheel_serving_requests_total", {**SERVING, "component": "predictor", "code": "500"},
                       "0+1000x40"),
            ],
            "alert_rule_test": [
                alert("FlywheelServingErrors", "8m", None),
                alert("FlywheelServingErrors", "20m", {**PROD, "model_name": "credit-default"},
                      "credit-default: 10% of requests fail with 5xx"),
                alert("FlywheelServingClientErrors", "30m", None),
            ],
        },
        {  # 30% refused with 4xx for 15 minutes
            "interval": "1m",
            "input_series": [
                series("flywheel_serving_requests_total", {**SERVING, "code": "200"}, "0+70x40"),
                series("flywheel_serving_requests_total", {**SERVING, "code": "422"}, "0+30x40"),
            ],
            "alert_rule_test": [
                alert("FlywheelServingClientErrors", "25m", {**PROD, "model_name": "credit-default"},
                      "credit-default: 30% of requests are refused with 4xx"),
                alert("FlywheelServingErrors", "25m", None),
            ],
        },
        {  # the one-process server (serving.topology single) is the client-facing component too
            "interval": "1m",
            "input_series": [
                series("flywheel_serving_requests_total", {**SERVING, "component": "single", "code": "200"},
                       "0+70x40"),
                series("flywheel_serving_requests_total", {**SERVING, "component": "single", "code": "422"},
                       "0+30x40"),
            ],
            "alert_rule_test": [
                alert("FlywheelServingClientErrors", "25m", {**PROD, "model_name": "credit-default"},
                      "credit-default: 30% of requests are refused with 4xx"),
            ],
        },
        {  # p99 latency from the transformer's histogram: 80% of requests between 0.5 and 1 s
            "interval": "1m",
            "input_series": [
                series("flywheel_serving_request_seconds_bucket", {**SERVING, "le": "0.1"}, "0+10x40"),
                series("flywheel_serving_request_seconds_bucket", {**SERVING, "le": "0.5"}, "0+20x40"),
                series("flywheel_serving_request_seconds_bucket", {**SERVING, "le": "1.0"}, "0+100x40"),
                series("flywheel_serving_request_seconds_bucket", {**SERVING, "le": "+Inf"}, "0+100x40"),
            ],
            "alert_rule_test": [
                alert("FlywheelServingLatencyHigh", "5m", None),
                alert("FlywheelServingLatencyHigh", "20m", {**PROD, "model_name": "credit-default"},
                      "credit-default: p99 latency 993.8ms > 500ms"),
            ],
        },
        {  # no request for 1h30m, while requests are counted elsewhere; payloads served but not recorded
            "interval": "1m",
            "input_series": [
                series("flywheel_serving_requests_total", {**SERVING, "code": "200"}, "0+10x20 200x100"),
                series("flywheel_serving_requests_total",
                       {**SERVING, "namespace": "flywheel-staging", "code": "200"}, "0+10x120"),
                series("flywheel_monitor_rows_written_total", {"namespace": "flywheel-staging", "model_version": "7"},
                       "0x120"),
                series("flywheel_monitor_rows_written_total", {**PROD, "model_version": "7"}, "0+10x120"),
            ],
            "alert_rule_test": [
                alert("FlywheelNoTraffic", "60m", None),
                alert("FlywheelNoTraffic", "115m", {**PROD, "model_name": "credit-default"},
                      "credit-default has served no request for 1h30m"),
                alert("FlywheelPayloadsNotRecorded", "50m", None),
                alert("FlywheelPayloadsNotRecorded", "100m", {"namespace": "flywheel-staging"},
                      "Requests are served in flywheel-staging but the monitor records no rows"),
            ],
        },
        {  # the monitor refuses events (503: memory bound reached) in prod for 10 minutes, then stops;
            # staging only refuses while shutting down, which is no alert
            "interval": "1m",
            "input_series": [
                series("flywheel_monitor_rejected_events_total", {**PROD, "type": "request", "reason": "full"},
                       "0x10 0+20x10 200x30"),
                series("flywheel_monitor_rejected_events_total", {**PROD, "type": "response",
                                                                  "reason": "half_refused"}, "0x10 0+20x10 200x30"),
                series("flywheel_monitor_rejected_events_total", {"namespace": "flywheel-staging",
                                                                  "type": "request", "reason": "closing"},
                       "0+50x50"),
            ],
            "alert_rule_test": [
                alert("FlywheelMonitorRejectingEvents", "10m", None),
                alert("FlywheelMonitorRejectingEvents", "15m", PROD,
                      "The monitor in flywheel-prod refuses payload events (503): its memory bound is reached"),
                alert("FlywheelMonitorRejectingEvents", "35m", None),  # 5-minute window: it resolves
            ],
        },
        {  # a failed PyTorchJob (Training Operator) and a failed TrainJob node (kube-state-metrics)
            "interval": "1m",
            "input_series": [
                series("training_operator_jobs_failed_total",
                       {"job_namespace": "flywheel-prod", "framework": "pytorch"}, "0 0 0 1x30"),
                series("training_operator_jobs_failed_total",
                       {"job_namespace": "other-team", "framework": "pytorch"}, "0 0 0 5x30"),
                series("kube_job_failed", {"namespace": "flywheel-staging", "job_name": "train-abc-node-0-0",
                                           "condition": "true"}, "0 0 1x30"),
                series("kube_job_failed", {"namespace": "flywheel-staging", "job_name": "train-abc-node-0-0",
                                           "condition": "false"}, "1 1 0x30"),
            ],
            "alert_rule_test": [
                alert("FlywheelTrainingJobFailed", "2m", None),
                alert("FlywheelTrainingJobFailed", "5m", {"job_namespace": "flywheel-prod"},
                      "A PyTorchJob failed in flywheel-prod"),
                alert("FlywheelTrainingJobFailed", "25m", None),  # 15-minute window: it resolves
                alert("FlywheelTrainJobFailed", "5m", {"namespace": "flywheel-staging",
                                                       "job_name": "train-abc-node-0-0"},
                      "Job train-abc-node-0-0 (a TrainJob's node) failed in flywheel-staging"),
            ],
        },
        {  # DCGM: a GPU pegged at 99% for 25 minutes; one whose framebuffer is 98.7% used
            "interval": "1m",
            "input_series": [
                series("DCGM_FI_DEV_GPU_UTIL", {"gpu": "0", "Hostname": "gpu-node-a", "modelName": "NVIDIA A100",
                                                "UUID": "GPU-1"}, "99x60"),
                series("DCGM_FI_DEV_GPU_UTIL", {"gpu": "1", "Hostname": "gpu-node-a", "modelName": "NVIDIA A100",
                                                "UUID": "GPU-2"}, "40x60"),
                series("DCGM_FI_DEV_FB_USED", {"gpu": "1", "Hostname": "gpu-node-a", "modelName": "NVIDIA A100",
                                               "UUID": "GPU-2"}, "79000x30"),
                series("DCGM_FI_DEV_FB_FREE", {"gpu": "1", "Hostname": "gpu-node-a", "modelName": "NVIDIA A100",
                                               "UUID": "GPU-2"}, "1000x30"),
            ],
            "alert_rule_test": [
                alert("FlywheelGpuSaturated", "10m", None),
                alert("FlywheelGpuSaturated", "30m", {"gpu": "0", "Hostname": "gpu-node-a",
                                                      "modelName": "NVIDIA A100"},
                      "GPU 0 on gpu-node-a at 99% for 25 minutes"),
                alert("FlywheelGpuMemoryHigh", "5m", None),
                alert("FlywheelGpuMemoryHigh", "15m", {"gpu": "1", "Hostname": "gpu-node-a",
                                                       "modelName": "NVIDIA A100"},
                      "GPU 1 on gpu-node-a framebuffer 98.75% used"),
            ],
        },
    ]


@needs_promtool
def test_promtool_unit_tests_fire_the_alerts_on_synthetic_series(tmp_path):
    spec = {"rule_files": [str(PLAIN_RULES)], "evaluation_interval": "1m", "tests": unit_tests()}
    path = tmp_path / "flywheel-rules.test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = {t["alertname"] for test in spec["tests"] for t in test["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {r["alert"] for r in rules()}, "every alert has a firing unit test"


# --- routing ------------------------------------------------------------------------------------

def test_retraining_alerts_route_to_the_monitor_services_alerts_webhook():
    from monitoring.alerts import RETRAIN_LABEL, RETRAIN_VALUE, retrain_alerts

    ctx = contexts("prod")[0]
    config = observability.alertmanager_config(ctx)["spec"]
    route = config["route"]
    assert {"name": RETRAIN_LABEL, "value": RETRAIN_VALUE, "matchType": "="} in route["matchers"]
    (receiver,) = [r for r in config["receivers"] if r["name"] == route["receiver"]]
    (hook,) = receiver["webhookConfigs"]
    assert hook["url"].endswith(":8080/alerts") and hook["sendResolved"] is False
    # an alert as the rules label it is one the monitor service hands to the trigger
    rule = next(r for r in rules() if r["alert"] == "FlywheelFeatureDrift")
    payload = {"alerts": [{"status": "firing", "labels": {"alertname": rule["alert"], **rule["labels"]}},
                          {"status": "firing", "labels": {"alertname": "FlywheelServingErrors", "severity": "x"}}]}
    assert [a["labels"]["alertname"] for a in retrain_alerts(payload)] == ["FlywheelFeatureDrift"]


# --- the dashboard ------------------------------------------------------------------------------

def test_the_dashboard_is_valid_and_reads_only_metrics_that_exist(project_metrics):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["refId"] and target["expr"], panel["title"]
    known = project_metrics | set(EXTERNAL_METRICS)
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names and names <= known, f"{expr}: unknown metrics {sorted(names - known)}"


def test_the_dashboard_shows_traffic_latency_errors_drift_version_and_gpus():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = "\n".join(dashboard_exprs())
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for needle in ("rate(flywheel_serving_requests_total", "histogram_quantile(0.5,", "histogram_quantile(0.99,",
                   "sum by (code)", 'stat="psi"', "count by (model_version)", "DCGM_FI_DEV_GPU_UTIL",
                   "DCGM_FI_DEV_FB_USED"):
        assert needle in exprs, needle
    for word in ("Requests", "Latency", "Errors", "PSI per feature", "Model version", "GPU utilisation",
                 "GPU framebuffer"):
        assert word in titles, word


# --- the objects (formerly the manifests/monitoring Kustomize folder) -------------------------------

def test_the_env_objects_carry_the_rules_the_dashboard_and_the_kfp_rights():
    from fleet import monitor

    ctx = contexts("prod")[0]
    objects = {(o["kind"], o["metadata"]["name"]): o for o in [*observability.objects(ctx), *monitor.objects(ctx)]}
    assert {("PrometheusRule", "flywheel"), ("ConfigMap", "flywheel-grafana-dashboard"),
            ("Role", "flywheel-kfp-trigger"), ("RoleBinding", "flywheel-kfp-trigger")} <= set(objects)
    dashboard = objects[("ConfigMap", "flywheel-grafana-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = dashboard["data"].values()
    assert json.loads(text)["panels"] == json.loads(DASHBOARD.read_text())["panels"]
    rendered = objects[("PrometheusRule", "flywheel")]["spec"]["groups"]
    assert [[r["alert"] for r in g["rules"]] for g in rendered] == [[r["alert"] for r in g["rules"]]
                                                                     for g in rule_groups(RULES)]
