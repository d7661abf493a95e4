"""Pod Security `restricted` for every container Flywheel renders, and the cluster-scoped objects
that make the platform's own injected containers restricted too: our ClusterStorageContainer
(KServe's default has no securityContext) and ClusterTrainingRuntime (Trainer's default runs as
root). Each object is held to its vendored CRD; each checker fails on a planted violation."""
import copy
import dataclasses

import pytest
import yaml

import crds
from crds.hardening import container_restricted_problems, restricted_problems
from deployment.inferenceservice import COMPONENTS, ServedModel, render_for, to_dict
from fleet import runtimes, serving
from pipelines.arguments import train_spec
from pipelines.config import load_settings
from specs import TrainSpec
from tests.fleet.conftest import CLUSTER_ENVS, contexts
from training.backends.pytorchjob import build_pytorchjob
from training.backends.trainjob import build_trainjob

ARGS = ["--data", "s3://bucket/train/data.parquet", "--model-dir", "s3://bucket/train/model", "--spec", "{}"]
MODEL = ServedModel("credit-default", "7", "s3://flywheel-models/m-7/model")


def by_kind(ctx, kind: str) -> dict:
    (obj,) = [o for o in runtimes.platform_objects(ctx) if o["kind"] == kind]
    return obj


def runtime_pod(obj: dict) -> dict:
    (job,) = obj["spec"]["template"]["spec"]["replicatedJobs"]
    return job["template"]["spec"]["template"]["spec"]


# --- the two cluster-scoped objects ------------------------------------------------------------


def test_storage_container_is_restricted_and_holds_to_its_crd(fleet_ctx):
    obj = by_kind(fleet_ctx, "ClusterStorageContainer")
    assert obj["metadata"]["name"] == "flywheel-storage-initializer" and "namespace" not in obj["metadata"]
    assert crds.schema_problems(obj, runtimes.STORAGE_CONTAINER_CRD, "v1alpha1") == []
    container = obj["spec"]["container"]
    # No pod of its own: the container's context must carry everything (read-only root: see fleet/runtimes.py).
    assert container_restricted_problems(container, None, "spec.container", read_only_root=False) == []
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert obj["spec"]["workloadType"] == "initContainer"
    assert {"prefix": "s3://"} in obj["spec"]["supportedUriFormats"]


def test_storage_initializer_image_is_kserves_at_the_vendored_crd_tag():
    """The image and the CRD copies come from one KServe release."""
    recorded = yaml.safe_load(crds.UPSTREAM_MANIFEST.read_text())
    tag = runtimes.STORAGE_INITIALIZER_IMAGE.rsplit(":", 1)[1]
    assert recorded[runtimes.STORAGE_CONTAINER_CRD]["version"] == tag
    assert recorded[crds.INFERENCESERVICE]["version"] == tag


def test_training_runtime_is_restricted_runs_our_image_and_holds_to_its_crd(training_ctx):
    obj = by_kind(training_ctx, "ClusterTrainingRuntime")
    assert obj["metadata"]["name"] == "flywheel-torch-distributed"
    assert crds.schema_problems(obj, runtimes.TRAINING_RUNTIME_CRD, "v1alpha1") == []
    pod = runtime_pod(obj)
    assert restricted_problems(pod, "pod") == []
    (node,) = pod["containers"]
    assert node["name"] == "node" and node["image"] == training_ctx.image
    assert pod["automountServiceAccountToken"] is False
    assert node["resources"]["requests"]["cpu"] == str(training_ctx.training.resources.cpu)
    gpu = training_ctx.training.resources.gpu
    assert node["resources"]["limits"].get(gpu.resource) == str(gpu.count)
    # Trainer's webhook: the `trainer` ancestor job has replicas 1 and a container `node`.
    (job,) = obj["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["replicas"] == 1 and job["template"]["metadata"]["labels"] == runtimes.ANCESTOR_LABEL
    assert obj["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] == training_ctx.training.backoff_limit


def test_each_object_only_where_the_cluster_runs_its_part():
    ctx = contexts("prod")[0]
    serving_only = dataclasses.replace(ctx, cluster=ctx.cluster.model_copy(update={"runs": ["serving"]}))
    training_only = dataclasses.replace(ctx, cluster=ctx.cluster.model_copy(update={"runs": ["training"]}))
    assert [o["kind"] for o in runtimes.platform_objects(serving_only)] == ["ClusterStorageContainer"]
    assert [o["kind"] for o in runtimes.platform_objects(training_only)] == ["ClusterTrainingRuntime"]
    assert runtimes.objects(ctx) == []


def test_planted_schema_violations_fail_the_crds():
    ctx = contexts("dev")[0]
    runtime = by_kind(ctx, "ClusterTrainingRuntime")
    runtime["spec"]["mlPolicy"]["torch"]["numProcs"] = 2  # a typo the API server would prune silently
    assert any("numProcs" in p for p in crds.schema_problems(runtime, runtimes.TRAINING_RUNTIME_CRD, "v1alpha1"))
    container = by_kind(ctx, "ClusterStorageContainer")
    del container["spec"]["supportedUriFormats"]
    assert any("supportedUriFormats" in p
               for p in crds.schema_problems(container, runtimes.STORAGE_CONTAINER_CRD, "v1alpha1"))


def test_trainjob_must_name_our_runtime_in_a_restricted_namespace():
    ctx = contexts("prod")[0]
    assert ctx.training.runtime == runtimes.TRAINING_RUNTIME  # config/base.yaml names ours
    trainjob = dataclasses.replace(ctx, training=ctx.training.model_copy(
        update={"backend": "trainjob", "runtime": "torch-distributed"}))  # Trainer's default: root
    (problem,) = runtimes.runtime_problems(trainjob)
    assert "config/prod.yaml training.runtime" in problem and "flywheel-torch-distributed" in problem
    ours = dataclasses.replace(trainjob, training=trainjob.training.model_copy(
        update={"runtime": runtimes.TRAINING_RUNTIME}))
    assert runtimes.runtime_problems(ours) == []


# --- the checker itself -----------------------------------------------------------------------


@pytest.mark.parametrize("plant, rule", [
    (lambda c: c["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    (lambda c: c["securityContext"]["capabilities"].update(drop=[]), "capabilities.drop"),
    (lambda c: c["securityContext"]["capabilities"].update(add=["NET_ADMIN"]), "capabilities.add"),
    (lambda c: c["securityContext"].pop("seccompProfile"), "seccompProfile"),
    (lambda c: c["securityContext"].update(runAsUser=0), "runAsUser"),
    (lambda c: c["securityContext"].update(privileged=True), "privileged"),
    (lambda c: c["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
    (lambda c: c["securityContext"].pop("readOnlyRootFilesystem"), "readOnlyRootFilesystem"),
])
def test_planted_violation_fails_restricted(plant, rule):
    pod = copy.deepcopy(runtime_pod(by_kind(contexts("dev")[0], "ClusterTrainingRuntime")))
    pod["securityContext"].pop("seccompProfile")  # so the container's own settings decide
    pod["securityContext"].pop("runAsNonRoot")
    plant(pod["containers"][0])
    problems = restricted_problems(pod, "pod")
    assert len(problems) == 1 and f"pod.containers[0].securityContext.{rule}" in problems[0], problems


def test_an_injected_init_container_is_checked_too():
    pod = copy.deepcopy(runtime_pod(by_kind(contexts("dev")[0], "ClusterTrainingRuntime")))
    pod["initContainers"] = [{"name": "storage-initializer", "image": "kserve/storage-initializer:v0.20.0"}]
    problems = restricted_problems(pod, "pod", read_only_root=False)
    assert problems and all(p.startswith("pod.initContainers[0]") for p in problems)


# --- every container Flywheel renders ---------------------------------------------------------


@pytest.mark.parametrize("env", CLUSTER_ENVS)
@pytest.mark.parametrize("topology", ["single", "collocated", "separate"])
def test_every_inferenceservice_container_is_restricted(env, topology):
    """`flywheel deploy`'s object and the tree's (with its placement), predictor and transformer."""
    deployed = to_dict(render_for(load_settings(env, overrides={"serving": {"topology": topology}}), MODEL))
    tree = [o for ctx in contexts(env) for o in serving.objects(ctx) if o["kind"] == "InferenceService"]
    for obj in [deployed, *tree]:
        for component in COMPONENTS:
            if obj["spec"].get(component):
                assert restricted_problems(obj["spec"][component], f"spec.{component}") == []


def spec_for(env: str, **overrides) -> TrainSpec:
    return TrainSpec.model_validate(train_spec(load_settings(env)).model_dump() | overrides)


@pytest.mark.parametrize("env", CLUSTER_ENVS)
def test_every_pytorchjob_pod_is_restricted(env):
    job = build_pytorchjob(spec_for(env), f"flywheel-train-{env}", ARGS)
    for rtype, replica in job["spec"]["pytorchReplicaSpecs"].items():
        assert restricted_problems(replica["template"]["spec"], rtype) == []


@pytest.mark.parametrize("env", CLUSTER_ENVS)
def test_every_trainjob_pod_is_restricted_with_our_runtime(env):
    """The node pod is our runtime's template with the TrainJob's RuntimePatch over it: both restricted."""
    job = build_trainjob(spec_for(env, backend="trainjob", runtime=runtimes.TRAINING_RUNTIME), f"t-{env}", ARGS)
    assert job["spec"]["runtimeRef"]["name"] == runtimes.TRAINING_RUNTIME
    (patch,) = job["spec"]["runtimePatches"]
    (node_job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    patched = node_job["template"]["spec"]["template"]["spec"]
    assert restricted_problems({**patched, "containers": patched["containers"]}, "patch") == []
    assert restricted_problems(runtime_pod(by_kind(contexts(env)[0], "ClusterTrainingRuntime")), "runtime") == []
