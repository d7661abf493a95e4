"""The monitor service on one cluster: ServiceAccount, KFP rights, config ConfigMap, Deployment, Service.

The pod runs `python -m monitoring.service --config FILE --host 0.0.0.0 --port 8080` (monitoring/
service.py): FILE is the env's rendered monitor config (`ctx.monitor_config`: the sink's settings
and the guarded retraining trigger's, no secrets) mounted from a ConfigMap. Serving's payload
logger (serving.payload_logging.url), the monitoring check (monitoring.sink.url + /drift) and
Alertmanager (/alerts) reach it at `http://flywheel-monitor.<ns>.svc.cluster.local:8080`.

Credentials by reference only: the object store's from Secret `flywheel-object-store` (envFrom, as
the InferenceService does), the KFP API's from a projected ServiceAccount token with audience
`pipelines.kubeflow.org` at /var/run/secrets/kubeflow/pipelines/token, the path and audience
Kubeflow's `access-ml-pipeline` PodDefault gives notebooks and pipeline pods
(kubeflow/pipelines manifests/kustomize/base/installs/multi-user/..., kfp.client.KF_PIPELINES_SA_TOKEN_PATH);
the Kubernetes API token is not mounted (the service never calls it).

One replica (see `replicas`): the sink pairs a call's request and response events in memory, and
the drift gauges live in the process that received the check's POST /drift.
"""
from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

import yaml
from kubernetes import client as k8s

import storage
from crds import hardening
from fleet.context import MONITOR, MONITOR_PORT, PIPELINE_RUNNER, FleetContext
from gateways.kube_api import serialize

FEATURE: str | None = None
SCOPE = "cluster"

NAME_LABEL = "app.kubernetes.io/name"
POD_LABELS = {NAME_LABEL: MONITOR}  # what the Deployment, Service, ServiceMonitor and policies select
CONFIG_MAP = f"{MONITOR}-config"
CONFIG_DIR, CONFIG_KEY = "/etc/flywheel/monitor", "monitor.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
KFP_TOKEN_DIR, KFP_AUDIENCE = "/var/run/secrets/kubeflow/pipelines", "pipelines.kubeflow.org"
KFP_ROLE = "flywheel-kfp-trigger"
CONFIG_HASH = "flywheel/config-sha256"  # on the pod template: a config change rolls the pods
OBJECT_STORE_SCHEMES = ("s3", "s3a", "minio", "gs", "gcs")
CPU = "1"
# The drain on SIGTERM, from monitoring/service.py: uvicorn's timeout_graceful_shutdown (30 s) for
# requests in flight, then PayloadSink.close(timeout=30): up to 30 s joining the flush thread and up
# to 30 s more retrying failed writes, then spilling unpaired halves. The preStop sleep comes first.
PRE_STOP_SECONDS = 5
DRAIN_SECONDS = 30 + 30 + 30
GRACE_SECONDS = PRE_STOP_SECONDS + DRAIN_SECONDS + 15


def replicas(ctx: FleetContext) -> int:
    """How many monitor pods: 1, whatever the env's size. Two replicas behind one Service would be
    wrong today, not merely wasteful: (1) the KServe logger sends a call's request and response as
    two CloudEvents, which the Service (and an Istio sidecar, per request) may route to different
    pods, where each half waits unpaired and expires (monitoring/sink.py pairs in memory);
    (2) the check's POST /drift sets gauges in one pod, and the other pod keeps exporting its
    previous check's values, which the `max by` drift alerts would keep firing on. Window and
    ground-truth file names are unique per process (uuid4), so two writers would not overwrite
    each other; what is missing for 2 is affinity by `ce-id` and shared drift state."""
    return 1


def _meta(ctx: FleetContext, name: str, extra: dict[str, str] | None = None) -> k8s.V1ObjectMeta:
    return k8s.V1ObjectMeta(name=name, namespace=ctx.namespace, labels={**ctx.labels, **(extra or {})})


def _config_text(ctx: FleetContext) -> str:
    return yaml.safe_dump(ctx.monitor_config, sort_keys=True)


def _object_store(ctx: FleetContext) -> bool:
    root = ctx.monitor_config.get("sink_root") or ctx.monitoring.sink.root
    return urlsplit(str(root)).scheme in OBJECT_STORE_SCHEMES


def _kfp(ctx: FleetContext) -> bool:
    return bool((ctx.monitor_config.get("kfp") or {}).get("host"))


def _env(ctx: FleetContext) -> list[k8s.V1EnvVar]:
    values = {**hardening.READ_ONLY_ROOT_ENV, "PYTHONUNBUFFERED": "1"}
    if ctx.deploy.object_store_endpoint:
        values["AWS_ENDPOINT_URL"] = ctx.deploy.object_store_endpoint
    if _kfp(ctx):
        values["KF_PIPELINES_SA_TOKEN_PATH"] = f"{KFP_TOKEN_DIR}/token"  # gateways/kfp_api.SA_TOKEN_PATH_ENV
    return [k8s.V1EnvVar(name=k, value=v) for k, v in values.items()]


def memory(ctx: FleetContext) -> str:
    """The pod's memory (request = limit): 1 GiB for the interpreter, pandas and pyarrow, plus 8x
    the sink's buffer_bytes: an event completing a waiting half is always taken, so the sink may
    hold up to twice its bound (monitoring/sink.py), and parsed events take a few times their body."""
    mib = 1024 + -(-8 * ctx.monitoring.sink.buffer_bytes // (1 << 20))
    return f"{mib}Mi"


def _probe(*, initial: int, period: int, failures: int) -> k8s.V1Probe:
    # /healthz answers 503 from the first SIGTERM (draining), so readiness drops at once; the
    # kubelet stops liveness probes on a pod being deleted (pkg/kubelet/prober/worker.go), so the
    # same endpoint can serve as liveness without killing a drain.
    return k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path="/healthz", port="http"), initial_delay_seconds=initial,
                       period_seconds=period, timeout_seconds=2, failure_threshold=failures)


def _container(ctx: FleetContext) -> k8s.V1Container:
    mounts = [hardening.scratch_mount(), k8s.V1VolumeMount(name="config", mount_path=CONFIG_DIR, read_only=True)]
    if _kfp(ctx):
        mounts.append(k8s.V1VolumeMount(name="kfp-token", mount_path=KFP_TOKEN_DIR, read_only=True))
    return k8s.V1Container(
        name="monitor", image=ctx.image, command=["python", "-m", "monitoring.service"],
        # --host: the service binds loopback unless told; the kubelet, Prometheus and the logger
        # reach it from outside the container. --root is the config's sink root.
        args=["--config", CONFIG_PATH, "--host", "0.0.0.0", "--port", str(MONITOR_PORT)],
        ports=[k8s.V1ContainerPort(name="http", container_port=MONITOR_PORT, protocol="TCP")],
        env=_env(ctx), env_from=hardening.secret_env(storage.CREDENTIALS_SECRET) if _object_store(ctx) else None,
        resources=hardening.resources(CPU, memory(ctx)),
        readiness_probe=_probe(initial=3, period=5, failures=2),
        liveness_probe=_probe(initial=20, period=10, failures=3),
        # Endpoints drop a terminating pod while the preStop sleep runs, so no new connection
        # lands on a server that has stopped listening (KEP-3960 sleep action, on since 1.30).
        lifecycle=k8s.V1Lifecycle(pre_stop=k8s.V1LifecycleHandler(sleep=k8s.V1SleepAction(seconds=PRE_STOP_SECONDS))),
        security_context=hardening.container_security(), volume_mounts=mounts)


def _volumes(ctx: FleetContext) -> list[k8s.V1Volume]:
    volumes = [hardening.scratch_volume("1Gi"),
               k8s.V1Volume(name="config", config_map=k8s.V1ConfigMapVolumeSource(name=CONFIG_MAP))]
    if _kfp(ctx):
        token = k8s.V1ServiceAccountTokenProjection(audience=KFP_AUDIENCE, expiration_seconds=7200, path="token")
        volumes.append(k8s.V1Volume(name="kfp-token", projected=k8s.V1ProjectedVolumeSource(
            sources=[k8s.V1VolumeProjection(service_account_token=token)])))
    return volumes


def _spread() -> list[k8s.V1TopologySpreadConstraint]:
    selector = k8s.V1LabelSelector(match_labels=dict(POD_LABELS))
    # pod-template-hash: during a rollout the old ReplicaSet's pods do not count (beta since 1.27)
    keys = ["pod-template-hash"]
    return [k8s.V1TopologySpreadConstraint(max_skew=1, topology_key="kubernetes.io/hostname",
                                           when_unsatisfiable="DoNotSchedule", label_selector=selector,
                                           match_label_keys=keys),
            k8s.V1TopologySpreadConstraint(max_skew=1, topology_key="topology.kubernetes.io/zone",
                                           when_unsatisfiable="ScheduleAnyway", label_selector=selector,
                                           match_label_keys=keys)]


def _deployment(ctx: FleetContext, count: int) -> k8s.V1Deployment:
    labels = {**ctx.labels, **POD_LABELS, "app.kubernetes.io/component": "monitoring"}
    digest = hashlib.sha256(_config_text(ctx).encode()).hexdigest()
    tolerations = [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
                   for t in ctx.cluster.serving_tolerations]
    pod = k8s.V1PodSpec(
        service_account_name=MONITOR, automount_service_account_token=False,
        security_context=hardening.pod_security(), containers=[_container(ctx)], volumes=_volumes(ctx),
        node_selector=dict(ctx.cluster.serving_node_selector) or None, tolerations=tolerations or None,
        topology_spread_constraints=_spread(), termination_grace_period_seconds=GRACE_SECONDS)
    # Surge, never below the serving count: the new pod is ready before the old one drains. For the
    # length of a rollout two pods take events, so a call whose request and response halves land on
    # different pods is not paired (each half is spilled to _pending/ on shutdown). Recreate would
    # instead leave no pod at all for the drain plus a start, and KServe's logger agent does not
    # retry a failed send: losing the few calls that straddle the swap is the smaller loss.
    strategy = k8s.V1DeploymentStrategy(type="RollingUpdate", rolling_update=k8s.V1RollingUpdateDeployment(
        max_surge=1, max_unavailable=0))
    return k8s.V1Deployment(
        api_version="apps/v1", kind="Deployment", metadata=_meta(ctx, MONITOR, POD_LABELS),
        spec=k8s.V1DeploymentSpec(
            replicas=count, selector=k8s.V1LabelSelector(match_labels=dict(POD_LABELS)), strategy=strategy,
            template=k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels, annotations={CONFIG_HASH: digest}),
                                           spec=pod)))


def _service(ctx: FleetContext) -> k8s.V1Service:
    # appProtocol: Istio treats the port as HTTP (its policies match paths) without name guessing.
    port = k8s.V1ServicePort(name="http", port=MONITOR_PORT, target_port="http", protocol="TCP", app_protocol="http")
    return k8s.V1Service(api_version="v1", kind="Service", metadata=_meta(ctx, MONITOR, POD_LABELS),
                         spec=k8s.V1ServiceSpec(selector=dict(POD_LABELS), ports=[port]))


def disruption_budget(ctx: FleetContext, count: int) -> k8s.V1PodDisruptionBudget | None:
    """minAvailable 1 when there are 2 or more pods; none for one pod, where minAvailable 1 would
    block every voluntary eviction (a node drain would wait forever) and maxUnavailable 1 says nothing."""
    if count < 2:
        return None
    return k8s.V1PodDisruptionBudget(
        api_version="policy/v1", kind="PodDisruptionBudget", metadata=_meta(ctx, MONITOR, POD_LABELS),
        spec=k8s.V1PodDisruptionBudgetSpec(min_available=1,
                                           selector=k8s.V1LabelSelector(match_labels=dict(POD_LABELS))))


def kfp_access(ctx: FleetContext) -> list[k8s.V1Role | k8s.V1RoleBinding]:
    """The KFP rights of whoever starts a retraining run: the pipeline runner (the monitoring
    pipeline's trigger task) and the monitor (its /alerts). Multi-user KFP authorizes each call with
    a SubjectAccessReview on pipelines.kubeflow.org (backend/src/apiserver/common/const.go,
    RbacResourceType*): experiments get/list/create (create_experiment gets or creates), pipelines
    get/list (versions are authorized as pipelines), runs get/list/create (gateways/kfp_api.py)."""
    rules = [k8s.V1PolicyRule(api_groups=["pipelines.kubeflow.org"], resources=["experiments"],
                              verbs=["get", "list", "create"]),
             k8s.V1PolicyRule(api_groups=["pipelines.kubeflow.org"], resources=["pipelines"], verbs=["get", "list"]),
             k8s.V1PolicyRule(api_groups=["pipelines.kubeflow.org"], resources=["runs"],
                              verbs=["get", "list", "create"])]
    subjects = [k8s.RbacV1Subject(kind="ServiceAccount", name=PIPELINE_RUNNER, namespace=ctx.namespace)]
    if ctx.runs("monitoring"):
        subjects.append(k8s.RbacV1Subject(kind="ServiceAccount", name=MONITOR, namespace=ctx.namespace))
    role = k8s.V1Role(api_version="rbac.authorization.k8s.io/v1", kind="Role", metadata=_meta(ctx, KFP_ROLE),
                      rules=rules)
    role_ref = k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=KFP_ROLE)
    binding = k8s.V1RoleBinding(api_version="rbac.authorization.k8s.io/v1", kind="RoleBinding",
                                metadata=_meta(ctx, KFP_ROLE), subjects=subjects, role_ref=role_ref)
    return [role, binding]


def objects(ctx: FleetContext) -> list[dict]:
    """The KFP trigger rights (every cluster: the pipeline runner needs them wherever the
    monitoring pipeline runs), and where the cluster runs monitoring the monitor itself."""
    built: list = kfp_access(ctx)
    if ctx.runs("monitoring"):
        count = replicas(ctx)
        built += [
            k8s.V1ServiceAccount(api_version="v1", kind="ServiceAccount", metadata=_meta(ctx, MONITOR, POD_LABELS),
                                 automount_service_account_token=False),
            k8s.V1ConfigMap(api_version="v1", kind="ConfigMap", metadata=_meta(ctx, CONFIG_MAP, POD_LABELS),
                            data={CONFIG_KEY: _config_text(ctx)}),
            _deployment(ctx, count), _service(ctx), disruption_budget(ctx, count)]
    return [serialize(obj) for obj in built if obj is not None]


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []
