"""What every training pod gets, whichever cluster API runs it (PyTorchJob or TrainJob): the
container's env, resources (CPU, memory, whole GPUs or MIG slices), writable scratch volumes, GPU
node selector and tolerations; the hardening (non-root, read-only root, requests = limits) is
`crds.hardening`'s, shared with the serving pods. Built with the Kubernetes client's models, so
field names come from the SDK."""
from __future__ import annotations

import re

from kubernetes import client as k8s

import storage
from crds import hardening
from crds.hardening import DNS1035
from specs import TrainSpec

STORAGE_SECRET = storage.CREDENTIALS_SECRET  # AWS_* keys for the object store, by reference only
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# Every torchrun launch gets this (locally, and in cluster pods). By default torchrun's workers
# share the agent's rendezvous TCPStore, and a restarted worker group then reads the previous
# group's gloo/nccl addresses from it: restarts die with `connectFullMesh ... Connection refused`
# (pytorch/pytorch#135712). Opting out gives each restarted group a fresh store on rank 0.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# Set by the training operators or torchrun; a value of ours would be appended twice or silently lost.
RESERVED_ENV = re.compile(r"^(MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK|PYTHONUNBUFFERED|PET_.*)$")


def pod_env(spec: TrainSpec) -> dict[str, str]:
    """Plain (non-secret) settings the training pods need besides the credentials secret."""
    return {"AWS_ENDPOINT_URL": spec.object_store_endpoint} if spec.object_store_endpoint else {}


def env_vars(env: dict[str, str] | None, extra: dict[str, str] | None = None) -> list[k8s.V1EnvVar]:
    user = dict(env or {})
    for name in user:
        if RESERVED_ENV.match(name):
            raise ValueError(f"env {name} is set by the training operator or torchrun; do not pass it")
    hardening.check_plain_env(user, STORAGE_SECRET)
    ours = {**hardening.READ_ONLY_ROOT_ENV, **TORCHRUN_ENV, **(extra or {})}
    return [k8s.V1EnvVar(name=k, value=v) for k, v in {**ours, **user}.items()]


def resources(spec: TrainSpec) -> k8s.V1ResourceRequirements:
    res = spec.resources
    gpus = {res.gpu.resource: str(res.gpu.count)} if res.gpu.count > 0 else None
    return hardening.resources(res.cpu, res.memory, gpus)


def volume_mounts() -> list[k8s.V1VolumeMount]:
    return [hardening.scratch_mount(), k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")]


def volumes() -> list[k8s.V1Volume]:
    return [
        hardening.scratch_volume("4Gi"),
        # DataLoader workers and NCCL need more shared memory than the 64Mi default.
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="1Gi")),
    ]


def secret_env(secret: str = STORAGE_SECRET) -> list[k8s.V1EnvFromSource]:
    return hardening.secret_env(secret)


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

