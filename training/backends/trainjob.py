"""Distributed training on a cluster: a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1).

- `trainjob_model` renders the job from the TrainSpec with the `kubeflow_trainer_api` models (the
  API package the `kubeflow` SDK builds TrainJobs with), so field names come from the API.
- `validate_trainjob` parses the dict back into those models strictly (`openapi_models`) and
  applies the rules they cannot express: the CRD's CEL rules, Trainer's admission webhook and our
  security policy, so a bad job fails here and not half-scheduled on a GPU cluster.
- `TrainJobBackend` submits it through the Kubernetes gateway (`gateways.kube_api`), streams node 0's log,
  waits for `Complete`/`Failed`; the rest of the job's life is `ClusterBackend`'s.

How the job becomes pods (API: kubeflow/trainer pkg/apis/trainer/v1alpha1/trainjob_types.go):
the TrainJob references a ClusterTrainingRuntime (`training.runtime`, by default Trainer's
`torch-distributed`), whose JobSet template has a replicated job `node` with a container `node`.
`spec.trainer` sets that container's image, command, args, env and resources and the number of
nodes. Everything else a pod of ours needs (labels, annotations, non-root security contexts,
scratch volumes, GPU node selector, tolerations) goes in a RuntimePatch of replicated job `node`:
Trainer v2.2+ replaced PodTemplateOverrides with RuntimePatches (kubeflow/trainer#3309). Trainer's
webhook refuses env in a container patch of `node` (env is the Trainer API's), and `spec.trainer`
has no envFrom, so the object-store Secret's keys are referenced one by one (secretKeyRef).

Trainer's torch plugin (pkg/runtime/framework/plugins/torch/torch.go) gives the `node` container
PET_NNODES, PET_NPROC_PER_NODE (from numProcPerNode), PET_NODE_RANK, PET_MASTER_ADDR
(`<job>-node-0-0.<job>`) and PET_MASTER_PORT, and its webhook rejects a TrainJob that sets them;
torchrun reads PET_* as its flags, so the container command `torchrun --module training.train
ARGS` is the same as the PyTorchJob's.

What the PyTorchJob has and a TrainJob does not:
- elasticPolicy: Trainer has no elastic torchrun yet ("Add support for PyTorch elastic when JobSet
  supports Elastic Jobs", torch.go): numNodes is fixed at `training.workers`, `training.elastic`'s
  replica range is unused. A single-node job still restarts its workers in place
  (PET_MAX_RESTARTS = elastic.max_restarts), as a single-pod PyTorchJob does; a multi-node job's
  static rendezvous cannot re-form around one restarted node, so it gets none.
- runPolicy.backoffLimit: restarting the whole job is the runtime's JobSet `failurePolicy`, which a
  RuntimePatch cannot set (JobSetSpecPatch patches only replicatedJobs).
- runPolicy.cleanPodPolicy: finished pods stay until the TrainJob is deleted (keep_job).
- automountServiceAccountToken, imagePullPolicy: PodSpecPatch and ContainerPatch lack them; the
  runtime's pod template decides.
`activeDeadlineSeconds` is the TrainJob's own (Failed with reason DeadlineExceeded).
"""
from __future__ import annotations

from collections.abc import Callable

from kubeflow_trainer_api import models as api

import storage
from crds import hardening
from crds.hardening import CREDENTIAL_ENV
from gateways.kube_api import TRAINJOBS, KubeApi, serialize
from specs import TrainSpec
from training import pods
from training.backends.cluster import ClusterBackend, TrainingJobInvalid
from training.backends.jobs import ENTRY_MODULE, queue_labels
from training.backends.openapi_models import model_problems
from training.backends.queueing import QueueWatch, wait_through_queue

GROUP, KIND, API_VERSION = TRAINJOBS.group, TRAINJOBS.kind, TRAINJOBS.api_version
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
NODE = "node"  # the torch runtimes' replicated job, and its container, that `spec.trainer` configures
# Who owns our RuntimePatch: patches are keyed by manager (a list map), at most 16 of them
# (trainjob_types.go, TrainJobSpec.RuntimePatches).
PATCH_MANAGER = "flywheel/trainjob-backend"
MAX_RUNTIME_PATCHES = 16
ENTRY_COMMAND = ["torchrun", "--module", ENTRY_MODULE]
# Set by Trainer's torch plugin; its webhook rejects them in spec.trainer.env (torch.go Validate,
# constants.TorchRunReservedEnvNames).
TORCHRUN_RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
# The object-store Secret's keys (name -> optional), referenced one by one for lack of envFrom. The
# endpoint is in the Secret only for a non-AWS S3 (manifests/README.md), hence optional.
SECRET_KEYS = {**dict.fromkeys(storage.CREDENTIAL_KEYS, False), "AWS_ENDPOINT_URL": True}
# Labels JobSet puts on every pod; the kubeflow SDK finds a TrainJob's node pods by them
# (kubeflow 0.5.0, kubeflow/trainer/backends/kubernetes/constants.py: POD_LABEL_SELECTOR).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def _typed(model, obj):
    """A Kubernetes client model (what `training.pods` builds) as the trainer API's model of it."""
    return model.from_dict(serialize(obj))


def _trainer_env(spec: TrainSpec, env: dict[str, str] | None) -> list:
    """The trainer container's env: ours and `env` as values, the object-store Secret's keys by reference."""
    extra = {"PET_MAX_RESTARTS": str(spec.elastic.max_restarts)} if spec.workers == 1 else {}
    plain = pods.env_vars(env, extra)
    named = {var.name for var in plain}
    secret = [
        api.IoK8sApiCoreV1EnvVar(name=key, value_from=api.IoK8sApiCoreV1EnvVarSource(
            secret_key_ref=api.IoK8sApiCoreV1SecretKeySelector(name=pods.STORAGE_SECRET, key=key,
                                                               optional=optional or None)))
        for key, optional in SECRET_KEYS.items() if key not in named
    ]
    return [_typed(api.IoK8sApiCoreV1EnvVar, var) for var in plain] + secret


def _node_pod_patch(spec: TrainSpec):
    """What every node pod gets besides the trainer container's command, env and resources."""
    return api.TrainerV1alpha1PodTemplatePatch(
        metadata=api.IoK8sApimachineryPkgApisMetaV1ObjectMeta(labels=pods.labels(spec),
                                                              annotations=dict(pods.POD_ANNOTATIONS)),
        spec=api.TrainerV1alpha1PodSpecPatch(
            security_context=_typed(api.IoK8sApiCoreV1PodSecurityContext, hardening.pod_security()),
            node_selector=pods.node_selector(spec),
            tolerations=[_typed(api.IoK8sApiCoreV1Toleration, t) for t in pods.tolerations(spec) or []] or None,
            volumes=[_typed(api.IoK8sApiCoreV1Volume, v) for v in pods.volumes()],
            containers=[api.TrainerV1alpha1ContainerPatch(
                name=NODE,
                security_context=_typed(api.IoK8sApiCoreV1SecurityContext, hardening.container_security()),
                volume_mounts=[_typed(api.IoK8sApiCoreV1VolumeMount, v) for v in pods.volume_mounts()],
            )],
        ),
    )


def trainjob_model(spec: TrainSpec, job_name: str, args: list[str], env: dict[str, str] | None = None,
                   annotations: dict[str, str] | None = None) -> api.TrainerV1alpha1TrainJob:
    """The job as a `TrainerV1alpha1TrainJob` (what the kubeflow SDK's TrainerClient submits).

    Args:
        spec: The env's training spec plus image and namespace.
        job_name: The TrainJob's name (a DNS-1035 label; see `base.job_name`).
        args: The entry point's arguments (`--data ... --model-dir ... --spec ...`).
        env: Plain settings for the trainer container (never credentials).
        annotations: The TrainJob's annotations (e.g. the pipeline run).

    Returns:
        The typed TrainJob, not yet validated.

    Raises:
        ValueError: `args` is a command rather than arguments, or `env` holds a credential or a
            variable the operator or torchrun sets.
    """
    if args and not str(args[0]).startswith("-"):
        raise ValueError(f"args are the entry point's arguments (e.g. --data ...), got {args[0]!r}; "
                         f"the container runs {' '.join(ENTRY_COMMAND)} itself")
    gpus = spec.resources.gpu.count
    patch = api.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        training_runtime_spec=api.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=api.TrainerV1alpha1JobSetTemplatePatch(spec=api.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[
                api.TrainerV1alpha1ReplicatedJobPatch(name=NODE, template=api.TrainerV1alpha1JobTemplatePatch(
                    spec=api.TrainerV1alpha1JobSpecPatch(template=_node_pod_patch(spec)))),
            ])),
        ),
    )
    return api.TrainerV1alpha1TrainJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=api.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=job_name, namespace=spec.namespace, labels={**pods.labels(spec), **queue_labels(spec)},
            annotations=dict(annotations) if annotations else None),
        spec=api.TrainerV1alpha1TrainJobSpec(
            runtime_ref=api.TrainerV1alpha1RuntimeRef(api_group=GROUP, kind=RUNTIME_KINDS[0], name=spec.runtime),
            trainer=api.TrainerV1alpha1Trainer(
                image=spec.image,
                command=list(ENTRY_COMMAND),
                args=list(args),
                env=_trainer_env(spec, env),
                num_nodes=spec.workers,
                # One process per GPU; one per node on CPU (the runtime's "auto" would start one per core).
                num_proc_per_node=gpus if gpus > 0 else 1,
                resources_per_node=_typed(api.IoK8sApiCoreV1ResourceRequirements, pods.resources(spec)),
            ),
            runtime_patches=[patch],
            active_deadline_seconds=spec.active_deadline_seconds,
        ),
    )


def build_trainjob(spec: TrainSpec, job_name: str, args: list[str], env: dict[str, str] | None = None,
                   annotations: dict[str, str] | None = None) -> dict:
    """The TrainJob for `spec` as a plain dict, as the API receives it (camelCase, no nulls).

    `to_dict()` is the generated models' serializer (`model_dump(by_alias=True, exclude_none=True)`
    plus each nested model's own `to_dict()`); a bare `model_dump` would emit oneOf wrappers such
    as a Quantity as `{"actual_instance": ...}` instead of the value.
    """
    return trainjob_model(spec, job_name, args, env, annotations).to_dict()


def schema_problems(obj: dict) -> list[str]:
    """What parsing `obj` into the trainer API's TrainJob model rejects or would drop."""
    return model_problems(api.TrainerV1alpha1TrainJob, obj)


def _node_patches(spec: dict):
    """(JSON path, pod template patch) of every RuntimePatch of replicated job `node`."""
    for i, patch in enumerate(spec.get("runtimePatches") or []):
        jobs = ((((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {})
                .get("replicatedJobs") or [])
        for j, job in enumerate(jobs):
            if job.get("name") == NODE:
                at = f"spec.runtimePatches[{i}].trainingRuntimeSpec.template.spec.replicatedJobs[{j}]"
                template = ((job.get("template") or {}).get("spec") or {}).get("template") or {}
                yield f"{at}.template.spec.template", template


def policy_problems(obj: dict) -> list[str]:
    """What the models do not check: the CRD's CEL rules, Trainer's webhook and our own rules.
    Expects an object that passed `schema_problems`."""
    name = (obj.get("metadata") or {}).get("name") or ""
    spec = obj.get("spec") or {}
    trainer = spec.get("trainer") or {}
    # Node pods' hostnames are <name>-node-<job index>-<pod index> (one Job per replicated job).
    problems = pods.identity_problems(obj, API_VERSION, KIND,
                                      [f"{name}-{NODE}-0-{max(int(trainer.get('numNodes') or 1) - 1, 0)}"])
    ref = spec.get("runtimeRef") or {}
    if not ref.get("name"):
        problems.append("spec.runtimeRef.name: required")
    if ref.get("kind", RUNTIME_KINDS[0]) not in RUNTIME_KINDS:
        problems.append(f"spec.runtimeRef.kind: {ref.get('kind')!r} not one of {list(RUNTIME_KINDS)}")
    if ref.get("apiGroup", GROUP) != GROUP:
        problems.append(f"spec.runtimeRef.apiGroup: must be {GROUP}")
    if spec.get("activeDeadlineSeconds", 1) < 1:
        problems.append("spec.activeDeadlineSeconds: must be at least 1")
    if not trainer:
        problems.append("spec.trainer: required")
    if not trainer.get("image"):
        problems.append("spec.trainer.image: required")
    if trainer.get("command") != ENTRY_COMMAND:
        problems.append(f"spec.trainer.command: must be {ENTRY_COMMAND}")
    for key in ("numNodes", "numProcPerNode"):
        if trainer.get(key, 1) < 1:
            problems.append(f"spec.trainer.{key}: must be at least 1")
    res = trainer.get("resourcesPerNode") or {}
    for kind in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(res.get(kind) or {})
        if missing:
            problems.append(f"spec.trainer.resourcesPerNode.{kind}: {sorted(missing)} required")
    for key, value in (res.get("requests") or {}).items():
        if key.startswith("nvidia.com/") and (res.get("limits") or {}).get(key) != value:
            problems.append(f"spec.trainer.resourcesPerNode: {key} request must equal its limit")
    seen = set()
    for j, var in enumerate(trainer.get("env") or []):
        at, var_name = f"spec.trainer.env[{j}]", var.get("name", "")
        if var_name in seen:  # env is a list map keyed by name: the API server rejects duplicates
            problems.append(f"{at}: duplicate entry {var_name!r}")
        seen.add(var_name)
        if var_name in TORCHRUN_RESERVED_ENV:
            problems.append(f"{at}: {var_name} is set by Trainer's torch plugin; do not pass it")
        if CREDENTIAL_ENV.search(var_name) and "value" in var:
            problems.append(f"{at}: {var_name} carries a literal credential; use a Secret reference")
    patches = spec.get("runtimePatches") or []
    if len(patches) > MAX_RUNTIME_PATCHES:
        problems.append(f"spec.runtimePatches: at most {MAX_RUNTIME_PATCHES} patches")
    managers = [p.get("manager") for p in patches]
    for i, manager in enumerate(managers):
        if not manager or managers.index(manager) != i:
            problems.append(f"spec.runtimePatches[{i}].manager: {manager!r} must be set and unique")
    node_patches = list(_node_patches(spec))
    if not node_patches:
        problems.append(f"spec.runtimePatches: needs a patch of replicated job {NODE!r} (security, scheduling)")
    for at, template in node_patches:
        pod = template.get("spec") or {}
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
            problems.append(f"{at}.spec.securityContext: runAsNonRoot true and a non-zero runAsUser required")
        containers = pod.get("containers") or []
        if not any(ct.get("name") == NODE for ct in containers):
            problems.append(f"{at}.spec.containers: needs a patch of container {NODE!r} (its securityContext)")
        for i, ct in enumerate(containers):
            if ct.get("name") != NODE:
                continue
            cat = f"{at}.spec.containers[{i}]"
            if ct.get("env"):
                problems.append(f"{cat}.env: Trainer's webhook refuses env for container {NODE!r}; "
                                "use spec.trainer.env")
            if (ct.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cat}.securityContext.allowPrivilegeEscalation: must be false")
    return problems


def validate_trainjob(obj: dict) -> api.TrainerV1alpha1TrainJob:
    """Check `obj` against the trainer API's models and our rules.

    The models' strict parse runs first and our rules once it holds, so they can rely on its
    types; a clean dict is then parsed with the package's own `from_dict`, as the SDK reads it.

    Returns:
        The TrainJob parsed into `TrainerV1alpha1TrainJob`.

    Raises:
        TrainingJobInvalid: listing every problem with its JSON path.
    """
    problems = schema_problems(obj) or policy_problems(obj)
    if problems:
        raise TrainingJobInvalid(KIND, problems)
    return api.TrainerV1alpha1TrainJob.from_dict(obj)


class TrainJobBackend(ClusterBackend):
    """TrainJob through the Kubernetes gateway (`gateways.kube_api`): `kube`, else one on
    `client_configuration` (a `kubernetes.client.Configuration`), else on the pod's service
    account or the kubeconfig. The job is a custom object; node 0's log is its pod's."""

    name, kind = "trainjob", KIND
    # Trainer v2's terminal condition types (trainjob_types.go: TrainJobComplete, TrainJobFailed).
    SUCCEEDED, FAILED = "Complete", "Failed"

    def __init__(self, spec: TrainSpec, log=print, *, kube: KubeApi | None = None,
                 client_configuration=None, **options):
        super().__init__(spec, log, **options)
        # Connected on first use: a dry run needs no cluster credentials.
        self.kube = kube or KubeApi(client_configuration)

    def build(self, name, args, env, annotations):
        return build_trainjob(self.spec, name, args, env, annotations)

    def validate(self, obj):
        validate_trainjob(obj)

    def create(self, obj):
        self.kube.create(TRAINJOBS, self.namespace, obj)

    def wait(self, name, timeout, poll, on_poll: Callable[[dict], None]):
        def done(job: dict) -> bool:
            return any(c.get("type") in (self.SUCCEEDED, self.FAILED) and c.get("status") == "True"
                       for c in (job.get("status") or {}).get("conditions") or [])

        # Queued (suspended by Kueue until admitted) is waiting, not failing, and its time does
        # not count against `timeout` (training/backends/queueing.py).
        watch = QueueWatch(self.kind, name, self.spec.queue_name, self._say)
        job = wait_through_queue(
            lambda until, limit, seen: self.kube.wait_for(TRAINJOBS, self.namespace, name, until, timeout=limit,
                                                          poll=poll, on_poll=seen),
            done, timeout, watch, lambda j: on_poll(j.get("status") or {}))
        return job.get("status") or {}

    def follow_log(self, name):
        selector = f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={NODE},{COMPLETION_INDEX_LABEL}=0"
        started = [pod for pod in self.kube.list_pods(self.namespace, selector)
                   if (pod.get("status") or {}).get("phase") not in (None, "Pending")]
        if not started:
            return False
        # A restarted node 0 is a new pod: follow the newest (RFC 3339 times sort as strings).
        pod = max(started, key=lambda p: p["metadata"].get("creationTimestamp") or "")["metadata"]["name"]
        for line in self.kube.follow_log(self.namespace, pod, NODE):
            self._say(f"[Pod {pod}]: {line}")
        return True

    def delete(self, name):
        self.kube.delete(TRAINJOBS, self.namespace, name)
