"""An env's observability objects (prometheus-operator and the Grafana sidecar): the PrometheusRule,
the ServiceMonitor of the monitor's /metrics, the PodMonitor of the serving pods, the Grafana
dashboard ConfigMap and the AlertmanagerConfig that routes retraining alerts to the monitor.

The rules and the dashboard are data files shipped in the package (fleet/data/): the rules are a
namespace-agnostic template whose every series selector gets the env's namespace here, the
dashboard gets its namespace and model variables preset and a uid and file name of its own (the
Grafana sidecar writes every dashboard ConfigMap's keys into one folder, so two envs' files must
not share a name).
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from functools import cache
from pathlib import Path

import yaml

from deployment.inferenceservice import HTTP_PORT, METRICS_PATH, isvc_name
from fleet.context import MONITOR, MONITOR_PORT, FleetContext
from fleet.monitor import POD_LABELS
from monitoring.alerts import RETRAIN_LABEL, RETRAIN_VALUE

FEATURE: str | None = None
SCOPE = "env"

DATA = Path(__file__).resolve().parent / "data"
RULES_FILE = DATA / "prometheus-rules.yaml"
DASHBOARD_FILE = DATA / "grafana-dashboard.json"
DASHBOARD_CONFIG_MAP = "flywheel-grafana-dashboard"
ISVC_LABEL = "serving.kserve.io/inferenceservice"  # on predictor and transformer pods, both modes
RETRAIN_RECEIVER = "flywheel-retrain"
SCRAPE_INTERVAL = "30s"
# Counters whose namespace label is the operator's own pod's: the job's is `job_namespace`
# (kubeflow/training-operator pkg/common/metrics.go).
JOB_NAMESPACE_METRICS = ("training_operator_",)
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan", "atan2",
                # aggregation operators: `sum by (x) (...)` has a keyword, not "(", after the name
                "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile", "limitk", "limit_ratio"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*,?')


# --- the rules ----------------------------------------------------------------------------------

@cache
def _template() -> dict:
    doc = yaml.safe_load(RULES_FILE.read_text())
    if doc.get("kind") != "PrometheusRule" or "groups" not in (doc.get("spec") or {}):
        raise ValueError(f"{RULES_FILE}: not a PrometheusRule with spec.groups")
    return doc


def rule_groups() -> list[dict]:
    """The template's rule groups, selecting every namespace (what the plain rules file holds)."""
    return copy.deepcopy(_template()["spec"]["groups"])


def _closing(expr: str, start: int, opening: str, closing: str) -> int:
    """The index just past the `closing` that matches expr[start] == `opening` (strings skipped)."""
    depth, i = 0, start
    while i < len(expr):
        char = expr[i]
        if char == '"':
            i = _string_end(expr, i)
            continue
        if char == opening:
            depth += 1
        elif char == closing:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced {opening!r} in {expr!r}")


def _string_end(expr: str, start: int) -> int:
    i = start + 1
    while expr[i] != '"':
        i += 2 if expr[i] == "\\" else 1
    return i + 1


def _scoped_selector(name: str, matchers: str, namespace: str) -> str:
    label = "job_namespace" if name.startswith(JOB_NAMESPACE_METRICS) else "namespace"
    found = _MATCHER.findall(matchers)
    if "".join(m.group(0) for m in _MATCHER.finditer(matchers)).strip() != matchers.strip():
        raise ValueError(f"cannot read the matchers of {name}{{{matchers}}}")
    kept = [f"{k}{op}{v}" for k, op, v in found if k != label]
    return f'{name}{{{", ".join([f"{label}={json.dumps(namespace)}", *kept])}}}'


def scope(expr: str, namespace: str) -> str:
    """`expr` with every series selector limited to `namespace`: `namespace="<ns>"` added (or put in
    place of a matcher on that label), `job_namespace` for the Training Operator's counters. What
    prometheus-operator's `enforcedNamespaceLabel` does, done here so the rule is right on any
    Prometheus. Functions, keywords, grouping clauses, strings, ranges and numbers are left alone."""
    out, i = [], 0
    while i < len(expr):
        char = expr[i]
        if char == '"':
            end = _string_end(expr, i)
        elif char == "[":
            end = expr.index("]", i) + 1
        elif char.isdigit():
            end = _NUMBER.match(expr, i).end()
        elif _IDENT.match(expr, i):
            end = _IDENT.match(expr, i).end()
            name, after = expr[i:end], end
            while after < len(expr) and expr[after].isspace():
                after += 1
            nxt = expr[after] if after < len(expr) else ""
            if name in GROUPING and nxt == "(":
                end = _closing(expr, after, "(", ")")
            elif nxt != "(" and name.lower() not in PROMQL_WORDS:
                matchers = ""
                if nxt == "{":
                    close = _closing(expr, after, "{", "}")
                    matchers, end = expr[after + 1:close - 1], close
                out.append(_scoped_selector(name, matchers, namespace))
                i = end
                continue
        else:
            end = i + 1
        out.append(expr[i:end])
        i = end
    return "".join(out)


def prometheus_rule(ctx: FleetContext) -> dict:
    template, groups = _template(), rule_groups()
    for group in groups:
        for rule in group["rules"]:
            rule["expr"] = scope(rule["expr"], ctx.namespace)
    labels = {**ctx.labels, **template["metadata"].get("labels", {})}
    return {"apiVersion": template["apiVersion"], "kind": "PrometheusRule",
            "metadata": {"name": template["metadata"]["name"], "namespace": ctx.namespace, "labels": labels},
            "spec": {"groups": groups}}


# --- scraping -----------------------------------------------------------------------------------

def service_monitor(ctx: FleetContext) -> dict:
    """The monitor's /metrics through its Service (fleet/monitor.py: port `http`)."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": MONITOR, "namespace": ctx.namespace, "labels": dict(ctx.labels)},
            "spec": {"selector": {"matchLabels": dict(POD_LABELS)},
                     "namespaceSelector": {"matchNames": [ctx.namespace]},
                     "endpoints": [{"port": "http", "path": "/metrics", "interval": SCRAPE_INTERVAL}]}}


def pod_monitor(ctx: FleetContext) -> dict:
    """The serving pods' /metrics: the entry container's ModelServer on 8080 (deployment/
    inferenceservice.py HTTP_PORT; the transformer, or a predictor without one). By port number:
    Knative renames the container's port `user-port` (knative/serving pkg/apis/serving/v1
    UserPortName), Standard mode keeps `http1`. `portNumber` needs prometheus-operator >= v0.79.
    Not scraped: a collocated predictor (port 8085, undeclared, loopback under Knative) and a
    separate predictor on a gRPC hop (it declares only 8081); the alerts read the entry's
    (`component` single or transformer)."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": "flywheel-serving", "namespace": ctx.namespace, "labels": dict(ctx.labels)},
            "spec": {"selector": {"matchLabels": {ISVC_LABEL: isvc_name(ctx.model_name)}},
                     "namespaceSelector": {"matchNames": [ctx.namespace]},
                     "podMetricsEndpoints": [{"portNumber": HTTP_PORT, "path": METRICS_PATH,
                                              "interval": SCRAPE_INTERVAL}]}}


# --- the dashboard ------------------------------------------------------------------------------

def dashboard_uid(namespace: str) -> str:
    """Grafana uids are at most 40 characters: the namespace's when it fits, else a hash of it."""
    uid = f"flywheel-{namespace}"
    return uid if len(uid) <= 40 else f"flywheel-{hashlib.sha256(namespace.encode()).hexdigest()[:16]}"


def dashboard(ctx: FleetContext) -> dict:
    """The dashboard JSON for this env: its own uid and title, `namespace` and `model` preset."""
    board = json.loads(DASHBOARD_FILE.read_text())
    board["uid"] = dashboard_uid(ctx.namespace)
    board["title"] = f"Flywheel {ctx.env}: {board['title'].removeprefix('Flywheel: ')}"
    preset = {"namespace": ctx.namespace, "model": ctx.model_name}
    for variable in board["templating"]["list"]:
        if variable["name"] in preset:
            value = preset[variable["name"]]
            variable["current"] = {"selected": True, "text": value, "value": value}
    return board


def dashboard_config_map(ctx: FleetContext) -> dict:
    board = dashboard(ctx)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": DASHBOARD_CONFIG_MAP, "namespace": ctx.namespace,
                         "labels": {**ctx.labels, "grafana_dashboard": "1"}},
            "data": {f"{board['uid']}.json": json.dumps(board, indent=2) + "\n"}}


# --- alert routing ------------------------------------------------------------------------------

def alerts_url(namespace: str) -> str:
    return f"http://{MONITOR}.{namespace}.svc:{MONITOR_PORT}/alerts"


def alertmanager_config(ctx: FleetContext) -> dict:
    """Retraining alerts of this namespace to the monitor's /alerts (monitoring/service.py), which
    hands them to the guarded trigger. The operator also adds `namespace="<ns>"` to the route by
    default (alertmanagerConfigMatcherStrategy OnNamespace); the matcher is explicit here so the
    route is the same under `None`. Resolved notifications are not sent: only firing alerts retrain."""
    route = {"receiver": RETRAIN_RECEIVER,
             "matchers": [{"name": RETRAIN_LABEL, "value": RETRAIN_VALUE, "matchType": "="},
                          {"name": "namespace", "value": ctx.namespace, "matchType": "="}],
             "groupBy": ["alertname", "namespace", "model_version"],
             "groupWait": "1m", "groupInterval": "30m", "repeatInterval": "6h"}
    receiver = {"name": RETRAIN_RECEIVER,
                "webhookConfigs": [{"url": alerts_url(ctx.namespace), "sendResolved": False, "maxAlerts": 20}]}
    return {"apiVersion": "monitoring.coreos.com/v1alpha1", "kind": "AlertmanagerConfig",
            "metadata": {"name": RETRAIN_RECEIVER, "namespace": ctx.namespace, "labels": dict(ctx.labels)},
            "spec": {"route": route, "receivers": [receiver]}}


def objects(ctx: FleetContext) -> list[dict]:
    return [prometheus_rule(ctx), service_monitor(ctx), pod_monitor(ctx), dashboard_config_map(ctx),
            alertmanager_config(ctx)]


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []
