"""Kueue: ResourceFlavors and a ClusterQueue (cluster-scoped), the env's LocalQueue, and the
namespace quota sized to what runs at once.

Kueue v0.19.2 (kueue.x-k8s.io/v1beta2, the storage version; v1beta1 is still served):
https://kueue.sigs.k8s.io/docs/concepts/ and the CRDs vendored in crds/kueue.x-k8s.io_*.yaml.

- ResourceFlavor per GPU pool (`a100-80gb`, `a100-40gb-mig-1g-5gb`): nodeLabels
  nvidia.com/gpu.product plus the cluster's node_selector, its tolerations; Kueue adds both to the
  pods of a job it admits on that flavor. Named by product and resource only, never by env: the
  ClusterQueues of one cohort borrow quota of the *same* flavor, so every env on a cluster must
  render the flavor identically (same node_selector and tolerations for one GPU product).
- `default-flavor` (Kueue's documented name, empty spec) covers cpu and memory.
- ClusterQueue `flywheel-<env>`: admits only the env's namespace; cpu/memory nominal from
  fleet.queue with borrowingLimit 0 (so the namespace quota below can bound them); GPUs nominal
  from fleet.clusters[].gpu.quota, borrowingLimit fleet.queue.borrowing_limit_gpus.
  Preemption: reclaimWithinCohort Any (an env always gets its own nominal quota back: a job of
  another env running on borrowed GPUs is suspended and re-queued; training resumes from its
  checkpoints), borrowWithinCohort Never (borrowing never evicts anyone), withinClusterQueue Never
  (our jobs have no priorities: within an env they wait BestEffortFIFO).
- LocalQueue `flywheel` in the namespace -> the ClusterQueue; training jobs opt in with the label
  `kueue.x-k8s.io/queue-name: flywheel` (training/backends/jobs.py QUEUE_LABEL).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from decimal import Decimal

from fleet import monitor
from fleet.context import FleetContext
from specs.quantity import format_cpu, format_memory, parse

FEATURE: str | None = "kueue"
SCOPE = "env"

API_VERSION = "kueue.x-k8s.io/v1beta2"
# The vendored CRDs (crds/upstream.yaml records their source); version to validate against: VERSION.
RESOURCEFLAVORS = "kueue.x-k8s.io_resourceflavors.yaml"
CLUSTERQUEUES = "kueue.x-k8s.io_clusterqueues.yaml"
LOCALQUEUES = "kueue.x-k8s.io_localqueues.yaml"
VERSION = "v1beta2"
LOCAL_QUEUE = "flywheel"  # the LocalQueue every env's jobs name (TrainSpec.queue_name)
CPU_FLAVOR = "default-flavor"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
WHOLE_GPU = "nvidia.com/gpu"

# The LimitRange default limit (manifests/base/limitrange.yaml): what a container without limits
# is charged: Argo's wait sidecar, Istio's proxy, Knative's queue-proxy, KServe's agent.
SIDECAR_CPU, SIDECAR_MEMORY = "500m", "512Mi"
EXTRA_TASK_PODS = 1  # the pipeline's other step running beside the training tasks
EXTRA_PODS = 2  # short-lived KFP driver pods


class QueueConfigError(ValueError):
    """A config Kueue could never admit a training job under; names the config keys."""


def flavor_name(product: str, resource: str) -> str:
    """`NVIDIA-A100-SXM4-80GB` + `nvidia.com/gpu` -> `a100-80gb`; + `nvidia.com/mig-1g.5gb` ->
    `a100-80gb-mig-1g-5gb` (vendor and form factor dropped: they do not change what a job gets)."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", product.lower())
              if t and t not in ("nvidia", "tesla", "pcie") and not re.fullmatch(r"sxm\d*", t)]
    if resource != WHOLE_GPU:
        tokens.append(re.sub(r"[^a-z0-9]+", "-", resource.split("/", 1)[1]))
    return "-".join(tokens)[:63].strip("-") or "gpu"


def cluster_queue_name(ctx: FleetContext) -> str:
    return f"flywheel-{ctx.env}"


def _meta(ctx: FleetContext, name: str, namespace: str | None = None) -> dict:
    meta = {"name": name, "labels": dict(ctx.labels)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _tolerations(ctx: FleetContext) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in ctx.cluster.tolerations]


def check_fits(ctx: FleetContext) -> None:
    """Raise QueueConfigError when one training job (workers x training.resources) could never be
    admitted by this cluster's ClusterQueue: Kueue would hold it forever instead of failing it."""
    gpu, pool, queue, t = ctx.training.resources.gpu, ctx.cluster.gpu, ctx.fleet.queue, ctx.training
    where = f"config/{ctx.env}.yaml, cluster {ctx.cluster.name!r}"
    problems = []
    if gpu.count and pool is None:
        problems.append("training.resources.gpu asks for GPUs but the cluster declares no gpu pool")
    elif gpu.count and gpu.resource != pool.resource:
        problems.append(f"training.resources.gpu.resource {gpu.resource!r} is not the cluster's "
                        f"fleet.clusters[].gpu.resource {pool.resource!r} (the only GPU resource its queue covers)")
    elif gpu.count and gpu.product and gpu.product != pool.product:
        problems.append(f"training.resources.gpu.product {gpu.product!r} is not the cluster's "
                        f"fleet.clusters[].gpu.product {pool.product!r} (no flavor matches the job's node selector)")
    elif gpu.count and t.workers * gpu.count > pool.quota + queue.borrowing_limit_gpus:
        problems.append(f"training.workers x training.resources.gpu.count = {t.workers * gpu.count} {gpu.resource} "
                        f"> fleet.clusters[].gpu.quota {pool.quota} + fleet.queue.borrowing_limit_gpus "
                        f"{queue.borrowing_limit_gpus}")
    for key, per_pod, cap in (("cpu", t.resources.cpu, queue.cpu), ("memory", t.resources.memory, queue.memory)):
        if t.workers * parse(per_pod) > parse(cap):
            problems.append(f"training.workers x training.resources.{key} = {t.workers} x {per_pod} "
                            f"> fleet.queue.{key} {cap} (no borrowing for {key})")
    if problems:
        raise QueueConfigError(f"{where}: Kueue could never admit one training job: " + "; ".join(problems))


def _queues_here(ctx: FleetContext) -> bool:
    return ctx.fleet.queue.enabled and ctx.runs("training") and ctx.cluster.gpu is not None


def _gpu_flavor(ctx: FleetContext) -> dict:
    pool = ctx.cluster.gpu
    spec = {"nodeLabels": {**ctx.cluster.node_selector, GPU_PRODUCT_LABEL: pool.product}}
    if ctx.cluster.tolerations:
        spec["tolerations"] = _tolerations(ctx)
    return {"apiVersion": API_VERSION, "kind": "ResourceFlavor",
            "metadata": _meta(ctx, flavor_name(pool.product, pool.resource)), "spec": spec}


def _resource(name: str, nominal: str, borrowing: str | None) -> dict:
    out = {"name": name, "nominalQuota": nominal}
    if borrowing is not None:  # the CRD's CEL rule: borrowingLimit only with a cohort
        out["borrowingLimit"] = borrowing
    return out


def _cluster_queue(ctx: FleetContext) -> dict:
    queue, pool = ctx.fleet.queue, ctx.cluster.gpu
    cohort = queue.cohort or None
    no_borrowing = "0" if cohort else None
    spec = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ctx.namespace}},
        "queueingStrategy": "BestEffortFIFO",
        "resourceGroups": [
            {"coveredResources": ["cpu", "memory"],
             "flavors": [{"name": CPU_FLAVOR, "resources": [_resource("cpu", queue.cpu, no_borrowing),
                                                            _resource("memory", queue.memory, no_borrowing)]}]},
            {"coveredResources": [pool.resource],
             "flavors": [{"name": flavor_name(pool.product, pool.resource), "resources": [
                 _resource(pool.resource, str(pool.quota), str(queue.borrowing_limit_gpus) if cohort else None)]}]},
        ],
        "preemption": {"reclaimWithinCohort": "Any", "borrowWithinCohort": {"policy": "Never"},
                       "withinClusterQueue": "Never"},
    }
    if cohort:
        spec["cohortName"] = cohort
    return {"apiVersion": API_VERSION, "kind": "ClusterQueue", "metadata": _meta(ctx, cluster_queue_name(ctx)),
            "spec": spec}


def platform_objects(ctx: FleetContext) -> list[dict]:
    """The GPU and CPU ResourceFlavors and the env's ClusterQueue, where this cluster trains with a
    queue; [] elsewhere. QueueConfigError when one training job could never be admitted."""
    if not _queues_here(ctx):
        return []
    check_fits(ctx)
    cpu_flavor = {"apiVersion": API_VERSION, "kind": "ResourceFlavor", "metadata": _meta(ctx, CPU_FLAVOR), "spec": {}}
    return [_gpu_flavor(ctx), cpu_flavor, _cluster_queue(ctx)]


def objects(ctx: FleetContext) -> list[dict]:
    """The LocalQueue `flywheel` in the env's namespace, pointing at its ClusterQueue."""
    if not ctx.fleet.queue.enabled:
        return []
    return [{"apiVersion": API_VERSION, "kind": "LocalQueue", "metadata": _meta(ctx, LOCAL_QUEUE, ctx.namespace),
             "spec": {"clusterQueue": cluster_queue_name(ctx)}}]


# --------------------------------------------------------------------------------------------
# The namespace ResourceQuota, sized to what runs at once


@dataclass(frozen=True)
class Part:
    """Pods of one kind that can run at once, and what they are charged (requests == limits)."""

    what: str
    pods: int
    cpu: Decimal
    memory: Decimal


def concurrent_jobs(ctx: FleetContext) -> int:
    """Training jobs one env starts at once: tuning.parallelism trials (tuning on) times
    retraining.max_concurrency runs (scheduled retraining on); each has a KFP task pod."""
    trials = ctx.tuning.parallelism if ctx.tuning.enabled else 1
    return trials * (ctx.retraining.max_concurrency if ctx.retraining.enabled else 1)


def admitted_jobs(ctx: FleetContext) -> int:
    """Whole training jobs the ClusterQueue admits at once (Kueue admits a job all or nothing):
    the fewest that nominal cpu/memory and nominal + borrowed GPUs allow; without a queue, every
    job that exists at once (concurrent_jobs) runs."""
    t = ctx.training
    if not ctx.fleet.queue.enabled:
        return concurrent_jobs(ctx)
    check_fits(ctx)
    queue, gpu = ctx.fleet.queue, t.resources.gpu
    caps = [parse(queue.cpu) // (t.workers * parse(t.resources.cpu)),
            parse(queue.memory) // (t.workers * parse(t.resources.memory))]
    if gpu.count:
        caps.append(Decimal(gpu_cap(ctx)) // (t.workers * gpu.count))
    return int(min(caps))


def gpu_cap(ctx: FleetContext) -> int:
    """GPUs (or MIG slices) the env may hold on this cluster: ClusterQueue nominal + borrowing."""
    pool = ctx.cluster.gpu
    if pool is None or not ctx.runs("training"):
        return 0
    return pool.quota + (ctx.fleet.queue.borrowing_limit_gpus if ctx.fleet.queue.cohort else 0)


def _serving(ctx: FleetContext) -> Part:
    s = ctx.serving
    replicas = max(s.max_replicas, ctx.cluster.predictor_replicas or 0)
    revisions = 2 if s.deployment_mode == "Knative" and s.canary_percent else 1  # a canary runs both
    front = replicas * revisions  # pods of the component clients call (it carries the logger)
    pods = front * (2 if s.topology == "separate" else 1)
    sidecars = pods * (1 + (s.deployment_mode == "Knative")) + (front if s.payload_logging.url else 0)
    containers = front * (1 if s.topology == "single" else 2)  # one server, or predictor and transformer
    return Part(f"serving {pods} pod(s): {containers} x {s.cpu}/{s.memory} + {sidecars} sidecar(s)", pods,
                containers * parse(s.cpu) + sidecars * parse(SIDECAR_CPU),
                containers * parse(s.memory) + sidecars * parse(SIDECAR_MEMORY))


def quota_parts(ctx: FleetContext) -> list[Part]:
    """What can run at once in the namespace on this cluster, part by part (see namespace_quota)."""
    parts, t = [], ctx.training
    if ctx.runs("training"):
        jobs = admitted_jobs(ctx)
        parts.append(Part(f"training {jobs} admitted job(s) x {t.workers} x {t.resources.cpu}/{t.resources.memory}",
                          jobs * t.workers, jobs * t.workers * parse(t.resources.cpu),
                          jobs * t.workers * parse(t.resources.memory)))
        tasks = concurrent_jobs(ctx) + EXTRA_TASK_PODS
        cpu, memory = ctx.kfp_task_cpu, ctx.kfp_task_memory
        parts.append(Part(f"KFP {tasks} task pod(s) x {cpu}/{memory} + sidecar", tasks,
                          tasks * (parse(cpu) + parse(SIDECAR_CPU)), tasks * (parse(memory) + parse(SIDECAR_MEMORY))))
    if ctx.runs("serving"):
        parts.append(_serving(ctx))
        if ctx.shadow:  # `flywheel shadow start`: the challenger, the champion's builder and spec (Standard mode)
            champion = _serving(ctx)
            parts.append(dataclasses.replace(champion, what=f"shadow challenger, as {champion.what}"))
    if ctx.runs("monitoring"):
        count, cpu, memory = monitor.replicas(ctx), monitor.CPU, monitor.memory(ctx)
        parts.append(Part(f"monitor {count} x {cpu}/{memory} + mesh sidecar", count,
                          count * (parse(cpu) + parse(SIDECAR_CPU)), count * (parse(memory) + parse(SIDECAR_MEMORY))))
    parts.append(Part(f"{EXTRA_PODS} KFP driver pod(s) at the LimitRange default", EXTRA_PODS,
                      EXTRA_PODS * parse(SIDECAR_CPU), EXTRA_PODS * parse(SIDECAR_MEMORY)))
    return parts


def namespace_quota(ctx: FleetContext) -> dict[str, str] | None:
    """The namespace ResourceQuota's spec.hard on this cluster: what runs AT ONCE, not the sum of
    every peak.

    - Training: Kueue holds a job suspended (no pods, nothing charged) until its ClusterQueue
      admits it, so at most `admitted_jobs` whole jobs run: min over cpu, memory and GPUs of
      (ClusterQueue nominal [+ GPU borrowing]) // (training.workers x training.resources).
      Without a queue every concurrent job runs (tuning.parallelism x retraining.max_concurrency).
    - KFP task pods exist whether their job is queued or not: one per concurrent job plus
      EXTRA_TASK_PODS, each kfp.task_cpu/task_memory plus Argo's wait sidecar; EXTRA_PODS drivers.
    - Serving: max(serving.max_replicas, fleet.clusters[].predictor_replicas) replicas, twice during
      a Knative canary; one server container (single) or predictor + transformer at serving.cpu/memory; sidecars per
      pod: Istio's proxy, Knative's queue-proxy, KServe's agent on the logging component.
    - Shadow (evaluation.shadow): the challenger InferenceService `flywheel shadow start` serves beside
      the champion, rendered from the same serving spec: the serving part once more.
    - Monitor: fleet/monitor.py's replicas x (its CPU/memory + Istio's proxy).
    - GPUs: the ClusterQueue's nominal + borrowing (the quota never refuses what Kueue admitted);
      every other GPU resource 0. No LoadBalancer or NodePort Services (as manifests/base).

    Requests equal limits (the pods set both, the LimitRange defaults both). Sidecars are charged
    the LimitRange default (SIDECAR_CPU/MEMORY).
    """
    parts = quota_parts(ctx)
    cpu, memory = format_cpu(sum(p.cpu for p in parts)), format_memory(sum(p.memory for p in parts))
    hard = {"requests.cpu": cpu, "limits.cpu": cpu, "requests.memory": memory, "limits.memory": memory,
            "pods": str(sum(p.pods for p in parts)), f"requests.{WHOLE_GPU}": "0"}
    if ctx.cluster.gpu is not None:
        hard[f"requests.{ctx.cluster.gpu.resource}"] = str(gpu_cap(ctx))
    hard.update({"services.loadbalancers": "0", "services.nodeports": "0"})
    return hard


def quota_summary(ctx: FleetContext) -> str:
    """One line for the generated file's header: the quota and how it came about."""
    hard = namespace_quota(ctx)
    gpus = ", ".join(f"{v} {k.removeprefix('requests.')}" for k, v in hard.items()
                     if k.startswith("requests.nvidia.com/") and v != "0") or "no GPUs"
    return (f"quota {hard['requests.cpu']} CPU, {hard['requests.memory']}, {hard['pods']} pods, {gpus} = "
            + "; ".join(p.what for p in quota_parts(ctx)))
