"""The champion as a KServe `InferenceService` (serving.kserve.io/v1beta1): rendered from a
`ServingSpec` with the kserve SDK's models, serialized the way the Kubernetes client sends it,
and validated against the official CRD plus the rules the CRD cannot express.

Shape of what is rendered (KServe docs: "Collocate transformer and predictor", "Canary rollout",
"Autoscaling", "Inference logger"; kserve/kserve#4807 for the host-name limit):

- `spec.predictor.containers[0]` is `kserve-container`: our image running
  `python -m serving.predictor --model_dir URI --model_name NAME` (ModelServer, REST + gRPC v2),
  or, with topology `single`, `python -m serving.single` (raw records in, labels out, the forward
  pass in the same process) and no transformer at all: the predictor takes the client traffic.
- topology `collocated`: a second container named exactly `transformer-container` in the
  predictor pod; it takes the client traffic on 8080 and calls the predictor over localhost
  (`--predictor_host 127.0.0.1:PORT --predictor_protocol HOP`), with
  `--enable_predictor_health_check` so the pod is ready only when both are.
  topology `separate`: `spec.transformer` with its own `kserve-container`, calling
  `<name>-predictor.<namespace>` (port 80, the predictor's one declared port).
- `serving.kserve.io/deploymentMode`: Standard (Deployment + HPA, rolling update) or Knative
  (revisions; `canaryTrafficPercent` and `serving.kserve.io/enable-tag-routing` for the
  `latest-`/`prev-` URLs a smoke test needs).
- min/maxReplicas, scaleMetric/scaleTarget; Knative scaling on cpu or memory goes through the
  HPA class (`autoscaling.knative.dev/class`), since the Knative Pod Autoscaler does not do CPU.
- `logger` (payload events) on the component that receives client traffic.
- Prometheus scraping annotations, our labels, and the model version/URI as annotations.
- Every container: requests = limits, non-root, read-only root filesystem with a /tmp emptyDir,
  readiness/liveness on the Open Inference Protocol v2 health endpoints (except a Knative pod's
  container without the serving port, which Knative refuses probes on: knative/serving#12615),
  the object-store credentials by secret reference only, no service-account token.

Split in three: this module renders; deployment/isvc_policy.py checks (CRD + our rules);
deployment/isvc_api.py holds what both share. Every public name stays importable from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from kubernetes import client as k8s

import storage
from crds import hardening
from deployment.isvc_api import (  # noqa: F401  (re-exported: callers import these names from here)
    API_VERSION,
    COLLOCATED_GRPC_PORT,
    COLLOCATED_HTTP_PORT,
    COMPONENTS,
    CRD_VERSION,
    DEPLOYMENT_MODE,
    DEPLOYMENT_MODES,
    ENV_LABEL,
    GRPC_PORT,
    HOST_LABEL_MAX,
    HPA_METRICS,
    HTTP_PORT,
    KIND,
    KNATIVE_AUTOSCALER_CLASS,
    KNATIVE_HPA,
    KPA_METRICS,
    LITERAL_SECRET,
    LIVE_PATH,
    MANAGED_PREFIXES,
    METRICS_PATH,
    MODEL_URI,
    MODEL_VERSION,
    OBJECT_STORE_SCHEMES,
    PREDICTOR_CONTAINER,
    PROMETHEUS_SCRAPING,
    READY_PATH,
    REGISTERED_MODEL,
    TAG_ROUTING,
    TRANSFORMER_CONTAINER,
    InferenceServiceInvalid,
    ServedModel,
    isvc_name,
    to_dict,
)
from deployment.isvc_policy import (  # noqa: F401  (re-exported)
    inferenceservice_problems,
    policy_problems,
    schema_problems,
    validate_inferenceservice,
)
from monitoring.events import TRACE_HEADER
from specs import ServingSpec

# --- rendering --------------------------------------------------------------------------------


def _env(spec: ServingSpec, object_store_endpoint: str | None, extra: dict[str, str] | None) -> list[k8s.V1EnvVar]:
    hardening.check_plain_env(extra, storage.CREDENTIALS_SECRET)
    threads = str(max(1, int(float(spec.cpu.removesuffix("m")) / (1000 if spec.cpu.endswith("m") else 1))))
    # Threads are set through the environment: ModelServer worker processes lose a
    # torch.set_num_threads made in load().
    ours = {**hardening.READ_ONLY_ROOT_ENV, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}
    if object_store_endpoint:
        ours["AWS_ENDPOINT_URL"] = object_store_endpoint
    return [k8s.V1EnvVar(name=k, value=v) for k, v in {**ours, **(extra or {})}.items()]


def _needs_credentials(uri: str) -> bool:
    return urlsplit(uri).scheme in OBJECT_STORE_SCHEMES


def _probe(path: str, port: int, *, initial: int, period: int, failures: int) -> k8s.V1Probe:
    return k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path=path, port=port), initial_delay_seconds=initial,
                       period_seconds=period, timeout_seconds=2, failure_threshold=failures)


def _container(name: str, module: str, args: list[str], *, image: str, spec: ServingSpec, env: list,
               http_port: int, ports: list[k8s.V1ContainerPort] | None, credentials: bool,
               probes: bool = True) -> k8s.V1Container:
    return k8s.V1Container(
        name=name, image=image, command=["python", "-m", module], args=args, env=env,
        env_from=hardening.secret_env(storage.CREDENTIALS_SECRET) if credentials else None,
        ports=ports,
        resources=hardening.resources(spec.cpu, spec.memory),
        readiness_probe=_probe(READY_PATH, http_port, initial=2, period=5, failures=3) if probes else None,
        liveness_probe=_probe(LIVE_PATH, http_port, initial=30, period=10, failures=3) if probes else None,
        security_context=hardening.container_security(),
        volume_mounts=[hardening.scratch_mount()])


def _volumes() -> list[k8s.V1Volume]:
    return [hardening.scratch_volume("1Gi")]


def _scaling(spec: ServingSpec) -> dict[str, Any]:
    """Autoscaling, plus what every component's pod gets: no API token (the servers never call
    the Kubernetes API)."""
    return {"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
            "scale_metric": spec.scale_metric, "scale_target": spec.scale_target,
            "automount_service_account_token": False}


def _pod_annotations(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": METRICS_PATH}


# The servers bind loopback unless told (serving/server.py); in a pod the kubelet's probes and the
# queue-proxy come from outside the container, so the args say it rather than trust the image's env.
REACHABLE = ["--host", "0.0.0.0"]


def _collocated_containers(spec: ServingSpec, model_args: list[str], labels_at: list[str], common: dict) -> list:
    """Predictor and transformer in one pod. Knative serves exactly one container port per pod: the
    transformer's. The predictor listens on its own ports, reachable over localhost only. Knative
    also refuses probes on a container without the port unless the cluster enables
    multi-container-probing (knative/serving#12615): there the transformer's readiness covers the
    predictor's (--enable_predictor_health_check); a Deployment (Standard) probes both."""
    knative = spec.deployment_mode == "Knative"
    predictor_port = COLLOCATED_GRPC_PORT if spec.hop_protocol == "grpc-v2" else COLLOCATED_HTTP_PORT
    predictor = _container(
        PREDICTOR_CONTAINER, "serving.predictor",
        # Under Knative nothing outside the pod reaches the collocated predictor: loopback only.
        [*model_args, "--host", "127.0.0.1" if knative else "0.0.0.0",
         "--http_port", str(COLLOCATED_HTTP_PORT), "--grpc_port", str(COLLOCATED_GRPC_PORT)],
        http_port=COLLOCATED_HTTP_PORT, ports=None, probes=not knative, **common)
    transformer = _container(
        TRANSFORMER_CONTAINER, "serving.transformer",
        [*model_args, "--predictor_host", f"127.0.0.1:{predictor_port}", "--predictor_protocol", spec.hop_protocol,
         "--enable_predictor_health_check", *labels_at, *REACHABLE, "--http_port", str(HTTP_PORT),
         "--grpc_port", str(GRPC_PORT)],
        http_port=HTTP_PORT, ports=[k8s.V1ContainerPort(name="http1", container_port=HTTP_PORT, protocol="TCP")],
        **common)
    return [predictor, transformer]


def _single_container(model_args: list[str], labels_at: list[str], common: dict) -> list:
    """The one-process server as the predictor's only container: it takes the client traffic on
    8080 (REST) like a transformer would, and answers gRPC v2 on 8081 inside the pod."""
    return [_container(PREDICTOR_CONTAINER, "serving.single",
                       [*model_args, *labels_at, *REACHABLE, "--http_port", str(HTTP_PORT), "--grpc_port",
                        str(GRPC_PORT)],
                       http_port=HTTP_PORT,
                       ports=[k8s.V1ContainerPort(name="http1", container_port=HTTP_PORT, protocol="TCP")], **common)]


def _separate_components(spec: ServingSpec, name: str, namespace: str, model_args: list[str], labels_at: list[str],
                         common: dict) -> tuple[list, list]:
    """(predictor containers, transformer containers) of a transformer that is its own component.
    It reaches the predictor through its Service (port 80 -> the one declared port): h2c for gRPC
    v2, http1 for REST."""
    hop = spec.hop_protocol
    port = (k8s.V1ContainerPort(name="h2c", container_port=GRPC_PORT, protocol="TCP") if hop == "grpc-v2"
            else k8s.V1ContainerPort(name="http1", container_port=HTTP_PORT, protocol="TCP"))
    predictor = _container(PREDICTOR_CONTAINER, "serving.predictor",
                           [*model_args, *REACHABLE, "--http_port", str(HTTP_PORT), "--grpc_port", str(GRPC_PORT)],
                           http_port=HTTP_PORT, ports=[port], **common)
    predictor_host = f"{name}-predictor.{namespace}" + (":80" if hop == "grpc-v2" else "")
    transformer = _container(PREDICTOR_CONTAINER, "serving.transformer",
                             [*model_args, "--predictor_host", predictor_host, "--predictor_protocol", hop,
                              *labels_at, *REACHABLE, "--http_port", str(HTTP_PORT), "--grpc_port", str(GRPC_PORT)],
                             http_port=HTTP_PORT,
                             ports=[k8s.V1ContainerPort(name="http1", container_port=HTTP_PORT, protocol="TCP")],
                             **common)
    return [predictor], [transformer]


@dataclass(frozen=True)
class Placement:
    """Where a cluster puts the serving pods (the GitOps tree's per-cluster InferenceService,
    fleet/serving.py); `flywheel deploy` renders without one. `min_replicas` overrides the env's;
    `spread` adds topology spread over nodes and zones for each component's pods."""

    service_account: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[k8s.V1Toleration, ...] = ()
    min_replicas: int | None = None
    spread: bool = False


# The component fields a Placement sets: the cluster's (GitOps tree), not the deploy step's, so a
# deploy's merge patch must not remove them (deployment/rollout.py patch_body).
PLACEMENT_FIELDS = ("serviceAccountName", "nodeSelector", "tolerations", "topologySpreadConstraints")
# KServe labels every predictor and transformer pod with the InferenceService's name and the
# component (pkg/constants/constants.go: InferenceServicePodLabelKey, KServiceComponentLabel).
ISVC_POD_LABEL, COMPONENT_POD_LABEL = "serving.kserve.io/inferenceservice", "component"
SPREAD_KEYS = (("kubernetes.io/hostname", "DoNotSchedule"), ("topology.kubernetes.io/zone", "ScheduleAnyway"))


def _spread(name: str, component: str) -> list[k8s.V1TopologySpreadConstraint]:
    """One replica per node where possible, and across zones where the cluster has several. Per
    rollout (`pod-template-hash`): the old ReplicaSet's pods do not count against the new one's."""
    selector = k8s.V1LabelSelector(match_labels={ISVC_POD_LABEL: name, COMPONENT_POD_LABEL: component})
    return [k8s.V1TopologySpreadConstraint(max_skew=1, topology_key=key, when_unsatisfiable=when,
                                           label_selector=selector, match_label_keys=["pod-template-hash"])
            for key, when in SPREAD_KEYS]


def _placed(component: dict, placement: Placement | None, name: str, part: str) -> dict:
    """`component`'s fields plus the cluster's placement (none: unchanged)."""
    if placement is None:
        return component
    if placement.min_replicas is not None:
        component["min_replicas"] = placement.min_replicas
        component["max_replicas"] = max(component["max_replicas"], placement.min_replicas)
    extra = {"service_account_name": placement.service_account, "node_selector": placement.node_selector or None,
             "tolerations": list(placement.tolerations) or None,
             "topology_spread_constraints": _spread(name, part) if placement.spread else None}
    return {**component, **{k: v for k, v in extra.items() if v is not None}}


def _logger(spec: ServingSpec):
    from kserve import V1beta1LoggerSpec

    if spec.payload_logging.url and spec.payload_logging.sample_rate < 1.0:
        raise ValueError("serving.payload_logging.sample_rate < 1 cannot be honoured on a cluster: KServe's logger "
                         "sends every request (it has no sampling); set 1.0 and sample in the sink")
    # The agent forwards x-request-id into each event (`metadata`), which Envoy keeps on a mirrored
    # copy: the sink's rows of a champion and its shadow pair on it (monitoring/shadow.py), where
    # each pod's agent gives the events their own ce-id (kserve pkg/logger/handler.go getOrCreateID).
    return (V1beta1LoggerSpec(url=spec.payload_logging.url, mode=spec.payload_logging.mode,
                              metadata_headers=[TRACE_HEADER])
            if spec.payload_logging.url else None)


def _components(spec: ServingSpec, name: str, namespace: str, model: ServedModel, common: dict, component,
                decision_threshold: float):
    """(predictor, transformer or None) for the spec's topology; `component(part)` gives the fields
    every component carries."""
    from kserve import V1beta1PredictorSpec, V1beta1TransformerSpec

    logger = _logger(spec)
    model_args = ["--model_name", model.name, "--model_dir", model.uri, "--model_version", model.version,
                  "--max_batch_rows", str(spec.max_batch_rows), "--max_body_bytes", str(spec.max_body_bytes)]
    labels_at = ["--decision_threshold", f"{decision_threshold:g}"]  # the transformer turns probabilities into labels
    if spec.topology in ("single", "collocated"):
        containers = (_single_container(model_args, labels_at, common) if spec.topology == "single"
                      else _collocated_containers(spec, model_args, labels_at, common))
        return V1beta1PredictorSpec(containers=containers, logger=logger, **component("predictor")), None
    predictor, transformer = _separate_components(spec, name, namespace, model_args, labels_at, common)
    return (V1beta1PredictorSpec(containers=predictor, **component("predictor")),
            V1beta1TransformerSpec(containers=transformer, logger=logger, **component("transformer")))


def _annotations(spec: ServingSpec, model: ServedModel) -> dict[str, str]:
    """KServe sets the pods' prometheus.io/* from the scraping annotation; the components' own
    annotations say the port and path explicitly (the entry container's ModelServer /metrics)."""
    annotations = {DEPLOYMENT_MODE: spec.deployment_mode, PROMETHEUS_SCRAPING: "true",
                   MODEL_VERSION: str(model.version), MODEL_URI: model.uri, REGISTERED_MODEL: model.name}
    if spec.deployment_mode == "Knative":
        annotations[TAG_ROUTING] = "true"
        if spec.scale_metric in HPA_METRICS:
            annotations[KNATIVE_AUTOSCALER_CLASS] = KNATIVE_HPA
    return annotations


def render(spec: ServingSpec, *, image: str, namespace: str, env: str, model: ServedModel, name: str | None = None,
           object_store_endpoint: str | None = None, extra_env: dict[str, str] | None = None,
           canary: bool = True, decision_threshold: float = 0.5, placement: Placement | None = None):
    """The InferenceService serving `model` as `spec` says, as a `kserve.V1beta1InferenceService`.

    With `canary` (the default) and `spec.canary_percent > 0` every component carries
    `canaryTrafficPercent`: this is the object a rollout applies; the deployer removes the field to
    promote (see deployment.rollout). `canary=False` renders the steady state. `placement`: the
    cluster's service account, node selector, tolerations, replicas and spread (fleet/serving.py).
    """
    from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec

    name = name or isvc_name(model.name)
    knative = spec.deployment_mode == "Knative"
    canary_percent = spec.canary_percent if canary and knative and spec.canary_percent > 0 else None
    common = dict(image=image, spec=spec, env=_env(spec, object_store_endpoint, extra_env),
                  credentials=_needs_credentials(model.uri))

    def component(part: str) -> dict:  # what every component carries whatever its placement (fresh objects each)
        return _placed(dict(canary_traffic_percent=canary_percent, annotations=_pod_annotations(HTTP_PORT),
                            security_context=hardening.pod_security(knative_subset=True), volumes=_volumes(),
                            **_scaling(spec)), placement, name, part)

    predictor, transformer = _components(spec, name, namespace, model, common, component, decision_threshold)
    if not knative:
        # Surge first, never below the serving replicas: the old pods serve until the new are ready.
        strategy = k8s.V1DeploymentStrategy(type="RollingUpdate", rolling_update=k8s.V1RollingUpdateDeployment(
            max_surge="25%", max_unavailable=0))
        for part in (predictor, transformer):
            if part is not None:
                part.deployment_strategy = strategy
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "flywheel",
              "app.kubernetes.io/component": "serving", "app.kubernetes.io/managed-by": "flywheel", ENV_LABEL: env}
    return V1beta1InferenceService(
        api_version=API_VERSION, kind=KIND,
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=labels,
                                  annotations=_annotations(spec, model)),
        spec=V1beta1InferenceServiceSpec(predictor=predictor, transformer=transformer))


def render_for(settings, model: ServedModel, *, canary: bool = True, name: str | None = None):
    """`render` for one environment: `settings` is a `pipelines.config.Settings` (or anything with
    its `.serving`, `.image.ref`, `.namespace`, `.env`, `.kfp.object_store_endpoint`). `name`: the
    InferenceService's, when not the model's (a shadow's challenger, fleet/shadow.py)."""
    kfp, evaluation = getattr(settings, "kfp", None), getattr(settings, "evaluation", None)
    return render(settings.serving, image=settings.image.ref, namespace=settings.namespace, env=settings.env,
                  model=model, name=name, object_store_endpoint=getattr(kfp, "object_store_endpoint", None),
                  canary=canary, decision_threshold=getattr(evaluation, "decision_threshold", 0.5))


def steady_state(obj: dict) -> dict:
    """`obj` without `canaryTrafficPercent`: what is left once a canary is promoted."""
    out = to_dict(obj)
    for component in COMPONENTS:
        (out.get("spec", {}).get(component) or {}).pop("canaryTrafficPercent", None)
    return out
