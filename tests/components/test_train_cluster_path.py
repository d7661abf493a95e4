"""The cluster path of the train and tuning components, end to end short of a cluster.

`components.train.train_op` and `components.tune.trial_op` run with the pytorchjob backend, unpatched
except for where the backend finds its API server: the Kubernetes gateway talks to the fake
Kubernetes API (tests/fakes/kube_api_server.py, which holds every job to the CRD schema), and the object
store is a real S3 API server on loopback (moto), reached the way pods and pipeline tasks reach
MinIO (AWS_ENDPOINT_URL and the AWS_* keys of the object-store Secret).

The job behaves like its pods: when the fake operator moves a job to Running, the master pod's
container is started for real - the training entry point with the job's own arguments, in its own
process, with the container's env and the Secret's keys - and the job stays Running until that
process exits. It then Succeeds, or Fails with the operator's BackoffLimitExceeded. (The pod runs
`python -m training.train ARGS` rather than the container's `torchrun --module training.train
ARGS`: one process, as torchrun would start with PET_NPROC_PER_NODE=1; the torchrun wrapper itself
is covered by tests/storage/test_storage_s3.py and tests/training/test_training.py.)
"""
import io
import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from kfp import dsl

import training.backends.pytorchjob as pytorchjob
from components import tune
from components.factory import component
from components.train import train_op
from crds.hardening import DNS1035
from model.loader import load_model
from pipelines.arguments import train_spec as env_train_spec
from pipelines.arguments import training_arguments as arguments
from pipelines.config import load_settings
from stages.dataset import ReferenceTask
from tests.fakes.kube_api_server import fake_k8s  # noqa: F401 (fixture)
from tests.fakes.kube_operators import JobScript
from tests.support import CREDENTIALS, ROOT, keys
from training.backends.cluster import TrainingJobFailed
from training.backends.jobs import JOB_NAME_MAX, job_name
from training.backends.pytorchjob import build_pytorchjob, validate_pytorchjob

MODEL_FILES = {"model.pt", "preprocessor.json", "metadata.json"}
DATA_HASH = "sha256:0f1e2d3c4b5a"


# --- job names ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, run_id, parts", [
    # KFP run ids are UUIDs; fixed ones keep the test ids stable (pytest-xdist collects per worker)
    ("trial", "d28aba9e-7843-429d-9c01-d4faba2c7909", (0, "r1")),
    ("trial", "9bfa4230-4c33-4e67-b107-c1c0d415270c", (12, "r3")),
    ("train", "46e4ef9a-b27e-4fda-a83a-71fe718c9eb9", ()),
    ("Train_Stage", "Run.ID_with UPPER/and/slashes", ("Part_One", "--", "")),
    ("train", "x" * 300, ("a-very-long-part-" * 6, 99999)),
    ("", "", ()),
])
def test_job_names_are_dns_1035_labels_that_fit_the_operators_pod_names(kind, run_id, parts):
    name = job_name(kind, run_id, *parts)
    assert DNS1035.match(name) and len(name) <= JOB_NAME_MAX, name
    # The operator's longest pod/service name for a 4-replica job is what the policy checks.
    spec = env_train_spec(load_settings("prod")).model_copy(update={"image": "registry.example/flywheel:1"})
    assert spec.namespace == "flywheel-prod"
    validate_pytorchjob(build_pytorchjob(spec, name, ["--data", "s3://b/d", "--model-dir", "s3://b/m", "--spec", "{}"]))


def test_job_names_differ_per_run_per_part_and_per_attempt():
    run_id = str(uuid.uuid4())  # what KFP passes: the old 52-character cut left "flywheel-trial-<uuid>-"
    stem = lambda name: name.rsplit("-", 1)[0]
    first, second = job_name("trial", run_id, 0, "r1"), job_name("trial", run_id, 1, "r1")
    assert stem(first) != stem(second) and stem(first) != stem(job_name("trial", run_id, 0, "r3"))
    assert stem(first) != stem(job_name("trial", str(uuid.uuid4()), 0, "r1"))
    again = {job_name("trial", run_id, 0, "r1") for _ in range(20)}
    assert {stem(n) for n in again} == {stem(first)}, "the same task of the same run keeps its readable name"
    assert len(again) == 20, "every attempt gets its own job, so a kept failed job never blocks a re-run"
    assert first.startswith("flywheel-trial-") and "-0-r1-" in first


def test_select_op_takes_an_optional_screened_list_without_a_mutable_default():
    # KFP 2.17 compiles Optional[list] = None to an optional LIST input with no default value.
    spec = component(tune.select_op, "").component_spec
    assert spec.inputs["screened"].optional is True and spec.inputs["screened"].default is None


# --- the cluster path -----------------------------------------------------------------------


class PodRunner:
    """The operator's pods for the fake API: a job that reaches Running gets its master container
    started as a process; the job leaves Running only when that process has exited."""

    def __init__(self, api, env: dict, log_dir: Path):
        self.api, self.env, self.log_dir = api, env, log_dir
        self.pods: dict[str, subprocess.Popen] = {}
        self.containers: dict[str, dict] = {}
        self._advance = api._advance

    def advance(self, job) -> None:  # called by the fake under its lock, on each GET of the job
        name = job.obj["metadata"]["name"]
        pod = self.pods.get(name)
        if pod is not None and job.script.steps[job.step] == "Running":
            if pod.poll() is None:
                return  # still training: the job stays Running
            if pod.returncode != 0:  # the master failed (and, on a cluster, kept failing)
                job.script = replace(job.script, steps=[*job.script.steps[:job.step + 1], "Failed"],
                                     reason="BackoffLimitExceeded",
                                     message=f"PyTorchJob {job.obj['metadata']['namespace']}/{name} has failed because "
                                             f"it has reached the specified backoff limit")
        self._advance(job)
        if job.script.steps[job.step] == "Running" and name not in self.pods:
            self.pods[name] = self.start(name, job.obj)

    def start(self, name: str, obj: dict) -> subprocess.Popen:
        (container,) = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
        assert container["command"] == ["torchrun", "--module", "training.train"]
        assert container["envFrom"] == [{"secretRef": {"name": "flywheel-object-store"}}]
        self.containers[name] = container
        env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}, **self.env,  # Secret keys
               "HOME": str(self.log_dir), "XDG_CACHE_HOME": str(self.log_dir / ".cache"), "OMP_NUM_THREADS": "1"}
        # The pod writes through its own copy of the descriptor, so ours can close once it has started.
        with open(self.log_dir / f"{name}.log", "w") as log:
            return subprocess.Popen([sys.executable, "-m", "training.train", *container["args"]], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else "(no pod log)"

    def stop(self) -> None:
        for pod in self.pods.values():
            if pod.poll() is None:
                pod.kill()
            pod.wait()


@pytest.fixture
def cluster(fake_k8s, s3_env, monkeypatch, tmp_path):
    """The backend reaches the fake API server through its documented `client_configuration`
    (instead of the in-cluster service account), polling fast; the fake's jobs run real pods."""
    original = pytorchjob.PyTorchJobBackend

    class Backend(original):
        def __init__(self, spec, log=print, **options):
            options.setdefault("client_configuration", fake_k8s.configuration())
            options.setdefault("poll_interval", 0.05)
            options.setdefault("wait_timeout", 180)
            options.setdefault("log_drain_timeout", 10)
            super().__init__(spec, log, **options)

    monkeypatch.setattr(pytorchjob, "PyTorchJobBackend", Backend)  # what backend_for looks up
    (tmp_path / "pods").mkdir()
    runner = PodRunner(fake_k8s, {k: s3_env[k] for k in CREDENTIALS}, tmp_path / "pods")
    monkeypatch.setattr(fake_k8s, "_advance", runner.advance)
    fake_k8s.default_script = JobScript(master_log=[])  # the pod's real output is in runner.log
    yield fake_k8s, runner
    runner.stop()


@pytest.fixture
def pipeline_inputs(bucket):
    """What the train and trial tasks receive on dev, pointed at the loopback bucket: the
    train_spec the compiled pipeline passes, and the split's train_data artifact in the store."""
    name, client = bucket
    buffer = io.BytesIO()
    ReferenceTask(rows=2000, seed=5).generate().to_parquet(buffer, index=False)
    key = "pipelines/flywheel-training/run/split/train_data"  # KFP artifact paths have no extension
    client.put_object(Bucket=name, Key=key, Body=buffer.getvalue())
    args = arguments(load_settings("dev"))
    # One CPU pod: the "pods" run on this machine (dev's MIG slice would make the entry point
    # refuse to start without a GPU, as it should).
    train_spec = args["train_spec"] | {"workers": 1, "staging_uri": f"minio://{name}/pipelines/flywheel-jobs"}
    train_spec["resources"] = train_spec["resources"] | {"gpu": {"count": 0}}
    train_spec["hyperparameters"] = train_spec["hyperparameters"] | {"epochs": 2}
    train_data = dsl.Dataset(uri=f"minio://{name}/{key}", metadata={"content_hash": DATA_HASH, "source_hash": "src"})
    return train_spec, args["dataset_spec"], args["tuning_spec"], train_data


def created_jobs(api) -> list[dict]:
    return [call.body for call in api.calls("POST", "/pytorchjobs$")]


def arg(container: dict, flag: str) -> str:
    return container["args"][container["args"].index(flag) + 1]


@pytest.mark.slow
@pytest.mark.parametrize("model_dir_exists", [False, True], ids=["parent-only", "dir-exists"])
def test_train_collects_the_pods_model_flat_into_the_artifact_and_drops_the_staging(
        cluster, pipeline_inputs, bucket, tmp_path, model_dir_exists):
    api, pods = cluster
    bucket_name, client = bucket
    train_spec, dataset_spec, _, train_data = pipeline_inputs
    run_id = str(uuid.uuid4())
    # Given the Model output as KFP hands it over (it creates the parent; here also the dir itself)
    (tmp_path / "outputs").mkdir()
    model = dsl.Model(uri=str(tmp_path / "outputs" / "model"))
    if model_dir_exists:
        os.makedirs(model.path)
    # When the train task launches its PyTorchJob
    score = train_op(train_data, train_spec, dataset_spec, run_id, model)
    # Then one schema-clean job with a DNS-1035 name ran, its pod writing to the job's staging prefix
    (job,) = created_jobs(api)
    name = job["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= JOB_NAME_MAX and name.startswith("flywheel-train-"), name
    assert job["metadata"]["annotations"]["flywheel/pipeline-run"] == run_id, "traceable from kubectl"
    assert api.warnings == []
    staging = f"{train_spec['staging_uri']}/{name}/model"
    assert arg(pods.containers[name], "--model-dir") == staging
    assert arg(pods.containers[name], "--data") == train_data.uri
    assert pods.pods[name].returncode == 0, pods.log(name)
    # ... the model files landed flat in the artifact directory, with the lineage in both metadata
    assert set(os.listdir(model.path)) == MODEL_FILES
    written = json.loads(Path(model.path, "metadata.json").read_text())
    assert written["job_name"] == name and written["data_hash"] == DATA_HASH and written["pipeline_run"] == run_id
    assert model.metadata["job_name"] == name and model.metadata["data_hash"] == DATA_HASH
    assert model.metadata["backend"] == "pytorchjob" and model.metadata["metrics"]["epochs_run"] == 2
    assert score == written["metrics"]["val_roc_auc"] and 0.5 < score <= 1.0
    scores = load_model(model.path).predict_proba(ReferenceTask(rows=50, seed=1).generate())
    assert scores.shape == (50,)
    # ... the staging prefix is gone from the bucket (the input data stays), and so is the job
    assert keys(client, bucket_name, "pipelines/flywheel-jobs/") == set()
    assert keys(client, bucket_name, "pipelines/flywheel-training/") == {"run/split/train_data"}
    assert api.calls("DELETE", f"/pytorchjobs/{name}$") and not api.jobs


@pytest.mark.slow
def test_parallel_trials_of_one_run_get_their_own_jobs_and_leave_no_scratch(cluster, pipeline_inputs, bucket):
    api, pods = cluster
    bucket_name, client = bucket
    train_spec, dataset_spec, tuning_spec, train_data = pipeline_inputs
    tuning_spec = tuning_spec | {"epochs_per_trial": 1}
    run_id = str(uuid.uuid4())
    # When two trials of one pipeline run train side by side (dsl.ParallelFor)
    trials = [{"trial": 0, "params": {"hidden": 8.0}}, {"trial": 1, "params": {"hidden": 16.0}}]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda t: tune.trial_op(train_data, train_spec, dataset_spec, tuning_spec, t, run_id),
                                trials))
    # Then each had its own valid job (no 409, no trailing '-'), the hyperparameters in its pod's spec
    names = [job["metadata"]["name"] for job in created_jobs(api)]
    assert len(names) == 2 and len(set(names)) == 2, names
    for name in names:
        assert DNS1035.match(name) and len(name) <= JOB_NAME_MAX and name.startswith("flywheel-trial-"), name
        assert pods.pods[name].returncode == 0, pods.log(name)
        assert arg(pods.containers[name], "--model-dir") == f"{train_spec['staging_uri']}/{name}/model"
    hidden = {json.loads(arg(pods.containers[n], "--spec"))["hyperparameters"]["hidden"] for n in names}
    assert hidden == {8, 16}
    # ... the metrics came back from the models the pods wrote
    assert [r["trial"] for r in results] == [0, 1] and [r["params"] for r in results] == [{"hidden": 8}, {"hidden": 16}]
    for result in results:
        assert result["epochs"] == 1 and 0.0 <= result["val_roc_auc"] <= 1.0 and result["val_loss"] > 0
    # ... and the trial models, scratch, are gone from the bucket, as are the finished jobs
    assert keys(client, bucket_name, "pipelines/flywheel-jobs/") == set()
    assert not api.jobs


@pytest.mark.slow
def test_a_failing_job_raises_the_operators_reason_and_leaves_the_artifact_empty(
        cluster, pipeline_inputs, bucket, tmp_path):
    api, pods = cluster
    train_spec, dataset_spec, _, train_data = pipeline_inputs
    # Given training data the pods cannot read: the master fails until the backoff limit
    missing = dsl.Dataset(uri=train_data.uri + "-missing", metadata=train_data.metadata)
    model = dsl.Model(uri=str(tmp_path / "model"))
    # When the train task launches its job
    with pytest.raises(TrainingJobFailed) as err:
        train_op(missing, train_spec, dataset_spec, str(uuid.uuid4()), model)
    # Then the error carries the operator's reason, the pod really failed, and the job is kept
    (job,) = created_jobs(api)
    name = job["metadata"]["name"]
    assert err.value.reason == "BackoffLimitExceeded" and err.value.job_name == name
    assert "backoff limit" in str(err.value)
    assert pods.pods[name].returncode != 0 and "FileNotFoundError" in pods.log(name)
    assert (train_spec["namespace"], name) in api.jobs and not api.calls("DELETE")
    assert not os.path.exists(model.path) or os.listdir(model.path) == []
    # A re-run of the task (same run id) gets a job of its own instead of a 409 on the kept one.
    with pytest.raises(TrainingJobFailed):
        train_op(missing, train_spec, dataset_spec, "same-run", dsl.Model(uri=str(tmp_path / "again")))
    with pytest.raises(TrainingJobFailed) as again:
        train_op(missing, train_spec, dataset_spec, "same-run", dsl.Model(uri=str(tmp_path / "again")))
    assert again.value.reason == "BackoffLimitExceeded", "not CreateFailed (409 AlreadyExists)"
    assert len({job["metadata"]["name"] for job in created_jobs(api)}) == 3
