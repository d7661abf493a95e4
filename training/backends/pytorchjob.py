"""Distributed training on a cluster: a Kubeflow Training Operator `PyTorchJob` (kubeflow.org/v1).

- `pytorchjob_model` renders the job from the TrainSpec with kubeflow-training's models, so field
  names and nesting come from the SDK rather than from hand-written dicts.
- `validate_pytorchjob` checks a rendered job against the official CRD schema (`crds/`, shipped
  with the package) and against the rules the CRD cannot express (the operator's admission
  webhook, our security policy), so a bad job fails here and not half-scheduled on a GPU cluster.
- `PyTorchJobBackend` submits it through the Kubernetes gateway (`gateways.kube_api`), streams
  the master's log, waits for Succeeded/Failed; the rest of the job's life is `ClusterBackend`'s.

How the pods find each other (Training Operator v1.8+/1.9, `pkg/controller.v1/pytorch`): the
operator appends env to every container. With a Master replica it sets MASTER_ADDR/PORT,
PET_MASTER_ADDR/PORT (`<job>-master-0`, the container port named `pytorchjob-port`), WORLD_SIZE,
RANK, PET_NODE_RANK and PET_NPROC_PER_NODE (from `spec.nprocPerNode`). Without an elasticPolicy it
adds PET_NNODES=<replicas>; with one it adds PET_NNODES=<min>:<max>, PET_RDZV_BACKEND,
PET_RDZV_ENDPOINT (`<job>-worker-0:<its pytorchjob-port>`), PET_RDZV_ID and PET_MAX_RESTARTS.
`torchrun` reads every PET_* variable as the default of the flag of the same name, so the one
container command `torchrun --module training.train ARGS` is right in both modes, and GPUs per pod
(`nprocPerNode`) work the same way; `python -m training.train` alone would only work for one
process per pod and would lose torchrun's in-pod restarts. We use the elastic mode whenever the job
has Worker replicas (the webhook requires a Worker for it): c10d rendezvous tolerates pods that
schedule late (down to `elastic.min_replicas`) and restarts the worker group up to
`elastic.max_restarts` times, resuming from the entry point's checkpoints. A single-pod job is
non-elastic and gets PET_MAX_RESTARTS from us. No `metrics` are set, so the operator creates no HPA.
"""
from __future__ import annotations

from collections.abc import Callable

from kubernetes import client as k8s

import crds
from crds import hardening
from crds.hardening import CREDENTIAL_ENV
from gateways.kube_api import PYTORCHJOBS, KubeApi, serialize
from specs import TrainSpec
from training import pods
from training.backends.cluster import ClusterBackend, TrainingJobInvalid
from training.backends.jobs import queue_labels
from training.backends.queueing import QueueWatch, wait_through_queue

API_VERSION, KIND = PYTORCHJOBS.api_version, PYTORCHJOBS.kind
CONTAINER_NAME = "pytorch"  # the operator finds the training container by this name
PORT_NAME = "pytorchjob-port"  # ... and the rendezvous/master port by this one
PORT = 23456
ENTRY_COMMAND = ["torchrun", "--module", "training.train"]
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("All", "Running", "None")


def _pod_template(spec: TrainSpec, image: str, args: list[str], env: dict[str, str] | None,
                  elastic: bool) -> k8s.V1PodTemplateSpec:
    extra = {} if elastic else {"PET_MAX_RESTARTS": str(spec.elastic.max_restarts)}
    container = k8s.V1Container(
        name=CONTAINER_NAME,
        image=image,
        image_pull_policy="IfNotPresent",
        command=list(ENTRY_COMMAND),
        args=list(args),
        env=pods.env_vars(env, extra),
        env_from=pods.secret_env(),
        ports=[k8s.V1ContainerPort(name=PORT_NAME, container_port=PORT, protocol="TCP")],
        resources=pods.resources(spec),
        security_context=hardening.container_security(),
        volume_mounts=pods.volume_mounts(),
    )
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=pods.labels(spec), annotations=dict(pods.POD_ANNOTATIONS)),
        spec=k8s.V1PodSpec(
            containers=[container],
            automount_service_account_token=False,  # training never talks to the Kubernetes API
            security_context=hardening.pod_security(),
            node_selector=pods.node_selector(spec),
            tolerations=pods.tolerations(spec),
            volumes=pods.volumes(),
        ),
    )


def pytorchjob_model(spec: TrainSpec, job_name: str, args: list[str], env: dict[str, str] | None = None,
                     annotations: dict[str, str] | None = None):
    """The job as a `KubeflowOrgV1PyTorchJob` (kubeflow-training's model of the CRD)."""
    from kubeflow.training import models

    if args and not str(args[0]).startswith("-"):
        raise ValueError(f"args are the entry point's arguments (e.g. --data ...), got {args[0]!r}; "
                         f"the container runs {' '.join(ENTRY_COMMAND)} itself")
    workers, elastic_spec = spec.workers, spec.elastic
    elastic = workers > 1
    if elastic and not elastic_spec.min_replicas <= workers <= elastic_spec.max_replicas:
        raise ValueError(f"training.workers={workers} must lie within elastic min_replicas.."
                         f"max_replicas ({elastic_spec.min_replicas}..{elastic_spec.max_replicas})")
    template = _pod_template(spec, spec.image, args, env, elastic)

    def replica(count: int):
        return models.KubeflowOrgV1ReplicaSpec(replicas=count, restart_policy="OnFailure", template=template)

    replicas = {"Master": replica(1)}
    if workers > 1:
        replicas["Worker"] = replica(workers - 1)
    gpus = spec.resources.gpu.count
    job_spec = models.KubeflowOrgV1PyTorchJobSpec(
        pytorch_replica_specs=replicas,
        # One process per GPU; one per pod on CPU ("auto" would start one per CPU core).
        nproc_per_node=str(gpus if gpus > 0 else 1),
        elastic_policy=models.KubeflowOrgV1ElasticPolicy(
            min_replicas=elastic_spec.min_replicas, max_replicas=elastic_spec.max_replicas,
            max_restarts=elastic_spec.max_restarts, rdzv_backend="c10d", rdzv_id=job_name,
        ) if elastic else None,
        run_policy=models.KubeflowOrgV1RunPolicy(
            active_deadline_seconds=spec.active_deadline_seconds,
            backoff_limit=spec.backoff_limit,
            # Free GPUs held by stragglers at the end, keep finished pods (and their logs) until
            # the job itself is deleted per keep_job.
            clean_pod_policy="Running",
        ),
    )
    return models.KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=k8s.V1ObjectMeta(name=job_name, namespace=spec.namespace,
                                  labels={**pods.labels(spec), **queue_labels(spec)},
                                  annotations=dict(annotations) if annotations else None),
        spec=job_spec,
    )


def build_pytorchjob(spec: TrainSpec, job_name: str, args: list[str], env: dict[str, str] | None = None,
                     annotations: dict[str, str] | None = None) -> dict:
    """The PyTorchJob for `spec` as a plain dict (camelCase, no nulls), as the API receives it."""
    return serialize(pytorchjob_model(spec, job_name, args, env, annotations))


def schema_problems(obj: dict) -> list[str]:
    return crds.schema_problems(obj, crds.PYTORCHJOB, "v1")


def policy_problems(obj: dict) -> list[str]:
    """What the CRD does not check: the operator's admission webhook and our own rules.
    Expects an object that passed `schema_problems`."""
    name = (obj.get("metadata") or {}).get("name") or ""
    spec = obj.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    # Pod and Service names are <name>-<type>-<index>.
    problems = pods.identity_problems(obj, API_VERSION, KIND, [
        f"{name}-{rtype.lower()}-{max(int(rspec.get('replicas', 1)) - 1, 0)}" for rtype, rspec in replicas.items()])
    if not replicas:
        problems.append("spec.pytorchReplicaSpecs: required")
    if "Master" in replicas and replicas["Master"].get("replicas") != 1:
        problems.append("spec.pytorchReplicaSpecs.Master.replicas: must be 1")
    if spec.get("elasticPolicy"):
        if "Worker" not in replicas:
            problems.append("spec.pytorchReplicaSpecs.Worker: required when elasticPolicy is set")
        ep = spec["elasticPolicy"]
        if ep.get("minReplicas", 1) > ep.get("maxReplicas", ep.get("minReplicas", 1)):
            problems.append("spec.elasticPolicy: minReplicas must be <= maxReplicas")
    clean = (spec.get("runPolicy") or {}).get("cleanPodPolicy")
    if clean is not None and clean not in CLEAN_POD_POLICIES:
        problems.append(f"spec.runPolicy.cleanPodPolicy: {clean!r} not one of {list(CLEAN_POD_POLICIES)}")
    for rtype, rspec in replicas.items():
        at = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            problems.append(f"{at}: replica type must be Master or Worker")
        if rspec.get("replicas", 1) < 1:
            problems.append(f"{at}.replicas: must be at least 1")
        if rspec.get("restartPolicy") not in RESTART_POLICIES:
            problems.append(f"{at}.restartPolicy: {rspec.get('restartPolicy')!r} not one of {list(RESTART_POLICIES)}")
        pod = (rspec.get("template") or {}).get("spec") or {}
        containers = pod.get("containers") or []
        if not any(ct.get("name") == CONTAINER_NAME for ct in containers):
            problems.append(f"{at}.template.spec.containers: needs a container named {CONTAINER_NAME!r}")
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
            problems.append(f"{at}.template.spec.securityContext: runAsNonRoot true and a non-zero runAsUser required")
        for i, ct in enumerate(containers):
            cat = f"{at}.template.spec.containers[{i}]"
            if not ct.get("image"):
                problems.append(f"{cat}.image: required")
            res = ct.get("resources") or {}
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(res.get(kind) or {})
                if missing:
                    problems.append(f"{cat}.resources.{kind}: {sorted(missing)} required")
            for key, value in (res.get("requests") or {}).items():
                if key.startswith("nvidia.com/") and (res.get("limits") or {}).get(key) != value:
                    problems.append(f"{cat}.resources: {key} request must equal its limit")
            if (ct.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cat}.securityContext.allowPrivilegeEscalation: must be false")
            for j, var in enumerate(ct.get("env") or []):
                if CREDENTIAL_ENV.search(var.get("name", "")) and "value" in var:
                    problems.append(f"{cat}.env[{j}]: {var['name']} carries a literal credential; "
                                    "use a Secret reference")
    return problems


def validate_pytorchjob(obj: dict) -> None:
    """Raise TrainingJobInvalid listing every problem with its JSON path; return None if valid.
    Our rules run once the schema holds, so they can rely on its types."""
    problems = schema_problems(obj) or policy_problems(obj)
    if problems:
        raise TrainingJobInvalid(KIND, problems)


class PyTorchJobBackend(ClusterBackend):
    """PyTorchJob through the Kubernetes gateway (`gateways.kube_api`): `kube`, else one on
    `client_configuration` (a `kubernetes.client.Configuration`), else on the pod's service account
    or the kubeconfig. The calls are the ones `kubeflow.training.TrainingClient` makes (create the
    custom object, poll its conditions, follow the master pod's `pytorch` container, delete)."""

    name, kind = "pytorchjob", KIND
    # The Training Operator's pod labels (kubeflow-training 1.9, constants.JOB_NAME_LABEL / JOB_ROLE_LABEL).
    JOB_NAME_LABEL, JOB_ROLE_LABEL = "training.kubeflow.org/job-name", "training.kubeflow.org/job-role"

    def __init__(self, spec: TrainSpec, log=print, *, kube: KubeApi | None = None,
                 client_configuration=None, **options):
        super().__init__(spec, log, **options)
        # Connected on first use: a dry run needs no cluster credentials.
        self.kube = kube or KubeApi(client_configuration)

    def build(self, name, args, env, annotations):
        return build_pytorchjob(self.spec, name, args, env, annotations)

    def validate(self, obj):
        validate_pytorchjob(obj)

    def create(self, obj):
        self.kube.create(PYTORCHJOBS, self.namespace, obj)  # the body we validated, byte for byte

    def wait(self, name, timeout, poll, on_poll: Callable[[dict], None]):
        def done(job: dict) -> bool:
            return any(c.get("type") in (self.SUCCEEDED, self.FAILED) and c.get("status") == "True"
                       for c in (job.get("status") or {}).get("conditions") or [])

        # Queued (suspended by Kueue until admitted) is waiting, not failing, and its time does
        # not count against `timeout` (training/backends/queueing.py).
        watch = QueueWatch(self.kind, name, self.spec.queue_name, self._say)
        job = wait_through_queue(
            lambda until, limit, seen: self.kube.wait_for(PYTORCHJOBS, self.namespace, name, until, timeout=limit,
                                                          poll=poll, on_poll=seen),
            done, timeout, watch, lambda j: on_poll(j.get("status") or {}))
        return job.get("status") or {}

    def follow_log(self, name):
        selector = f"{self.JOB_NAME_LABEL}={name},{self.JOB_ROLE_LABEL}=master"
        started = [p for p in self.kube.list_pods(self.namespace, selector)
                   if (p.get("status") or {}).get("phase") not in (None, "Pending")]
        if not started:
            return False
        for pod in started:
            pod_name = pod["metadata"]["name"]
            for line in self.kube.follow_log(self.namespace, pod_name, CONTAINER_NAME):
                self._say(f"[Pod {pod_name}]: {line}")
        return True

    def delete(self, name):
        self.kube.delete(PYTORCHJOBS, self.namespace, name)
