"""fleet/monitor.py: the monitor service on every cluster that runs monitoring. The objects pass the
Kubernetes schemas strictly; the pod is hardened, placed and drained as the config and the service
need; the Service is where serving's logger and the check send; the rendered config starts the
real service (monitoring/service.py) as the Deployment's args say."""
import dataclasses
import inspect
import json
import subprocess
import sys
import urllib.request

import pytest
import yaml

from fleet import monitor
from fleet.context import MONITOR, MONITOR_PORT, PIPELINE_RUNNER
from monitoring.sink import PayloadSink
from tests.fleet.conftest import contexts
from tests.support import ROOT, free_port, wait_for_url

K8S_VERSIONS = ("1.31.0", "1.37.0")  # as tests/pipelines/test_manifests.py


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects}


def pod_of(objects: list[dict]) -> dict:
    return by_kind(objects)["Deployment"]["spec"]["template"]["spec"]


def test_the_monitor_runs_on_every_cluster_that_runs_monitoring(fleet_ctx):
    objects = monitor.objects(fleet_ctx)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert kinds >= {("ServiceAccount", MONITOR), ("ConfigMap", monitor.CONFIG_MAP), ("Deployment", MONITOR),
                     ("Service", MONITOR), ("Role", monitor.KFP_ROLE), ("RoleBinding", monitor.KFP_ROLE)}
    for obj in objects:
        assert obj["metadata"]["namespace"] == fleet_ctx.namespace, obj["kind"]
        assert fleet_ctx.labels.items() <= obj["metadata"]["labels"].items(), obj["kind"]
    assert monitor.platform_objects(fleet_ctx) == []


def test_every_object_validates_strictly(fleet_ctx):
    import kubernetes_validate.utils as kv

    errors = []
    for obj in monitor.objects(fleet_ctx):
        for version in K8S_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except (kv.ValidationError, kv.SchemaNotFoundError) as err:
                errors.append(f"{version} {obj['kind']}/{obj['metadata']['name']}: {getattr(err, 'message', err)}")
    assert errors == []


def test_a_cluster_without_monitoring_gets_only_the_pipeline_runners_kfp_rights():
    ctx = contexts("prod")[0]
    serving_only = dataclasses.replace(ctx, cluster=ctx.cluster.model_copy(update={"runs": ["training", "serving"]}))
    objects = monitor.objects(serving_only)
    assert sorted(o["kind"] for o in objects) == ["Role", "RoleBinding"]
    assert [s["name"] for s in by_kind(objects)["RoleBinding"]["subjects"]] == [PIPELINE_RUNNER]


def test_the_monitor_and_the_pipeline_runner_may_start_kfp_runs(fleet_ctx):
    objects = by_kind(monitor.objects(fleet_ctx))
    binding, role = objects["RoleBinding"], objects["Role"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == {
        (PIPELINE_RUNNER, fleet_ctx.namespace), (MONITOR, fleet_ctx.namespace)}
    verbs = {(r["resources"][0], v) for r in role["rules"] for v in r["verbs"]}
    assert {("runs", "create"), ("runs", "list"), ("experiments", "create"), ("pipelines", "list")} <= verbs
    assert objects["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == MONITOR


def test_the_pod_is_restricted_with_a_read_only_root_and_guaranteed_resources(fleet_ctx):
    pod = pod_of(monitor.objects(fleet_ctx))
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"] and security["seccompProfile"]["type"] == "RuntimeDefault"
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert pod["automountServiceAccountToken"] is False  # only the KFP-audience token is mounted


def test_memory_covers_twice_the_sinks_byte_bound(fleet_ctx):
    limit = pod_of(monitor.objects(fleet_ctx))["containers"][0]["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert int(limit[:-2]) << 20 >= 2 * fleet_ctx.monitoring.sink.buffer_bytes + (1 << 30)


def test_probes_credentials_and_kfp_token(fleet_ctx):
    pod = pod_of(monitor.objects(fleet_ctx))
    (container,) = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    assert container["ports"] == [{"name": "http", "containerPort": MONITOR_PORT, "protocol": "TCP"}]
    assert container["envFrom"] == [{"secretRef": {"name": "flywheel-object-store"}}]  # s3 sink root
    assert all("value" in e and "KEY" not in e["name"] and "SECRET" not in e["name"] for e in container["env"])
    (token,) = [v for v in pod["volumes"] if v["name"] == "kfp-token"]
    projection = token["projected"]["sources"][0]["serviceAccountToken"]
    assert projection["audience"] == "pipelines.kubeflow.org" and projection["path"] == "token"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KF_PIPELINES_SA_TOKEN_PATH"] == "/var/run/secrets/kubeflow/pipelines/token"


def test_placement_follows_the_cluster(fleet_ctx):
    pod = pod_of(monitor.objects(fleet_ctx))
    assert pod.get("nodeSelector", {}) == fleet_ctx.cluster.serving_node_selector
    assert pod.get("tolerations", []) == [t.model_dump(exclude_none=True)
                                          for t in fleet_ctx.cluster.serving_tolerations]
    assert not {t.key for t in fleet_ctx.cluster.tolerations} & {t["key"] for t in pod.get("tolerations", [])}
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert spread["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["kubernetes.io/hostname"]["labelSelector"]["matchLabels"] == monitor.POD_LABELS


def test_the_grace_period_covers_the_sinks_drain():
    # monitoring/service.py: uvicorn's graceful shutdown, then PayloadSink.close(timeout): a join and retries
    from monitoring import service

    assert "timeout_graceful_shutdown=30" in inspect.getsource(service.serve)
    close_timeout = inspect.signature(PayloadSink.close).parameters["timeout"].default
    assert 30 + 2 * close_timeout <= monitor.DRAIN_SECONDS
    pod = pod_of(monitor.objects(contexts("prod")[0]))
    assert pod["terminationGracePeriodSeconds"] > monitor.PRE_STOP_SECONDS + monitor.DRAIN_SECONDS
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": monitor.PRE_STOP_SECONDS}}


def test_one_replica_and_no_disruption_budget_for_it(fleet_ctx):
    objects = by_kind(monitor.objects(fleet_ctx))
    assert objects["Deployment"]["spec"]["replicas"] == monitor.replicas(fleet_ctx) == 1
    assert "PodDisruptionBudget" not in objects
    strategy = objects["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 1, "maxUnavailable": 0}


def test_two_replicas_would_get_a_budget_of_one_available():
    from gateways.kube_api import serialize

    ctx = contexts("prod")[0]
    budget = serialize(monitor.disruption_budget(ctx, 2))
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": monitor.POD_LABELS}}
    assert monitor.disruption_budget(ctx, 1) is None


def test_serving_and_the_check_send_to_the_service(fleet_ctx):
    service = by_kind(monitor.objects(fleet_ctx))["Service"]
    (port,) = service["spec"]["ports"]
    base = f"http://{service['metadata']['name']}.{fleet_ctx.namespace}.svc.cluster.local:{port['port']}"
    assert fleet_ctx.serving.payload_logging.url == f"{base}/events"
    assert fleet_ctx.monitoring.sink.url == base
    assert service["spec"]["selector"] == monitor.POD_LABELS
    pod_labels = by_kind(monitor.objects(fleet_ctx))["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert monitor.POD_LABELS.items() <= pod_labels.items()


def test_a_changed_config_rolls_the_pods():
    ctx = contexts("prod")[0]
    other = dataclasses.replace(ctx, monitor_config={**ctx.monitor_config, "env": "changed"})
    hashes = [by_kind(monitor.objects(c))["Deployment"]["spec"]["template"]["metadata"]["annotations"]
              for c in (ctx, other)]
    assert hashes[0][monitor.CONFIG_HASH] != hashes[1][monitor.CONFIG_HASH]


def test_the_rendered_config_starts_the_service_as_the_deployment_says(tmp_path):
    """The ConfigMap's file, mounted where the args point, read by the real service; the bind
    address is the args' (0.0.0.0) made loopback for the test, the sink root local (no object store here)."""
    ctx = contexts("prod")[0]
    objects = by_kind(monitor.objects(ctx))
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    args = container["args"]
    config_path = args[args.index("--config") + 1]
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == str(MONITOR_PORT)
    assert config_path.startswith(mount["mountPath"] + "/")
    (key,) = objects["ConfigMap"]["data"]
    assert config_path == f"{mount['mountPath']}/{key}"
    text = objects["ConfigMap"]["data"][key]
    assert yaml.safe_load(text) == ctx.monitor_config

    config = tmp_path / key
    config.write_text(text)
    port = free_port()
    local = [a if a != config_path else str(config) for a in args]
    local[local.index("--host") + 1], local[local.index("--port") + 1] = "127.0.0.1", str(port)
    log = tmp_path / "monitor.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "monitoring.service", *local, "--root",
                                    str(tmp_path / "windows")], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_url(f"http://127.0.0.1:{port}/healthz", process, timeout=60, what="monitor",
                     tail=lambda: log.read_text()[-3000:])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert json.loads(response.read())["status"] == "ok"
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]


def test_a_config_without_an_object_store_mounts_no_credentials():
    ctx = contexts("dev")[0]
    local = dataclasses.replace(ctx, monitor_config={**ctx.monitor_config, "sink_root": "/data/monitoring"})
    (container,) = pod_of(monitor.objects(local))["containers"]
    assert "envFrom" not in container


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_the_pods_carry_the_label_the_policies_select(env):
    for ctx in contexts(env):
        labels = by_kind(monitor.objects(ctx))["Deployment"]["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "flywheel-monitor"
