"""Our rules over rendered objects and compiled pipelines, beyond what any schema says.

    violations(objects) -> ["Kind/name: rule: detail", ...]        [] when every rule holds
    pipeline_violations(ir) -> ["Executor/<name>: rule: detail", ...]

Rules (`RULES`), over every container we define: Deployments and other workloads, init containers,
InferenceService predictor/transformer/explainer containers (and their `model` container),
PyTorchJob replicas, TrainJob's trainer with its RuntimePatch, (Cluster)TrainingRuntime replicated
jobs, ClusterStorageContainer:
- resources: cpu and memory in both requests and limits (Guaranteed QoS is crds/hardening.py's choice).
- non-root, privilege-escalation, capabilities, seccomp: Pod Security `restricted`
  (https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted), where
  runAsNonRoot and seccompProfile may sit at pod or container level, the others at container level;
- read-only-root: readOnlyRootFilesystem (beyond `restricted`; crds/hardening.py sets it everywhere),
  except for the kinds in `READ_ONLY_ROOT_EXEMPT` (a ClusterStorageContainer, see there).
- image-tag: a digest (not the all-zero placeholder) or a tag other than `latest` (untagged is `:latest`).
- gpu: nvidia.com/* resources only where `gpu_allowed` says (training jobs and runtimes by default,
  or an object annotated `flywheel/gpu: allowed`), never on serving or the monitor by accident.
- secret-object, secret-value: no Secret in git, no credential-looking literal anywhere.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from crds.hardening import CREDENTIAL_ENV

RULES = ("resources", "non-root", "privilege-escalation", "capabilities", "seccomp", "read-only-root", "image-tag",
         "gpu", "secret-object", "secret-value")
GPU_KINDS = frozenset({"PyTorchJob", "TrainJob", "TrainingRuntime", "ClusterTrainingRuntime"})
GPU_ANNOTATION = "flywheel/gpu"  # "allowed": this object asks for GPUs on purpose
GPU_PREFIX = "nvidia.com/"
SECCOMP_OK = ("RuntimeDefault", "Localhost")
ADD_OK = {"NET_BIND_SERVICE"}  # the only capability `restricted` lets a container add
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"}
# KServe predictor keys that are a container (ModelSpec and the per-framework specs extend Container).
MODEL_KEYS = ("model", "sklearn", "xgboost", "pytorch", "tensorflow", "onnx", "triton", "pmml", "lightgbm", "paddle",
              "huggingface")
# A credential-named key whose value is a reference, a path or a flag, never the credential itself.
# An env var so named holds where a credential is (a mounted token file), not the credential:
# KF_PIPELINES_SA_TOKEN_PATH (kfp.client) is a projected service-account token's path.
LOCATION_ENV = re.compile(r"_(PATH|FILE|DIR)$")
# Kinds exempt from read-only-root, and why. KServe merges a ClusterStorageContainer's container into
# other tenants' pods, so it cannot bring a scratch volume, and KServe's storage code writes temp files
# to the root filesystem (fleet/runtimes.py); `restricted` itself does not require a read-only root.
READ_ONLY_ROOT_EXEMPT = {"ClusterStorageContainer"}
REFERENCE_KEYS = {"secretName", "credentialName", "secretKey", "automountServiceAccountToken", "forwardOriginalToken",
                  "bearerTokenFile"}
SECRET_KEY = re.compile(r"(password|passwd|token|secret|access[_-]?key|credential|private[_-]?key)", re.I)
# AWS access key ids, PEM private keys, JWTs, GitHub tokens.
SECRET_VALUE = re.compile(r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|eyJ[A-Za-z0-9_-]{20,}\.|"
                          r"gh[pousr]_[A-Za-z0-9]{36})")


# --------------------------------------------------------------------------------------------
# Secrets


def _strings(node, path: str = "") -> Iterator[tuple[str, str, str]]:
    """(path, key, value) for every string leaf of a decoded YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str):
                yield f"{path}.{key}".lstrip("."), str(key), value
            else:
                yield from _strings(value, f"{path}.{key}".lstrip("."))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, str):
                yield f"{path}[{i}]", "", value
            else:
                yield from _strings(value, f"{path}[{i}]")


def _env_literals(node, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, name) of every env entry (`env: [{name, value}]`) whose name says credential and
    whose value is a literal: the detector below sees only the key `value`."""
    if isinstance(node, dict):
        for key, value in node.items():
            at = f"{path}.{key}".lstrip(".")
            if key == "env" and isinstance(value, list):
                for i, var in enumerate(value):
                    name = str(var.get("name", "")) if isinstance(var, dict) else ""
                    if (CREDENTIAL_ENV.search(name) and not LOCATION_ENV.search(name)
                            and isinstance(var.get("value"), str) and var["value"]):
                        yield f"{at}[{i}]", var["name"]
            yield from _env_literals(value, at)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _env_literals(value, f"{path}[{i}]")


def secret_looking(obj) -> list[str]:
    """Literal values that look like credentials: a known key format, a credential-named key
    holding a value, or a credential-named env var with a literal value (names of Secrets and
    references are fine)."""
    found = []
    for path, key, value in _strings(obj):
        if SECRET_VALUE.search(value):
            found.append(f"{path}: value looks like a credential")
        elif SECRET_KEY.search(key) and key not in REFERENCE_KEYS and value:
            found.append(f"{path}: credential-named key with a literal value")
    found += [f"{path}: env {name} holds a literal; reference a Secret (valueFrom.secretKeyRef)"
              for path, name in _env_literals(obj)]
    return found


# --------------------------------------------------------------------------------------------
# Where the containers are


def _get(node, *keys):
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _pod(at: str, pod: dict) -> tuple[str, dict, list[tuple[str, dict]]]:
    """(path, pod securityContext, [(path, container)]) of a pod spec."""
    containers = [(f"{at}.{key}[{i}]", c) for key in ("initContainers", "containers")
                  for i, c in enumerate(pod.get(key) or []) if isinstance(c, dict)]
    return at, pod.get("securityContext") or {}, containers


def _isvc_pods(spec: dict):
    for component in ("predictor", "transformer", "explainer"):
        body = spec.get(component)
        if isinstance(body, dict):
            at, security, containers = _pod(f"spec.{component}", body)
            containers += [(f"{at}.{key}", body[key]) for key in MODEL_KEYS if isinstance(body.get(key), dict)]
            yield at, security, containers


def _trainjob_pods(spec: dict):
    """The trainer container as the node pod will have it: `spec.trainer`'s image and resources,
    the securityContext of the RuntimePatch's `node` container, the patch's pod securityContext."""
    trainer = spec.get("trainer") or {}
    pod_security, container_security = {}, {}
    for patch in spec.get("runtimePatches") or []:
        for job in _get(patch, "trainingRuntimeSpec", "template", "spec", "replicatedJobs") or []:
            pod = _get(job, "template", "spec", "template", "spec") or {}
            pod_security = {**pod_security, **(pod.get("securityContext") or {})}
            for container in pod.get("containers") or []:
                if container.get("name") == "node":
                    container_security = {**container_security, **(container.get("securityContext") or {})}
    container = {"name": "node", "image": trainer.get("image"), "resources": trainer.get("resourcesPerNode") or {},
                 "securityContext": container_security}
    yield "spec.trainer", pod_security, [("spec.trainer", container)]


def pods(obj: dict) -> list[tuple[str, dict, list[tuple[str, dict]]]]:
    """Every pod an object defines: (JSON path, pod securityContext, [(JSON path, container)])."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return [_pod("spec", spec)]
    if kind == "CronJob":
        template = _get(spec, "jobTemplate", "spec", "template", "spec") or {}
        return [_pod("spec.jobTemplate.spec.template.spec", template)]
    if kind == "InferenceService":
        return list(_isvc_pods(spec))
    if kind == "PyTorchJob":
        return [_pod(f"spec.pytorchReplicaSpecs.{name}.template.spec", _get(replica, "template", "spec") or {})
                for name, replica in (spec.get("pytorchReplicaSpecs") or {}).items()]
    if kind == "TrainJob":
        return list(_trainjob_pods(spec))
    if kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        jobs = _get(spec, "template", "spec", "replicatedJobs") or []
        return [_pod(f"spec.template.spec.replicatedJobs[{i}].template.spec.template.spec",
                     _get(job, "template", "spec", "template", "spec") or {}) for i, job in enumerate(jobs)]
    if kind == "ClusterStorageContainer":
        return [("spec", {}, [("spec.container", spec.get("container") or {})])]
    if kind in WORKLOAD_KINDS or isinstance(_get(spec, "template", "spec", "containers"), list):
        return [_pod("spec.template.spec", _get(spec, "template", "spec") or {})]
    return []


# --------------------------------------------------------------------------------------------
# The rules


def image_problem(image) -> str | None:
    """Why `image` is not pinned, or None: a digest (not the all-zero placeholder a checkout
    carries until `make image` pins it), or a tag other than `latest`."""
    if not image:
        return "no image"
    if "@" in image:
        if set(image.rsplit("@sha256:", 1)[-1]) == {"0"}:
            return f"{image} is the placeholder digest (build and pin the image: make image ENV=<env>)"
        return None  # the digest pins it, whatever the tag says
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"{image} has no tag (pulls :latest)"
    if last.rsplit(":", 1)[1] == "latest":
        return f"{image} uses the tag latest"
    return None


def _resource_problems(resources: dict) -> list[str]:
    return [f"no {kind}.{what}" for kind in ("requests", "limits") for what in ("cpu", "memory")
            if what not in (resources.get(kind) or {})]


def _security_problems(pod_security: dict, security: dict, *, read_only_root: bool = True) -> list[tuple[str, str]]:
    merged = {**pod_security, **security}  # the container's own setting wins (core/v1 PodSecurityContext)
    found = []
    if merged.get("runAsNonRoot") is not True or merged.get("runAsUser") == 0:
        found.append(("non-root", "runAsNonRoot must be true and runAsUser non-zero"))
    if security.get("allowPrivilegeEscalation") is not False or security.get("privileged"):
        found.append(("privilege-escalation", "allowPrivilegeEscalation must be false, privileged unset"))
    capabilities = security.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []) or set(capabilities.get("add") or []) - ADD_OK:
        found.append(("capabilities", "capabilities.drop must hold ALL, add at most NET_BIND_SERVICE"))
    if (merged.get("seccompProfile") or {}).get("type") not in SECCOMP_OK:
        found.append(("seccomp", "seccompProfile.type must be RuntimeDefault (pod or container)"))
    if read_only_root and security.get("readOnlyRootFilesystem") is not True:
        found.append(("read-only-root", "readOnlyRootFilesystem must be true"))
    return found


def _container_violations(at: str, container: dict, pod_security: dict, *, gpu_ok: bool,
                          read_only_root: bool) -> list[tuple[str, str]]:
    where = f"{at} ({container.get('name') or '?'})"
    resources = container.get("resources") or {}
    found = [("resources", f"{where}: {p}") for p in _resource_problems(resources)]
    security = container.get("securityContext") or {}
    found += [(rule, f"{where}: {detail}")
              for rule, detail in _security_problems(pod_security, security, read_only_root=read_only_root)]
    problem = image_problem(container.get("image"))
    if problem:
        found.append(("image-tag", f"{where}: {problem}"))
    gpus = sorted({key for kind in ("requests", "limits") for key in (resources.get(kind) or {})
                   if key.startswith(GPU_PREFIX)})
    if gpus and not gpu_ok:
        found.append(("gpu", f"{where}: asks for {gpus}; only training jobs and runtimes may "
                             f"(or annotate the object {GPU_ANNOTATION}: allowed)"))
    return found


def default_gpu_allowed(obj: dict) -> bool:
    """Training jobs and runtimes, or an object annotated `flywheel/gpu: allowed`."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return obj.get("kind") in GPU_KINDS or annotations.get(GPU_ANNOTATION) == "allowed"


def _name(obj: dict) -> str:
    return f"{obj.get('kind') or '?'}/{(obj.get('metadata') or {}).get('name') or '?'}"


def violations(objects: list[dict], *, gpu_allowed: Callable[[dict], bool] | set[str] = default_gpu_allowed,
               ) -> list[str]:
    """Every rule every object breaks, each `Kind/name: rule: detail`.

    Args:
        objects: Kubernetes objects as plain dicts (a rendered cluster, a builder's output).
        gpu_allowed: Which objects may ask for nvidia.com/* resources: a predicate over the object,
            or a set of kinds.

    Returns:
        One line per violation, objects in the given order; [] when every rule holds.
    """
    allowed = gpu_allowed if callable(gpu_allowed) else (lambda obj: obj.get("kind") in gpu_allowed)
    found = []
    for obj in objects:
        name = _name(obj)
        if obj.get("kind") == "Secret":
            found.append(f"{name}: secret-object: Secrets never go in git (reference one the cluster holds)")
        found += [f"{name}: secret-value: {p}" for p in secret_looking(obj)]
        for _, pod_security, containers in pods(obj):
            for at, container in containers:
                found += [f"{name}: {rule}: {detail}" for rule, detail in _container_violations(
                    at, container, pod_security, gpu_ok=allowed(obj),
                    read_only_root=obj.get("kind") not in READ_ONLY_ROOT_EXEMPT)]
    return found


# --------------------------------------------------------------------------------------------
# Compiled KFP pipelines (IR YAML, kfp 2.17)


def _limits(resources: dict) -> list[str]:
    """Missing cpu/memory limits of an executor. kfp 2.17 writes `resourceCpuLimit` (a string,
    possibly a pipeline-parameter placeholder) and, for a constant, the older `cpuLimit` float
    as well (kfp/compiler/pipeline_spec_builder.py); either sets the limit. The request defaults
    to the limit on the cluster, so limits are what must be there."""
    return [f"no {what} limit (task.set_{what}_limit)" for what, keys in
            (("cpu", ("resourceCpuLimit", "cpuLimit")), ("memory", ("resourceMemoryLimit", "memoryLimit")))
            if not any(resources.get(key) for key in keys)]


def _defaults(ir: dict) -> Iterator[tuple[str, dict]]:
    yield "root", _get(ir, "root", "inputDefinitions", "parameters") or {}
    for name, component in (ir.get("components") or {}).items():
        yield f"components.{name}", _get(component, "inputDefinitions", "parameters") or {}


def _task_identity(ir: dict, executor: str) -> list[str]:
    context = _get(ir, "platforms", "kubernetes", "deploymentSpec", "executors", executor, "securityContext") or {}
    if context.get("runAsNonRoot") is not True or str(context.get("runAsUser", "0")) == "0":
        return [f"Executor/{executor}: non-root: no non-root securityContext (kubernetes.set_security_context)"]
    return []


def pipeline_violations(ir: dict, *, cluster: bool = False) -> list[str]:
    """Every rule a compiled pipeline breaks: each executor has cpu and memory limits and a pinned
    image; no credential-looking literal in parameter defaults or executor env; compiled for a
    cluster, each task runs as a non-root user (kfp.kubernetes.set_security_context: the KFP backend
    adds the rest of Pod Security restricted, kubeflow/pipelines#12782).

    Args:
        ir: The compiled pipeline (KFP IR YAML, as `yaml.safe_load` gives it).
        cluster: It runs on a cluster (a KFP API), not kfp.local.

    Returns:
        One `Executor/<name>: rule: detail` or `Pipeline/<name>: rule: detail` per violation.
    """
    found = []
    for name, executor in (_get(ir, "deploymentSpec", "executors") or {}).items():
        container = executor.get("container")
        if not isinstance(container, dict):
            continue  # an importer or resolver runs no container of ours
        found += [f"Executor/{name}: resources: {p}" for p in _limits(container.get("resources") or {})]
        problem = image_problem(container.get("image"))
        if problem:
            found.append(f"Executor/{name}: image-tag: {problem}")
        found += [f"Executor/{name}: secret-value: {p}" for p in secret_looking({"env": container.get("env") or []})]
        if cluster:
            found += _task_identity(ir, name)
    pipeline = f"Pipeline/{_get(ir, 'pipelineInfo', 'name') or '?'}"
    for at, parameters in _defaults(ir):
        for parameter, definition in parameters.items():
            if isinstance(definition, dict) and "defaultValue" in definition:
                found += [f"{pipeline}: secret-value: {at}.{parameter}.{p}"
                          for p in secret_looking({"defaultValue": definition["defaultValue"]})]
    return found
