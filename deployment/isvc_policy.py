"""The InferenceService held to the official CRD (crds/) and to Flywheel's rules the CRD cannot
express: names that fit KServe's host names, an explicit deployment mode, autoscaling that the
mode can honour, KServe's container names, and every container hardened (non-root, no privilege
escalation, requests and limits, a readiness probe, no literal credential).

Each check returns `json.path: message` lines; `validate_inferenceservice` raises them all at once.
"""
from __future__ import annotations

from urllib.parse import urlsplit

import crds
from crds.hardening import CREDENTIAL_ENV, DNS1035
from deployment.isvc_api import (
    API_VERSION,
    COMPONENTS,
    CRD_VERSION,
    DEPLOYMENT_MODE,
    DEPLOYMENT_MODES,
    HOST_LABEL_MAX,
    HPA_METRICS,
    KIND,
    KNATIVE_AUTOSCALER_CLASS,
    KNATIVE_HPA,
    LITERAL_SECRET,
    MODEL_URI,
    MODEL_VERSION,
    PREDICTOR_CONTAINER,
    TAG_ROUTING,
    TRANSFORMER_CONTAINER,
    InferenceServiceInvalid,
    to_dict,
)


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


def _security_problems(path: str, container: dict, pod_security: dict) -> list[str]:
    """Requests and limits, non-root, no privilege escalation, not privileged."""
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
    return problems


def _probe_problems(path: str, container: dict, sidecar: bool) -> list[str]:
    if sidecar:
        return [f"{path}.{probe}: Knative refuses probes on a container without the serving port unless "
                "multi-container-probing is enabled (knative/serving#12615)"
                for probe in ("readinessProbe", "livenessProbe") if container.get(probe)]
    if not container.get("readinessProbe"):
        return [f"{path}.readinessProbe: required (traffic must wait for the model to load)"]
    return []


def _credential_problems(path: str, container: dict) -> list[str]:
    problems = []
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


def _container_problems(path: str, container: dict, pod_security: dict, *, sidecar: bool = False) -> list[str]:
    """`sidecar`: a Knative pod's container without the serving port."""
    return (_security_problems(path, container, pod_security) + _probe_problems(path, container, sidecar)
            + _credential_problems(path, container))


def _metadata_problems(obj: dict, components: list[str], knative: bool) -> list[str]:
    """apiVersion/kind, a name that fits KServe's host names, the namespace, the annotations."""
    problems = []
    if obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
        problems.append(f"apiVersion/kind: must be {API_VERSION} {KIND}, got {obj.get('apiVersion')} {obj.get('kind')}")
    meta = obj.get("metadata") or {}
    name, namespace = meta.get("name") or "", meta.get("namespace") or ""
    annotations = meta.get("annotations") or {}
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
    mode = annotations.get(DEPLOYMENT_MODE)
    if mode not in DEPLOYMENT_MODES:
        problems.append(f"metadata.annotations.{DEPLOYMENT_MODE}: must be one of {', '.join(DEPLOYMENT_MODES)} "
                        f"(the cluster default must not decide), got {mode!r}")
    for key in (MODEL_VERSION, MODEL_URI):
        if not annotations.get(key):
            problems.append(f"metadata.annotations.{key}: required (which model this serves)")
    if annotations.get(TAG_ROUTING) == "true" and not knative:
        problems.append(f"metadata.annotations.{TAG_ROUTING}: tag routing needs Knative revisions")
    return problems


def _scaling_problems(part: dict, path: str, annotations: dict, knative: bool) -> list[str]:
    """Canary, replicas and the scale metric, as the deployment mode can honour them."""
    problems = []
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
    return problems


def _layout_problems(component: str, part: dict, path: str, spec: dict, knative: bool) -> list[str]:
    """KServe's container names, one transformer, one declared port under Knative."""
    problems = []
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
    return problems


SINGLE_MODULE = "serving.single"  # the one-process server (raw records in, the forward pass in process)


def _topology_problems(spec: dict) -> list[str]:
    """The one-process server takes raw records: nothing may stand in front of it (a transformer
    would send it tensors), and it is the predictor's only container."""
    predictor = spec.get("predictor") if isinstance(spec.get("predictor"), dict) else {}
    containers = [c for c in predictor.get("containers") or [] if isinstance(c, dict)]
    single = [i for i, c in enumerate(containers) if SINGLE_MODULE in (c.get("command") or [])]
    if not single:
        return []
    path = f"spec.predictor.containers[{single[0]}]"
    problems = []
    if spec.get("transformer"):
        problems.append(f"{path}.command: {SINGLE_MODULE} answers raw records itself; spec.transformer in front "
                        "of it would send it tensors (topology single has no transformer)")
    if len(containers) > 1:
        problems.append(f"spec.predictor.containers: {SINGLE_MODULE} is the predictor's only container "
                        f"(topology single); found {[c.get('name') for c in containers]}")
    return problems


def _component_problems(component: str, part: dict, spec: dict, annotations: dict, knative: bool) -> list[str]:
    path = f"spec.{component}"
    problems = _scaling_problems(part, path, annotations, knative) + _layout_problems(component, part, path, spec,
                                                                                      knative)
    containers = [c for c in part.get("containers") or [] if isinstance(c, dict)]
    pod_security = part.get("securityContext") or {}
    for cpath, container in _containers(part, path):
        sidecar = knative and len(containers) > 1 and not container.get("ports")
        problems += _container_problems(cpath, container, pod_security, sidecar=sidecar)
    return problems


def policy_problems(obj) -> list[str]:
    """Flywheel's rules the CRD cannot express, each as `json.path: message`."""
    obj = to_dict(obj)
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    components = [c for c in COMPONENTS if isinstance(spec.get(c), dict) and spec.get(c)]
    knative = annotations.get(DEPLOYMENT_MODE) == "Knative"
    problems = _metadata_problems(obj, components, knative) + _topology_problems(spec)
    for component in components:
        problems += _component_problems(component, spec[component], spec, annotations, knative)
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
