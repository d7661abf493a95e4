"""The champion as a KServe `InferenceService` (serving.kserve.io/v1beta1): rendered from a
`ServingSpec` with the kserve SDK's models, serialized the way the Kubernetes client sends it,
and validated against the official CRD plus the rules the CRD cannot express.

Shape of what is rendered (KServe docs: "Collocate transformer and predictor", "Canary rollout",
"Autoscaling", "Inference logger"; kserve/kserve#4807 for the host-name limit):

- `spec.predictor.containers[0]` is `kserve-container`: our image running
  `python -m serving.predictor --model_dir URI --model_name NAME` (ModelServer, REST + gRPC v2).
- transformer `collocated`: a second container named exactly `transformer-container` in the
  predictor pod; it takes the client traffic on 8080 and calls the predictor over localhost
  (`--predictor_host 127.0.0.1:PORT --predictor_protocol HOP`), with
  `--enable_predictor_health_check` so the pod is ready only when both are.
  transformer `separate`: `spec.transformer` with its own `kserve-container`, calling
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
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kubernetes import client as k8s

import crds
import storage
from crds import hardening
from crds.hardening import CREDENTIAL_ENV, DNS1035
from gateways.kube_api import INFERENCE_SERVICES, serialize
from specs import ServingSpec

API_VERSION, KIND = INFERENCE_SERVICES.api_version, INFERENCE_SERVICES.kind
CRD_VERSION = "v1beta1"
PREDICTOR_CONTAINER = "kserve-container"        # KServe's name for a component's main container
TRANSFORMER_CONTAINER = "transformer-container"  # the name KServe collocates in the predictor pod

HTTP_PORT, GRPC_PORT = 8080, 8081                # ModelServer defaults; what the ingress reaches
COLLOCATED_HTTP_PORT, COLLOCATED_GRPC_PORT = 8085, 8086  # the predictor beside a collocated transformer
READY_PATH, LIVE_PATH, METRICS_PATH = "/v2/health/ready", "/v2/health/live", "/metrics"

DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
DEPLOYMENT_MODES = ("Standard", "Knative")
TAG_ROUTING = "serving.kserve.io/enable-tag-routing"
PROMETHEUS_SCRAPING = "serving.kserve.io/enable-prometheus-scraping"
KNATIVE_AUTOSCALER_CLASS = "autoscaling.knative.dev/class"
KNATIVE_HPA = "hpa.autoscaling.knative.dev"
MODEL_VERSION = "flywheel/model-version"
MODEL_URI = "flywheel/model-uri"
REGISTERED_MODEL = "flywheel/registered-model"
ENV_LABEL = "flywheel/env"
# Annotation/label prefixes this module owns on a live object (a re-render may drop such a key;
# anything else on the object belongs to someone else and is left alone).
MANAGED_PREFIXES = ("flywheel/", "app.kubernetes.io/", "serving.kserve.io/", "prometheus.io/",
                    "autoscaling.knative.dev/")

HPA_METRICS = ("cpu", "memory")           # what an HPA scales on (Standard mode; Knative's HPA class)
KPA_METRICS = ("concurrency", "rps")      # what the Knative Pod Autoscaler scales on
OBJECT_STORE_SCHEMES = ("s3", "s3a", "minio", "gs", "gcs")
# A literal secret in a value: URL user-info, or an AWS access key id.
LITERAL_SECRET = re.compile(r"://[^/\s:@]+:[^/\s@]+@|\bAKIA[0-9A-Z]{16}\b")
HOST_LABEL_MAX = 63
COMPONENTS = ("predictor", "transformer")


class InferenceServiceInvalid(ValueError):
    """The InferenceService breaks the CRD's schema or Flywheel's rules; `problems` are
    `json.path: message` lines, all of them at once."""

    def __init__(self, name: str, problems: list[str]):
        self.name, self.problems = name, list(problems)
        super().__init__(f"InferenceService {name!r} is invalid:\n" + "\n".join(f"  {p}" for p in self.problems))


@dataclass(frozen=True)
class ServedModel:
    """A registered model version as the cluster serves it: the registry's name and version, and
    the storage URI of its flywheel model directory (what `--model_dir` loads)."""

    name: str
    version: str
    uri: str


def isvc_name(model_name: str) -> str:
    """A DNS-1035 label from a registered model's name (`credit-default` stays as it is)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)
    if not name:
        raise ValueError(f"cannot make an InferenceService name from {model_name!r}")
    return name[:HOST_LABEL_MAX].rstrip("-")


def to_dict(obj) -> dict:
    """Serialize an SDK model the way the Kubernetes client sends it (camelCase, no nulls)."""
    if isinstance(obj, dict):
        return copy.deepcopy(obj)
    return serialize(obj)


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


def render(spec: ServingSpec, *, image: str, namespace: str, env: str, model: ServedModel, name: str | None = None,
           object_store_endpoint: str | None = None, extra_env: dict[str, str] | None = None,
           canary: bool = True, decision_threshold: float = 0.5):
    """The InferenceService serving `model` as `spec` says, as a `kserve.V1beta1InferenceService`.

    With `canary` (the default) and `spec.canary_percent > 0` every component carries
    `canaryTrafficPercent`: this is the object a rollout applies; the deployer removes the field to
    promote (see deployment.rollout). `canary=False` renders the steady state.
    """
    from kserve import (
        V1beta1InferenceService,
        V1beta1InferenceServiceSpec,
        V1beta1LoggerSpec,
        V1beta1PredictorSpec,
        V1beta1TransformerSpec,
    )

    name = name or isvc_name(model.name)
    if spec.payload_logging.url and spec.payload_logging.sample_rate < 1.0:
        raise ValueError("serving.payload_logging.sample_rate < 1 cannot be honoured on a cluster: KServe's logger "
                         "sends every request (it has no sampling); set 1.0 and sample in the sink")
    knative = spec.deployment_mode == "Knative"
    credentials = _needs_credentials(model.uri)
    env_vars = _env(spec, object_store_endpoint, extra_env)
    canary_percent = spec.canary_percent if canary and knative and spec.canary_percent > 0 else None
    logger = (V1beta1LoggerSpec(url=spec.payload_logging.url, mode=spec.payload_logging.mode)
              if spec.payload_logging.url else None)
    common = dict(image=image, spec=spec, env=env_vars, credentials=credentials)
    model_args = ["--model_name", model.name, "--model_dir", model.uri, "--model_version", model.version,
                  "--max_batch_rows", str(spec.max_batch_rows), "--max_body_bytes", str(spec.max_body_bytes)]
    labels_at = ["--decision_threshold", f"{decision_threshold:g}"]  # the transformer turns probabilities into labels
    def component() -> dict:  # what every component carries whatever its placement (fresh objects each)
        return dict(canary_traffic_percent=canary_percent, annotations=_pod_annotations(HTTP_PORT),
                    security_context=hardening.pod_security(knative_subset=True), volumes=_volumes(),
                    **_scaling(spec))

    if spec.transformer == "collocated":
        predictor = V1beta1PredictorSpec(containers=_collocated_containers(spec, model_args, labels_at, common),
                                         logger=logger, **component())
        transformer = None
    else:
        predictor, transformer = _separate_components(spec, name, namespace, model_args, labels_at, common)
        predictor = V1beta1PredictorSpec(containers=predictor, **component())
        transformer = V1beta1TransformerSpec(containers=transformer, logger=logger, **component())

    if not knative:
        # Surge first, never below the serving replicas: the old pods serve until the new are ready.
        strategy = k8s.V1DeploymentStrategy(type="RollingUpdate", rolling_update=k8s.V1RollingUpdateDeployment(
            max_surge="25%", max_unavailable=0))
        for component in (predictor, transformer):
            if component is not None:
                component.deployment_strategy = strategy

    # KServe sets the pods' prometheus.io/* from the scraping annotation; the components' own
    # annotations say the port and path explicitly (the entry container's ModelServer /metrics).
    annotations = {DEPLOYMENT_MODE: spec.deployment_mode, PROMETHEUS_SCRAPING: "true",
                   MODEL_VERSION: str(model.version), MODEL_URI: model.uri, REGISTERED_MODEL: model.name}
    if knative:
        annotations[TAG_ROUTING] = "true"
        if spec.scale_metric in HPA_METRICS:
            annotations[KNATIVE_AUTOSCALER_CLASS] = KNATIVE_HPA
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "flywheel",
              "app.kubernetes.io/component": "serving", "app.kubernetes.io/managed-by": "flywheel", ENV_LABEL: env}
    return V1beta1InferenceService(
        api_version=API_VERSION, kind=KIND,
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=labels, annotations=annotations),
        spec=V1beta1InferenceServiceSpec(predictor=predictor, transformer=transformer))


def render_for(settings, model: ServedModel, *, canary: bool = True):
    """`render` for one environment: `settings` is a `pipelines.config.Settings` (or anything with
    its `.serving`, `.image.ref`, `.namespace`, `.env`, `.kfp.object_store_endpoint`)."""
    kfp, evaluation = getattr(settings, "kfp", None), getattr(settings, "evaluation", None)
    return render(settings.serving, image=settings.image.ref, namespace=settings.namespace, env=settings.env,
                  model=model, object_store_endpoint=getattr(kfp, "object_store_endpoint", None), canary=canary,
                  decision_threshold=getattr(evaluation, "decision_threshold", 0.5))


def steady_state(obj: dict) -> dict:
    """`obj` without `canaryTrafficPercent`: what is left once a canary is promoted."""
    out = to_dict(obj)
    for component in COMPONENTS:
        (out.get("spec", {}).get(component) or {}).pop("canaryTrafficPercent", None)
    return out


# --- validation -------------------------------------------------------------------------------


def schema_problems(obj) -> list[str]:
    """Where `obj` breaks the official InferenceService CRD (unknown fields are errors)."""
    return crds.schema_problems(to_dict(obj), crds.INFERENCESERVICE, CRD_VERSION)


def _containers(component: dict, path: str):
    for index, container in enumerate(component.get("containers") or []):
        if isinstance(container, dict):
            yield f"{path}.containers[{index}]", container


def _int(value) -> int | None:
    """`value` when it is an integer (the schema reports anything else), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _container_problems(path: str, container: dict, pod_security: dict, *, sidecar: bool = False) -> list[str]:
    """`sidecar`: a Knative pod's container without the serving port."""
    problems = []
    if not container.get("image"):
        problems.append(f"{path}.image: required")
    resources = container.get("resources") or {}
    for kind in ("requests", "limits"):
        missing = [r for r in ("cpu", "memory") if r not in (resources.get(kind) or {})]
        if missing:
            problems.append(f"{path}.resources.{kind}: must set {' and '.join(missing)}")
    security = container.get("securityContext") or {}
    if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is not True:
        problems.append(f"{path}.securityContext.runAsNonRoot: must be true (here or in the pod's securityContext)")
    if security.get("runAsUser", pod_security.get("runAsUser")) == 0:
        problems.append(f"{path}.securityContext.runAsUser: must not be 0 (root)")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{path}.securityContext.allowPrivilegeEscalation: must be false")
    if security.get("privileged"):
        problems.append(f"{path}.securityContext.privileged: must not be true")
    if sidecar:
        for probe in ("readinessProbe", "livenessProbe"):
            if container.get(probe):
                problems.append(f"{path}.{probe}: Knative refuses probes on a container without the serving port "
                                "unless multi-container-probing is enabled (knative/serving#12615)")
    elif not container.get("readinessProbe"):
        problems.append(f"{path}.readinessProbe: required (traffic must wait for the model to load)")
    for index, var in enumerate(container.get("env") or []):
        value = var.get("value")
        if value is None:
            continue
        if CREDENTIAL_ENV.search(var.get("name", "")):
            problems.append(f"{path}.env[{index}].value: {var.get('name')} looks like a credential; use valueFrom/"
                            f"envFrom a Secret, never a literal")
        elif LITERAL_SECRET.search(str(value)):
            problems.append(f"{path}.env[{index}].value: holds a literal credential (URL user-info or access key)")
    for index, arg in enumerate([*(container.get("command") or []), *(container.get("args") or [])]):
        if LITERAL_SECRET.search(str(arg)):
            problems.append(f"{path}.args: holds a literal credential (URL user-info or access key) at [{index}]")
    return problems


def policy_problems(obj) -> list[str]:
    """Flywheel's rules the CRD cannot express, each as `json.path: message`."""
    obj = to_dict(obj)
    problems = []
    if obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
        problems.append(f"apiVersion/kind: must be {API_VERSION} {KIND}, got {obj.get('apiVersion')} {obj.get('kind')}")
    meta = obj.get("metadata") or {}
    name, namespace = meta.get("name") or "", meta.get("namespace") or ""
    annotations = meta.get("annotations") or {}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    components = [c for c in COMPONENTS if isinstance(spec.get(c), dict) and spec.get(c)]
    mode = annotations.get(DEPLOYMENT_MODE)
    knative = mode == "Knative"
    if not DNS1035.match(name):
        problems.append(f"metadata.name: {name!r} must be a DNS-1035 label (lower case, digits, '-', starting "
                        "with a letter)")
    if not namespace:
        problems.append("metadata.namespace: required")
    for component in components:
        # KServe's host names: <name>-<component>-<namespace>.<domain> (Standard) and, with tag
        # routing, latest-<name>-<component>.<namespace>.<domain>; each label at most 63.
        host = f"{name}-{component}-{namespace}"
        if len(host) > HOST_LABEL_MAX:
            problems.append(f"metadata.name: host label {host!r} is {len(host)} characters; KServe fails to reconcile "
                            f"over {HOST_LABEL_MAX} (shorten the name or namespace)")
        if knative and len(f"latest-{name}-{component}") > HOST_LABEL_MAX:
            problems.append(f"metadata.name: tag host label 'latest-{name}-{component}' exceeds {HOST_LABEL_MAX}")
    if mode not in DEPLOYMENT_MODES:
        problems.append(f"metadata.annotations.{DEPLOYMENT_MODE}: must be one of {', '.join(DEPLOYMENT_MODES)} "
                        f"(the cluster default must not decide), got {mode!r}")
    for key in (MODEL_VERSION, MODEL_URI):
        if not annotations.get(key):
            problems.append(f"metadata.annotations.{key}: required (which model this serves)")
    if annotations.get(TAG_ROUTING) == "true" and not knative:
        problems.append(f"metadata.annotations.{TAG_ROUTING}: tag routing needs Knative revisions")

    for component in components:
        part, path = spec[component], f"spec.{component}"
        if "canaryTrafficPercent" in part:
            percent = part["canaryTrafficPercent"]
            if _int(percent) is None or not 0 <= percent <= 100:
                problems.append(f"{path}.canaryTrafficPercent: must be 0-100, got {percent!r}")
            if not knative:
                problems.append(f"{path}.canaryTrafficPercent: only read in Knative mode (Standard mode has no "
                                "revisions to split traffic between)")
        low, high = _int(part.get("minReplicas")), _int(part.get("maxReplicas"))
        if low is not None and low < 0:
            problems.append(f"{path}.minReplicas: must be >= 0")
        if low == 0 and not knative:
            problems.append(f"{path}.minReplicas: 0 (scale to zero) needs Knative mode")
        if low is not None and high is not None and high < low:
            problems.append(f"{path}.maxReplicas: {high} is below minReplicas {low}")
        metric = part.get("scaleMetric")
        if metric and not knative and metric not in HPA_METRICS:
            problems.append(f"{path}.scaleMetric: Standard mode's HPA scales on {' or '.join(HPA_METRICS)}, "
                            f"not {metric!r}")
        if metric in HPA_METRICS and knative:
            if annotations.get(KNATIVE_AUTOSCALER_CLASS) != KNATIVE_HPA:
                problems.append(f"{path}.scaleMetric: {metric!r} in Knative mode needs annotation "
                                f"{KNATIVE_AUTOSCALER_CLASS}: {KNATIVE_HPA} (the Knative Pod Autoscaler does not "
                                f"scale on {metric})")
            if low == 0:
                problems.append(f"{path}.minReplicas: 0 cannot scale to zero with the HPA class")
        if _int(part.get("scaleTarget")) is not None and part["scaleTarget"] <= 0:
            problems.append(f"{path}.scaleTarget: must be > 0")
        if knative and "deploymentStrategy" in part:
            problems.append(f"{path}.deploymentStrategy: only for Standard mode (Knative rolls out revisions)")
        logger = part.get("logger")
        if logger is not None and urlsplit(logger.get("url") or "").scheme not in ("http", "https"):
            problems.append(f"{path}.logger.url: must be an http(s) URL, got {logger.get('url')!r}")
        containers = [c for c in part.get("containers") or [] if isinstance(c, dict)]
        names = [c.get("name") for c in containers]
        if not containers:
            problems.append(f"{path}.containers: a custom container named {PREDICTOR_CONTAINER!r} is required")
        elif names[0] != PREDICTOR_CONTAINER:
            problems.append(f"{path}.containers[0].name: must be {PREDICTOR_CONTAINER!r}, got {names[0]!r}")
        allowed = (PREDICTOR_CONTAINER, TRANSFORMER_CONTAINER) if component == "predictor" else (PREDICTOR_CONTAINER,)
        for index, cname in enumerate(names[1:], start=1):
            if cname not in allowed or names.count(cname) > 1:
                problems.append(f"{path}.containers[{index}].name: {cname!r} is not allowed here (only "
                                f"{' and '.join(repr(a) for a in allowed)}, once each)")
        if component == "predictor" and TRANSFORMER_CONTAINER in names and spec.get("transformer"):
            problems.append(f"{path}.containers: a collocated {TRANSFORMER_CONTAINER!r} and spec.transformer both "
                            "transform; keep one")
        if knative and sum(1 for c in containers if c.get("ports")) > 1:
            problems.append(f"{path}.containers: Knative serves one container port per pod; only one container may "
                            "declare ports")
        if TRANSFORMER_CONTAINER in names:
            transformer = containers[names.index(TRANSFORMER_CONTAINER)]
            if "--enable_predictor_health_check" not in (transformer.get("args") or []):
                problems.append(f"{path}.containers[{names.index(TRANSFORMER_CONTAINER)}].args: a collocated "
                                "transformer needs --enable_predictor_health_check (else the pod is ready while "
                                "the predictor is not)")
        pod_security = part.get("securityContext") or {}
        for cpath, container in _containers(part, path):
            sidecar = knative and len(containers) > 1 and not container.get("ports")
            problems += _container_problems(cpath, container, pod_security, sidecar=sidecar)
    return problems


def inferenceservice_problems(obj) -> list[str]:
    """The CRD's complaints, then ours."""
    return schema_problems(obj) + policy_problems(obj)


def validate_inferenceservice(obj) -> dict:
    """Raise InferenceServiceInvalid listing every problem with its JSON path; return the dict."""
    body = to_dict(obj)
    problems = inferenceservice_problems(body)
    if problems:
        raise InferenceServiceInvalid((body.get("metadata") or {}).get("name", "?"), problems)
    return body
