"""What every training pod gets, whichever cluster API runs it (PyTorchJob or TrainJob): the
container's env, resources (CPU, memory, whole GPUs or MIG slices), non-root security settings,
writable scratch volumes, GPU node selector and tolerations. Built with the Kubernetes client's
models, so field names come from the SDK."""
from __future__ import annotations

import re

from kubernetes import client as k8s

import storage
from specs import TrainSpec

RUN_AS_UID = 10001  # the image's non-root user (numeric, so runAsNonRoot can be verified)
STORAGE_SECRET = storage.CREDENTIALS_SECRET  # AWS_* keys for the object store, by reference only
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# Every torchrun launch gets this (locally, and in cluster pods). By default torchrun's workers
# share the agent's rendezvous TCPStore, and a restarted worker group then reads the previous
# group's gloo/nccl addresses from it: restarts die with `connectFullMesh ... Connection refused`
# (pytorch/pytorch#135712). Opting out gives each restarted group a fresh store on rank 0.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# Set by the training operators or torchrun; a value of ours would be appended twice or silently lost.
RESERVED_ENV = re.compile(r"^(MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK|PYTHONUNBUFFERED|PET_.*)$")
CREDENTIAL_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def pod_env(spec: TrainSpec) -> dict[str, str]:
    """Plain (non-secret) settings the training pods need besides the credentials secret."""
    return {"AWS_ENDPOINT_URL": spec.object_store_endpoint} if spec.object_store_endpoint else {}


def env_vars(env: dict[str, str] | None, extra: dict[str, str] | None = None) -> list[k8s.V1EnvVar]:
    user = dict(env or {})
    for name, value in user.items():
        if RESERVED_ENV.match(name):
            raise ValueError(f"env {name} is set by the training operator or torchrun; do not pass it")
        if CREDENTIAL_ENV.search(name):
            raise ValueError(f"env {name} looks like a credential; put it in Secret {STORAGE_SECRET!r} instead")
        if not isinstance(value, str):
            raise ValueError(f"env {name} must be a string, got {type(value).__name__}")
    # HOME and caches must point at the writable emptyDir: the root filesystem is read-only.
    ours = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "MPLCONFIGDIR": "/tmp/.matplotlib",
            "PYTHONDONTWRITEBYTECODE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
            **TORCHRUN_ENV, **(extra or {})}
    return [k8s.V1EnvVar(name=k, value=v) for k, v in {**ours, **user}.items()]


def resources(spec: TrainSpec) -> k8s.V1ResourceRequirements:
    res = spec.resources
    requests = {"cpu": str(res.cpu), "memory": str(res.memory)}
    limits = dict(requests)
    if res.gpu.count > 0:
        # Extended resources are limits only; Kubernetes sets the request equal to the limit.
        limits[res.gpu.resource] = str(res.gpu.count)
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def container_security() -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(allow_privilege_escalation=False, read_only_root_filesystem=True,
                                 run_as_non_root=True, capabilities=k8s.V1Capabilities(drop=["ALL"]))


def pod_security() -> k8s.V1PodSecurityContext:
    return k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=RUN_AS_UID, run_as_group=RUN_AS_UID,
                                    fs_group=RUN_AS_UID, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def volume_mounts() -> list[k8s.V1VolumeMount]:
    return [k8s.V1VolumeMount(name="tmp", mount_path="/tmp"), k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")]


def volumes() -> list[k8s.V1Volume]:
    return [
        k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="4Gi")),
        # DataLoader workers and NCCL need more shared memory than the 64Mi default.
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="1Gi")),
    ]


def secret_env(secret: str = STORAGE_SECRET) -> list[k8s.V1EnvFromSource]:
    return [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))]


def tolerations(spec: TrainSpec) -> list[k8s.V1Toleration] | None:
    out = [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in spec.tolerations]
    return out or None


def node_selector(spec: TrainSpec) -> dict[str, str] | None:
    return {GPU_PRODUCT_LABEL: spec.resources.gpu.product} if spec.resources.gpu.product else None


def labels(spec: TrainSpec) -> dict[str, str]:
    out = {"app.kubernetes.io/part-of": "flywheel", "app.kubernetes.io/component": "training"}
    if spec.env:
        out["flywheel/env"] = spec.env
    return out


# Istio's sidecar never exits, which would keep every replica (and the job) Running.
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}


def identity_problems(obj: dict, api_version: str, kind: str, pod_names: list[str]) -> list[str]:
    """What every training job must be, whatever its API: the right apiVersion and kind, a DNS-1035
    name whose pods' names (`pod_names`, the longest each replica set makes) stay within 63
    characters, and a namespace."""
    problems = []
    if obj.get("apiVersion") != api_version or obj.get("kind") != kind:
        problems.append(f"(root): must be {api_version} {kind}, got {obj.get('apiVersion')} {obj.get('kind')}")
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    if not DNS1035.match(name):
        problems.append(f"metadata.name: {name!r} must be a DNS-1035 label (lower case, starts with a letter)")
    for pod in pod_names:
        if len(pod) > 63:
            problems.append(f"metadata.name: {name!r} is too long: pod {pod!r} exceeds 63 characters")
    if not meta.get("namespace"):
        problems.append("metadata.namespace: required")
    return problems


def to_dict(obj):
    """Serialize an SDK model the way the Kubernetes client sends it (camelCase, no nulls)."""
    return k8s.ApiClient().sanitize_for_serialization(obj)
