"""ClusterStorageContainer and ClusterTrainingRuntime that meet Pod Security `restricted`.

Why our own (both cluster-scoped, FEATURE "restricted"):

- KServe's `default` ClusterStorageContainer (kserve v0.20.0 config/storagecontainers/default.yaml)
  has no securityContext, so an injected storage-initializer breaks `restricted` (kserve#5373,
  fix proposed in kserve#5855; the v0.20 Helm chart adds one but without seccomp).
  `flywheel-storage-initializer` is a drop-in: KServe's image at the same tag, the same
  supportedUriFormats, a restricted securityContext. How KServe picks one (v0.20.0
  pkg/webhook/admission/pod/storage_initializer_injector.go, GetStorageContainerSpec): by name
  when the InferenceService sets `spec.predictor.storageContainerName` (new in v0.20), else the
  first enabled initContainer-type one in a List of all of them, whose order is the informer
  cache's (unspecified): with `default` also matching s3://, ours wins only by name, or when the
  cluster admin sets `disabled: true` on `default`. Flywheel's own InferenceService needs neither:
  it passes no storageUri (ModelServer loads `--model_dir` itself), so KServe injects no
  storage-initializer into it at all.
  No readOnlyRootFilesystem here: the container is merged into other tenants' pods too, so it
  cannot mount a scratch volume of its own, and KServe's storage code writes temp files
  (tempfile.mkdtemp for HDFS secrets, the combined CA bundle) to the root filesystem.
- Trainer's `torch-distributed` ClusterTrainingRuntime (kubeflow/trainer v2.3.0
  manifests/base/runtimes/torch_distributed.yaml) sets no securityContext and its image
  (pytorch/pytorch) runs as root (trainer#3702). `flywheel-torch-distributed` runs our image as
  uid 10001 with the same hardening as the TrainJob's RuntimePatch (training/pods.py), no
  service-account token (a RuntimePatch cannot set that: training/backends/trainjob.py), and the
  JobSet restart budget `training.backoff_limit` (which a RuntimePatch cannot set either).
  A TrainJob uses it when `training.runtime` names it.
"""
from __future__ import annotations

from kubernetes import client as k8s

from crds import hardening
from fleet.context import FleetContext
from gateways.kube_api import serialize
from training import pods

FEATURE: str | None = "restricted"
SCOPE = "cluster"  # each object only where the cluster runs its part (and has the CRD): ctx.runs

STORAGE_CONTAINER = "flywheel-storage-initializer"
STORAGE_CONTAINER_CRD, STORAGE_CONTAINER_VERSION = "serving.kserve.io_clusterstoragecontainers.yaml", "v1alpha1"
# The image KServe v0.20.0 itself injects (Helm: kserve.storage.image, tag = kserve.version).
STORAGE_INITIALIZER_IMAGE = "kserve/storage-initializer:v0.20.0"
STORAGE_INITIALIZER_UID = 1000  # the image's `USER 1000` (python/storage-initializer.Dockerfile)
# The default ClusterStorageContainer's formats, so ours can stand in for it wherever it is picked.
SUPPORTED_URI_FORMATS = [{"prefix": p} for p in ("gs://", "s3://", "hdfs://", "hf://", "webhdfs://")] + [
    {"regex": r} for r in ("https://(.+?).blob.core.windows.net/(.+)", "https://(.+?).file.core.windows.net/(.+)",
                           "https?://(.+)/(.+)")]

TRAINING_RUNTIME = "flywheel-torch-distributed"
TRAINING_RUNTIME_CRD, TRAINING_RUNTIME_VERSION = "trainer.kubeflow.org_clustertrainingruntimes.yaml", "v1alpha1"
NODE = "node"  # Trainer's torch plugin configures replicated job `node`, container `node` (trainjob.py)
# Trainer's webhook requires, on a replicated job with this label, replicas 1 and a container `node`
# (kubeflow/trainer v2.3.0 pkg/webhooks/trainingruntime_webhook.go validateReplicatedJobs).
ANCESTOR_LABEL = {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}


def objects(ctx: FleetContext) -> list[dict]:
    return []


def storage_container(ctx: FleetContext) -> dict:
    """KServe's storage-initializer as a restricted ClusterStorageContainer. Requests = limits: an
    init container below the app containers' requests would cost a Guaranteed pod its QoS class."""
    security = hardening.container_security()
    security.read_only_root_filesystem = False  # see the module docstring
    security.run_as_user = security.run_as_group = STORAGE_INITIALIZER_UID
    container = k8s.V1Container(name="storage-initializer", image=STORAGE_INITIALIZER_IMAGE,
                                image_pull_policy="IfNotPresent", resources=hardening.resources("1", "1Gi"),
                                security_context=security)
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ClusterStorageContainer",
            "metadata": {"name": STORAGE_CONTAINER, "labels": dict(ctx.labels)},
            "spec": {"container": serialize(container), "supportedUriFormats": SUPPORTED_URI_FORMATS,
                     "workloadType": "initContainer", "supportsMultiModelDownload": True}}


def _node_pod(ctx: FleetContext) -> k8s.V1PodSpec:
    res = ctx.training.resources
    gpus = {res.gpu.resource: str(res.gpu.count)} if res.gpu.count > 0 else None
    node = k8s.V1Container(name=NODE, image=ctx.image, image_pull_policy="IfNotPresent",
                           env=pods.env_vars(None), resources=hardening.resources(res.cpu, res.memory, gpus),
                           security_context=hardening.container_security(), volume_mounts=pods.volume_mounts())
    return k8s.V1PodSpec(containers=[node], security_context=hardening.pod_security(), volumes=pods.volumes(),
                         automount_service_account_token=False)


def training_runtime(ctx: FleetContext) -> dict:
    """Trainer's torch runtime, restricted: our image, non-root, read-only root, no API token."""
    job = {"name": NODE, "replicas": 1,
           "template": {"metadata": {"labels": dict(ANCESTOR_LABEL)},
                        "spec": {"template": {"metadata": {"labels": dict(ctx.labels)},
                                              "spec": serialize(_node_pod(ctx))}}}}
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
            "metadata": {"name": TRAINING_RUNTIME, "labels": {"trainer.kubeflow.org/framework": "torch",
                                                              **ctx.labels}},
            "spec": {"mlPolicy": {"numNodes": 1, "torch": {}},
                     "template": {"spec": {"failurePolicy": {"maxRestarts": ctx.training.backoff_limit},
                                           "replicatedJobs": [job]}}}}


def platform_objects(ctx: FleetContext) -> list[dict]:
    """The storage container where the cluster serves, the training runtime where it trains."""
    out = []
    if ctx.runs("serving"):
        out.append(storage_container(ctx))
    if ctx.runs("training"):
        out.append(training_runtime(ctx))
    return out


def runtime_problems(ctx: FleetContext) -> list[str]:
    """Config that would put a root pod in a restricted namespace: a TrainJob backend whose
    `training.runtime` is not ours (Trainer's default runs as root)."""
    if (ctx.fleet.pod_security == "restricted" and ctx.training.backend == "trainjob"
            and ctx.training.runtime != TRAINING_RUNTIME):
        return [f"config/{ctx.env}.yaml training.runtime: {ctx.training.runtime!r} in a restricted namespace; "
                f"set {TRAINING_RUNTIME!r} (Trainer's default runtime runs as root: kubeflow/trainer#3702)"]
    return []
