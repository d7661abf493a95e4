"""The cluster half of training: the PyTorchJob we render per environment holds to the official
CRD schema and our rules, and the backend drives a job's life through the Kubernetes gateway (the
REST calls kubeflow-training's TrainingClient would make) against a fake API server that holds
requests to the same schema."""
import copy
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import crds
from gateways.kube_api import KubeApi
from pipelines.arguments import train_spec
from pipelines.config import load_settings
from specs import TrainSpec
from tests.fakes.kube_api_server import fake_k8s  # noqa: F401 (fixture)
from tests.fakes.kube_core import unknown_fields
from tests.fakes.kube_operators import JobScript
from tests.fakes.kube_pytorchjobs import crd_schema
from tests.support import ROOT
from training.backends import TrainingJob
from training.backends.cluster import TrainingJobFailed, TrainingJobInvalid
from training.backends.pytorchjob import PyTorchJobBackend, build_pytorchjob, validate_pytorchjob

ARGS = ["--data", "s3://bucket/train/data.parquet", "--model-dir", "s3://bucket/train/model", "--spec", "{}"]
CLUSTER_ENVS = ("dev", "staging", "prod")


def spec_for(env: str, **overrides) -> TrainSpec:
    """What the env's train task receives (image and namespace included), with overrides validated."""
    return TrainSpec.model_validate(train_spec(load_settings(env)).model_dump() | overrides)


def render(env: str, **overrides) -> dict:
    return build_pytorchjob(spec_for(env, **overrides), f"flywheel-train-{env}", ARGS)


def replicas(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]


def pytorch_container(job: dict, rtype: str = "Master") -> dict:
    (container,) = replicas(job)[rtype]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("env", CLUSTER_ENVS)
def test_every_cluster_environment_renders_a_valid_job(env):
    # Given the real config of a cluster environment
    settings = load_settings(env)
    # When its PyTorchJob is rendered
    job = render(env)
    # Then it validates against the CRD and our rules, with nothing the API server would prune
    validate_pytorchjob(job)
    assert unknown_fields(crd_schema(), job) == []
    assert job["metadata"]["namespace"] == settings.namespace
    # The job (not its pods) opts into the env's Kueue LocalQueue (fleet/queues.py).
    assert job["metadata"]["labels"] == {"app.kubernetes.io/part-of": "flywheel",
                                         "app.kubernetes.io/component": "training", "flywheel/env": env,
                                         "kueue.x-k8s.io/queue-name": "flywheel"}
    total = sum(r["replicas"] for r in replicas(job).values())
    assert total == settings.training.workers and replicas(job)["Master"]["replicas"] == 1
    for rtype, rspec in replicas(job).items():
        pod = rspec["template"]["spec"]
        container = pytorch_container(job, rtype)
        assert rspec["restartPolicy"] == "OnFailure"
        assert container["image"] == settings.image.ref and container["args"] == ARGS
        assert container["command"] == ["torchrun", "--module", "training.train"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"]
        assert container["envFrom"] == [{"secretRef": {"name": "flywheel-object-store"}}]
        assert pod["tolerations"] == [{k: v for k, v in t.items() if v is not None}
                                      for t in settings.training.model_dump()["tolerations"]]
    elastic = settings.training.elastic
    assert job["spec"]["elasticPolicy"] == {"minReplicas": elastic.min_replicas, "maxReplicas": elastic.max_replicas,
                                            "maxRestarts": elastic.max_restarts, "rdzvBackend": "c10d",
                                            "rdzvId": f"flywheel-train-{env}"}
    assert job["spec"]["runPolicy"] == {"activeDeadlineSeconds": settings.training.active_deadline_seconds,
                                        "backoffLimit": settings.training.backoff_limit, "cleanPodPolicy": "Running"}


def test_dev_asks_for_a_mig_slice():
    # Given dev's config (MIG 1g.5gb on A100-40GB)
    # When rendered
    job = render("dev")
    # Then each pod limits one MIG slice, requests == limits for cpu/memory, and pins the GPU product
    resources = pytorch_container(job)["resources"]
    assert resources["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/mig-1g.5gb": "1"}
    assert resources["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert "nvidia.com/gpu" not in resources["limits"]
    assert replicas(job)["Master"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}
    assert replicas(job)["Worker"]["replicas"] == 1


def test_prod_asks_for_whole_a100s_on_four_replicas():
    # Given prod's config (whole A100-80GB, 4 replicas)
    # When rendered
    job = render("prod")
    # Then 1 master + 3 workers, each limiting one whole GPU on an A100-80GB node, one process per GPU
    assert {t: r["replicas"] for t, r in replicas(job).items()} == {"Master": 1, "Worker": 3}
    for rtype in ("Master", "Worker"):
        assert pytorch_container(job, rtype)["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert replicas(job)[rtype]["template"]["spec"]["nodeSelector"] == {
            "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert job["spec"]["nprocPerNode"] == "1"
    assert job["metadata"]["namespace"] == "flywheel-prod"
    assert "@sha256:" in pytorch_container(job)["image"]


def test_a_single_replica_job_is_not_elastic_but_keeps_its_restarts():
    # Given one worker in total (the operator's elastic mode needs a Worker replica)
    job = render("dev", workers=1)
    # Then there is only a master, no elasticPolicy, and torchrun still gets max_restarts
    validate_pytorchjob(job)
    assert list(replicas(job)) == ["Master"] and "elasticPolicy" not in job["spec"]
    assert {"name": "PET_MAX_RESTARTS", "value": "3"} in pytorch_container(job)["env"]


@pytest.mark.parametrize("break_it, expected", [
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].pop("image"),
     "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].image: required"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(restartPolicy="Sometimes"),
     "spec.pytorchReplicaSpecs.Worker.restartPolicy: 'Sometimes' not one of"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas="one"),
     "spec.pytorchReplicaSpecs.Master.replicas: 'one' is not of type 'integer'"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].pop("name"),
     "spec.pytorchReplicaSpecs.Master.template.spec.containers[0]: 'name' is a required property"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"].update(nodeselector={}),
     "spec.pytorchReplicaSpecs.Master.template.spec.nodeselector: unknown field"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "HOME", "value": "/root"}),
     "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].env[7]: duplicate entry"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"].pop(
        "limits"),
     "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].resources.limits: ['cpu', 'memory'] required"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["securityContext"].update(
        runAsNonRoot=False),
     "spec.pytorchReplicaSpecs.Worker.template.spec.securityContext: runAsNonRoot true"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].update(name="main"),
     "spec.pytorchReplicaSpecs.Master.template.spec.containers: needs a container named 'pytorch'"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"].pop("Worker"),
     "spec.pytorchReplicaSpecs.Worker: required when elasticPolicy is set"),
    (lambda j: j["metadata"].update(name="Train_Job"), "metadata.name: 'Train_Job' must be a DNS-1035 label"),
])
def test_an_invalid_job_is_rejected_with_its_json_path(break_it, expected):
    # Given a valid dev job, broken in one place
    job = copy.deepcopy(render("dev"))
    break_it(job)
    # When validated / Then the error names the path
    with pytest.raises(TrainingJobInvalid) as err:
        validate_pytorchjob(job)
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_the_crd_itself_does_not_constrain_restart_policy():
    # Given a job whose only fault is an unknown restartPolicy
    job = copy.deepcopy(render("dev"))
    replicas(job)["Master"]["restartPolicy"] = "Sometimes"
    # Then the CRD schema lets it through: the enum check is ours (and this is why it exists)
    from training.backends.pytorchjob import schema_problems

    assert schema_problems(job) == []


def test_credentials_and_operator_variables_cannot_be_passed_as_env():
    spec = spec_for("dev")
    for env in ({"AWS_SECRET_ACCESS_KEY": "x"}, {"MASTER_ADDR": "x"}, {"PET_NNODES": "2"}):
        with pytest.raises(ValueError):
            build_pytorchjob(spec, "j", ARGS, env)
    with pytest.raises(ValueError, match="entry point's arguments"):
        build_pytorchjob(spec, "j", ["python", "-m", "training.train", *ARGS])


def test_crd_dir_can_be_moved_with_an_env_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_CRD_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="FLYWHEEL_CRD_DIR"):
        validate_pytorchjob(render("dev"))


INSTALLED_CHECK = """
import json, sys
from pathlib import Path
import crds
import training.backends.pytorchjob as pj
from training.backends.cluster import TrainingJobInvalid
site = Path(sys.argv[1]).resolve()
for module in (pj, crds):  # the wheel's copies, not the checkout's
    assert Path(module.__file__).resolve().is_relative_to(site), module.__file__
assert not (site.parent / "shared").exists()
job = json.load(sys.stdin)
pj.validate_pytorchjob(job)
assert crds.crd_dir().resolve().is_relative_to(site), crds.crd_dir()
job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
try:
    pj.validate_pytorchjob(job)
except TrainingJobInvalid as err:
    print("rejected:", err.problems[0])
else:
    raise SystemExit("a broken job passed: no schema was checked")
"""


def test_the_crd_schema_ships_in_the_wheel_and_validation_needs_nothing_else(tmp_path):
    # Given the package as the image installs it: a wheel built from pyproject.toml, unpacked
    # where neither the repository's crds/ folder nor FLYWHEEL_CRD_DIR exists
    root = ROOT
    source = tmp_path / "src"
    for package in ("specs", "storage", "crds", "model", "stages", "training", "serving", "monitoring", "components",
                    "pipelines"):  # what pyproject.toml packages
        shutil.copytree(root / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    build = subprocess.run([sys.executable, "-c",
                            "from setuptools import build_meta as b; print(b.build_wheel('dist'))"],
                           cwd=source, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = source / "dist" / build.stdout.strip().splitlines()[-1]
    assert f"crds/{crds.PYTORCHJOB}" in zipfile.ZipFile(wheel).namelist(), "the crds package data ships"
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_CRD_DIR"} | {"PYTHONPATH": str(site)}
    # When a rendered job is validated with that installed copy
    check = subprocess.run([sys.executable, "-c", INSTALLED_CHECK, str(site)], input=json.dumps(render("dev")),
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    # Then the packaged schema is found and applied: the good job passes, a broken one is rejected
    assert check.returncode == 0, check.stderr[-3000:]
    assert "rejected: spec.pytorchReplicaSpecs.Master.replicas" in check.stdout


def test_validation_defaults_to_the_packaged_crd(monkeypatch):
    monkeypatch.delenv("FLYWHEEL_CRD_DIR", raising=False)
    assert crds.crd_dir() == crds.PACKAGED_CRD_DIR == Path(crds.__file__).resolve().parent
    validate_pytorchjob(render("dev"))


# --- the backend, through the Kubernetes gateway against the fake API server ----------------


def launcher(api, keep_job="on_failure", **options) -> PyTorchJobBackend:
    spec = spec_for("dev", keep_job=keep_job)
    return PyTorchJobBackend(spec, kube=KubeApi(api.configuration()), poll_interval=0.02, log_drain_timeout=10,
                             **options)


def run(backend: PyTorchJobBackend, name: str, env: dict | None = None) -> dict:
    """Build and validate the job for ARGS, then run it through the backend's job life."""
    obj = build_pytorchjob(backend.spec, name, ARGS, env)
    validate_pytorchjob(obj)
    return backend.run(obj)


def submit(backend: PyTorchJobBackend, name: str) -> dict:
    """The whole train path (render, validate, stage, run, collect) for data already in the store."""
    return backend.train(TrainingJob(name, "s3://bucket/train/data.parquet", "s3://bucket/train/data.parquet", {}))


def test_a_successful_job_streams_the_master_log_and_is_deleted(fake_k8s, capsys):
    # Given an operator that takes the job through Created -> Running -> Succeeded
    fake_k8s.scripts["train-ok"] = JobScript(master_log=["epoch 1 val_roc_auc 0.71", "saved model"])
    # When the launcher runs it (keep_job on_failure)
    status = run(launcher(fake_k8s), "train-ok", {"FLYWHEEL_RUN": "r1"})
    # Then the job was created once, schema-clean, its master log reached our stdout, and it is gone
    (create,) = fake_k8s.calls("POST", "/pytorchjobs$")
    assert create.body["metadata"]["name"] == "train-ok" and fake_k8s.warnings == []
    assert {"name": "FLYWHEEL_RUN", "value": "r1"} in create.body["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"]["spec"]["containers"][0]["env"]
    out = capsys.readouterr().out
    assert "[Pod train-ok-master-0]: epoch 1 val_roc_auc 0.71" in out and "saved model" in out
    assert [c["type"] for c in status["conditions"] if c["status"] == "True"] == ["Created", "Succeeded"]
    assert fake_k8s.calls("DELETE", "/pytorchjobs/train-ok$") and not fake_k8s.jobs
    log_reads = fake_k8s.calls("GET", "/pods/train-ok-master-0/log$")
    assert log_reads and log_reads[0].query["container"] == "pytorch"


def test_a_failed_job_raises_the_operators_reason_and_is_kept(fake_k8s, capsys):
    # Given an operator that fails the job after it ran
    fake_k8s.scripts["train-bad"] = JobScript(
        steps=["Created", "Running", "Failed"], reason="BackoffLimitExceeded",
        message="PyTorchJob flywheel-dev/train-bad has failed because it has reached the specified backoff limit",
        master_log=["Traceback (most recent call last):", "RuntimeError: CUDA out of memory"])
    # When the launcher runs it (keep_job on_failure)
    with pytest.raises(TrainingJobFailed) as err:
        run(launcher(fake_k8s), "train-bad")
    # Then the error carries the operator's reason and message, the log was streamed, the job kept
    assert err.value.reason == "BackoffLimitExceeded" and "backoff limit" in err.value.message
    assert "BackoffLimitExceeded" in str(err.value)
    assert "CUDA out of memory" in capsys.readouterr().out
    assert not fake_k8s.calls("DELETE") and ("flywheel-dev", "train-bad") in fake_k8s.jobs


def test_a_job_that_never_finishes_times_out_and_is_deleted(fake_k8s):
    # Given an operator that leaves the job Running forever
    fake_k8s.scripts["train-stuck"] = JobScript(steps=["Created", "Running"])
    # When the launcher's wait runs out
    with pytest.raises(TrainingJobFailed) as err:
        run(launcher(fake_k8s, wait_timeout=0.3), "train-stuck")
    # Then it says so, and deletes the job so it stops holding GPUs (it did not fail: nothing to read)
    assert err.value.reason == "Timeout"
    assert fake_k8s.calls("DELETE", "/pytorchjobs/train-stuck$") and not fake_k8s.jobs


@pytest.mark.parametrize("keep_job, steps, deleted", [
    ("always", ["Created", "Running", "Succeeded"], False),
    ("never", ["Created", "Running", "Failed"], True),
])
def test_keep_job_policy(fake_k8s, keep_job, steps, deleted):
    fake_k8s.scripts["train-policy"] = JobScript(steps=steps, master_log=[])
    try:
        run(launcher(fake_k8s, keep_job=keep_job), "train-policy")
    except TrainingJobFailed:
        assert steps[-1] == "Failed"
    assert bool(fake_k8s.calls("DELETE")) is deleted


def test_the_fake_api_server_rejects_what_the_crd_rejects(fake_k8s):
    # Given a job the CRD schema rejects, sent straight through the Kubernetes client
    from kubernetes import client

    job = copy.deepcopy(render("dev"))
    replicas(job)["Master"]["replicas"] = "one"
    api = client.CustomObjectsApi(client.ApiClient(fake_k8s.configuration()))
    # Then it answers 422 Invalid naming the field, and a missing job is a 404 Status
    with pytest.raises(client.ApiException) as err:
        api.create_namespaced_custom_object("kubeflow.org", "v1", "flywheel-dev", "pytorchjobs", job)
    assert err.value.status == 422
    body = yaml.safe_load(err.value.body)
    assert body["reason"] == "Invalid"
    assert body["details"]["causes"][0]["field"] == "spec.pytorchReplicaSpecs.Master.replicas"
    with pytest.raises(client.ApiException) as err:
        api.get_namespaced_custom_object("kubeflow.org", "v1", "flywheel-dev", "pytorchjobs", "nope")
    assert err.value.status == 404 and yaml.safe_load(err.value.body)["reason"] == "NotFound"


def test_an_invalid_job_never_reaches_the_api_server(fake_k8s):
    with pytest.raises(TrainingJobInvalid):
        submit(launcher(fake_k8s), "Bad_Name")
    assert fake_k8s.requests == []


def test_an_unexpected_error_while_submitting_is_a_one_line_training_failure(fake_k8s, monkeypatch, tmp_path):
    # Given a backend that cannot find its CRD schema (any unexpected error while submitting)
    monkeypatch.setenv("FLYWHEEL_CRD_DIR", str(tmp_path))
    # When it trains a job
    with pytest.raises(TrainingJobFailed) as err:
        submit(launcher(fake_k8s), "train-no-crd")
    # Then the failure is a TrainingJobFailed with a one-line reason, and nothing reached the cluster
    assert err.value.reason == "CreateFailed"
    assert err.value.message.startswith("FileNotFoundError: ") and "FLYWHEEL_CRD_DIR" in err.value.message
    assert "\n" not in str(err.value)
    assert fake_k8s.requests == []


def test_an_api_error_on_create_is_a_one_line_training_failure(fake_k8s, monkeypatch):
    # Given an API server that refuses the create (here a 403 from RBAC)
    from kubernetes.client import ApiException

    def forbidden(*args, **kwargs):
        raise ApiException(status=403, reason="Forbidden")

    from kubernetes.client import CustomObjectsApi

    backend = launcher(fake_k8s)
    monkeypatch.setattr(CustomObjectsApi, "create_namespaced_custom_object", forbidden)
    with pytest.raises(TrainingJobFailed) as err:
        run(backend, "train-forbidden")
    assert err.value.reason == "CreateFailed" and "403" in err.value.message and "Forbidden" in err.value.message
    assert "\n" not in str(err.value)


# --- CLI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", CLUSTER_ENVS)
def test_train_dry_run_prints_the_job_for_the_env(env):
    import pipelines.cli as cli

    # When `flywheel train --env ENV --dry-run` runs
    result = CliRunner().invoke(cli.app, ["train", "--env", env, "--dry-run"])
    # Then it prints one valid PyTorchJob with the env's image, namespace and object-store URIs
    assert result.exit_code == 0, result.output
    job = yaml.safe_load(result.output)
    validate_pytorchjob(job)
    settings = load_settings(env)
    container = pytorch_container(job)
    assert job["metadata"]["namespace"] == settings.namespace and container["image"] == settings.image.ref
    bucket = settings.kfp.pipeline_root.split("/")[2]
    data = container["args"][container["args"].index("--data") + 1]
    model = container["args"][container["args"].index("--model-dir") + 1]
    staging = f"{train_spec(settings).staging_uri}/{job['metadata']['name']}/"  # the job's prefix in the store
    assert data.startswith(f"s3://{bucket}/") and data.startswith(staging) and data.endswith(".parquet")
    assert model.startswith(f"s3://{bucket}/") and model.startswith(staging)


def test_train_dry_run_refuses_the_local_environment():
    import pipelines.cli as cli

    result = CliRunner().invoke(cli.app, ["train", "--env", "local", "--dry-run"])
    assert result.exit_code == 1 and "torchrun" in result.output
