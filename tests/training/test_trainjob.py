"""The Kubeflow Trainer v2 backend: the TrainJob we render per environment parses strictly into
the trainer API's models and holds to our rules, and the backend drives a job's life through the
Kubernetes client against a fake API server that holds requests to the same models."""
import copy
import json
import re
import threading

import boto3
import pytest
import yaml
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from typer.testing import CliRunner

from crds.hardening import RUN_AS_UID
from pipelines.arguments import train_spec
from pipelines.config import environments, load_settings
from tests.fakes.kube_api_server import fake_k8s  # noqa: F401 (fixture)
from tests.fakes.kube_operators import JobScript
from tests.support import CREDENTIALS
from training.backends import TrainingJob, backend_for
from training.backends.cluster import TrainingJobFailed, TrainingJobInvalid
from training.backends.trainjob import (
    ENTRY_COMMAND,
    PATCH_MANAGER,
    TrainJobBackend,
    build_trainjob,
    schema_problems,
    validate_trainjob,
)
from training.pods import TORCHRUN_ENV

ARGS = ["--data", "s3://bucket/train/data.parquet", "--model-dir", "s3://bucket/train/model", "--spec", "{}"]
CLUSTER_ENVS = [env for env in environments() if not load_settings(env).embedded]
TRAINJOB = {"training": {"backend": "trainjob"}}
POD_NAME = r"{job}-node-0-0-[0-9a-f]{{5}}"  # JobSet's <jobset>-<replicated job>-<job index>-<pod index>-<suffix>


def settings_for(env: str, **training):
    return load_settings(env, overrides={"training": {"backend": "trainjob", **training}})


def render(env: str, env_vars: dict | None = None, **training) -> dict:
    return build_trainjob(train_spec(settings_for(env, **training)), f"flywheel-train-{env}", ARGS, env_vars)


def trainer(job: dict) -> dict:
    return job["spec"]["trainer"]


def node_pod(job: dict) -> dict:
    """The pod template patch of replicated job `node` in our RuntimePatch."""
    (patch,) = job["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert patch["manager"] == PATCH_MANAGER and replicated["name"] == "node"
    return replicated["template"]["spec"]["template"]


def env_of(job: dict) -> dict:
    return {var["name"]: var.get("value", var.get("valueFrom")) for var in trainer(job)["env"]}


def nulls(value, path="") -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nulls(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in nulls(v, f"{path}[{i}]")]
    return [path] if value is None else []


@pytest.mark.parametrize("env", CLUSTER_ENVS)
def test_every_cluster_environment_renders_a_valid_trainjob(env):
    # Given the real config of a cluster environment, with the trainjob backend
    settings = settings_for(env)
    # When its TrainJob is rendered
    job = render(env)
    # Then it parses strictly into the trainer API's TrainJob, and the model gives back the same dict
    parsed = validate_trainjob(job)
    assert isinstance(parsed, TrainerV1alpha1TrainJob) and parsed.to_dict() == job
    assert nulls(job) == [] and "actual_instance" not in json.dumps(job)
    training = settings.training
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["namespace"] == settings.namespace
    # The job (not its pods) opts into the env's Kueue LocalQueue (fleet/queues.py).
    assert job["metadata"]["labels"] == {"app.kubernetes.io/part-of": "flywheel",
                                         "app.kubernetes.io/component": "training", "flywheel/env": env,
                                         "kueue.x-k8s.io/queue-name": "flywheel"}
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "flywheel-torch-distributed"}
    assert job["spec"]["activeDeadlineSeconds"] == training.active_deadline_seconds
    # ... one node per worker, each with the env's CPU, memory and GPU (or MIG slice) as limits
    assert trainer(job)["numNodes"] == training.workers
    assert trainer(job)["image"] == settings.image.ref and trainer(job)["args"] == ARGS
    assert trainer(job)["command"] == ["torchrun", "--module", "training.train"] == ENTRY_COMMAND
    resources = trainer(job)["resourcesPerNode"]
    gpu = training.resources.gpu
    assert resources["requests"] == {"cpu": training.resources.cpu, "memory": training.resources.memory}
    assert resources["limits"] == {**resources["requests"], gpu.resource: str(gpu.count)}
    assert trainer(job)["numProcPerNode"] == (gpu.count or 1)
    # ... the container env with torchrun's fix and the object-store keys by reference only
    env_vars = env_of(job)
    assert TORCHRUN_ENV.items() <= env_vars.items() and env_vars["HOME"] == "/tmp"
    assert env_vars["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "flywheel-object-store",
                                                                  "key": "AWS_SECRET_ACCESS_KEY"}}
    endpoint = settings.kfp.object_store_endpoint
    assert env_vars["AWS_ENDPOINT_URL"] == endpoint if endpoint else env_vars["AWS_ENDPOINT_URL"]["secretKeyRef"] == {
        "name": "flywheel-object-store", "key": "AWS_ENDPOINT_URL", "optional": True}
    assert "PET_MAX_RESTARTS" not in env_vars  # several nodes: no in-place restarts (see trainjob.py)
    # ... and the node pods: non-root, writable scratch, GPU product selector, tolerations, no sidecar
    pod = node_pod(job)
    job_labels = {k: v for k, v in job["metadata"]["labels"].items() if k != "kueue.x-k8s.io/queue-name"}
    assert pod["metadata"] == {"labels": job_labels,  # the queue label is the job's alone
                               "annotations": {"sidecar.istio.io/inject": "false"}}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == RUN_AS_UID
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "node" and "env" not in container
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"]
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["tmp", "dshm"]
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": gpu.product}
    assert pod["spec"]["tolerations"] == [{k: v for k, v in t.items() if v is not None}
                                          for t in training.model_dump()["tolerations"]]


def test_dev_asks_for_a_mig_slice_per_node():
    # Given dev's config (MIG 1g.5gb on A100-40GB, 2 workers)
    # When rendered
    job = render("dev")
    # Then each node limits one MIG slice, requests cpu/memory only, and pins the GPU product
    assert trainer(job)["resourcesPerNode"] == {"limits": {"cpu": "2", "memory": "8Gi", "nvidia.com/mig-1g.5gb": "1"},
                                                "requests": {"cpu": "2", "memory": "8Gi"}}
    assert node_pod(job)["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}
    assert trainer(job)["numNodes"] == 2


def test_prod_asks_for_whole_a100s_on_four_nodes():
    # Given prod's config (whole A100-80GB, 4 workers, a dedicated-node taint)
    # When rendered
    job = render("prod")
    # Then 4 nodes, one whole GPU each on A100-80GB nodes that tolerate both taints, one process per GPU
    assert trainer(job)["numNodes"] == 4 and trainer(job)["numProcPerNode"] == 1
    assert trainer(job)["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "1"
    assert node_pod(job)["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert {"key": "dedicated", "operator": "Equal", "value": "ml-training",
            "effect": "NoSchedule"} in node_pod(job)["spec"]["tolerations"]
    assert job["metadata"]["namespace"] == "flywheel-prod" and "@sha256:" in trainer(job)["image"]


def test_a_single_node_job_restarts_its_workers_in_place():
    # Given one worker in total
    job = render("dev", workers=1)
    # Then torchrun gets max_restarts, as a single-pod PyTorchJob does
    validate_trainjob(job)
    assert trainer(job)["numNodes"] == 1 and env_of(job)["PET_MAX_RESTARTS"] == "3"


def test_the_job_references_the_configured_runtime_and_the_object_store_endpoint():
    # Given a custom ClusterTrainingRuntime and an endpoint the pods must use
    job = render("staging", env_vars={"AWS_ENDPOINT_URL": "http://minio.example:9000"}, runtime="flywheel-torch")
    # Then the job names that runtime, and the endpoint is plain env (not the Secret's optional key)
    validate_trainjob(job)
    assert job["spec"]["runtimeRef"]["name"] == "flywheel-torch"
    assert env_of(job)["AWS_ENDPOINT_URL"] == "http://minio.example:9000"
    assert [v["name"] for v in trainer(job)["env"]].count("AWS_ENDPOINT_URL") == 1


def _patched_pod(job):
    return node_pod(job)["spec"]


@pytest.mark.parametrize("break_it, expected", [
    (lambda j: trainer(j).update(numnodes=4), "spec.trainer.numnodes: unknown field"),
    (lambda j: _patched_pod(j).update(nodeselector={}),
     "spec.runtimePatches[0].trainingRuntimeSpec.template.spec.replicatedJobs[0].template.spec.template.spec"
     ".nodeselector: unknown field"),
    (lambda j: trainer(j).update(numNodes="four"), "spec.trainer.numNodes: Input should be a valid integer"),
    (lambda j: trainer(j)["command"].append(3), "spec.trainer.command[3]: Input should be a valid string"),
    (lambda j: j["spec"]["runtimeRef"].pop("name"), "spec.runtimeRef.name: required"),
    (lambda j: trainer(j)["resourcesPerNode"]["limits"].update(cpu=["2"]), "spec.trainer.resourcesPerNode.limits.cpu:"),
    (lambda j: _patched_pod(j)["tolerations"][0].update(effect="Sometimes"),
     "spec.runtimePatches[0].trainingRuntimeSpec.template.spec.replicatedJobs[0].template.spec.template.spec"
     ".tolerations[0].effect: Value error, must be one of enum values"),
    (lambda j: trainer(j)["env"][7]["valueFrom"]["secretKeyRef"].pop("key"),
     "spec.trainer.env[7].valueFrom.secretKeyRef.key: required"),
    (lambda j: j["metadata"].update(name="Train_Job"), "metadata.name: 'Train_Job' must be a DNS-1035 label"),
    (lambda j: j["metadata"].update(name="t" * 56), "metadata.name: '" + "t" * 56 + "' is too long"),
    (lambda j: j["metadata"].pop("namespace"), "metadata.namespace: required"),
    (lambda j: trainer(j).pop("image"), "spec.trainer.image: required"),
    (lambda j: trainer(j).update(command=["python", "-m", "training.train"]), "spec.trainer.command: must be"),
    (lambda j: trainer(j).update(numNodes=0), "spec.trainer.numNodes: must be at least 1"),
    (lambda j: trainer(j)["resourcesPerNode"].pop("limits"), "spec.trainer.resourcesPerNode.limits: ['cpu', 'memory']"),
    (lambda j: trainer(j)["resourcesPerNode"]["requests"].update({"nvidia.com/gpu": "2"}),
     "spec.trainer.resourcesPerNode: nvidia.com/gpu request must equal its limit"),
    (lambda j: trainer(j)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}),
     "spec.trainer.env[10]: AWS_SECRET_ACCESS_KEY carries a literal credential"),
    (lambda j: trainer(j)["env"].append({"name": "PET_MASTER_ADDR", "value": "somewhere"}),
     "spec.trainer.env[10]: PET_MASTER_ADDR is set by Trainer's torch plugin"),
    (lambda j: trainer(j)["env"].append({"name": "HOME", "value": "/root"}),
     "spec.trainer.env[10]: duplicate entry 'HOME'"),
    (lambda j: _patched_pod(j)["securityContext"].update(runAsNonRoot=False),
     "spec.runtimePatches[0].trainingRuntimeSpec.template.spec.replicatedJobs[0].template.spec.template.spec"
     ".securityContext: runAsNonRoot true"),
    (lambda j: _patched_pod(j)["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
     "spec.runtimePatches[0].trainingRuntimeSpec.template.spec.replicatedJobs[0].template.spec.template.spec"
     ".containers[0].securityContext.allowPrivilegeEscalation: must be false"),
    (lambda j: _patched_pod(j)["containers"][0].update(env=[{"name": "X", "value": "1"}]),
     "spec.runtimePatches[0].trainingRuntimeSpec.template.spec.replicatedJobs[0].template.spec.template.spec"
     ".containers[0].env: Trainer's webhook refuses env"),
    (lambda j: j["spec"]["runtimePatches"].clear(), "spec.runtimePatches: needs a patch of replicated job 'node'"),
    (lambda j: j["spec"]["runtimePatches"].append(copy.deepcopy(j["spec"]["runtimePatches"][0])),
     "spec.runtimePatches[1].manager: 'flywheel/trainjob-backend' must be set and unique"),
])
def test_an_invalid_job_is_rejected_with_its_json_path(break_it, expected):
    # Given a valid dev job (2 nodes, 10 env entries), broken in one place
    job = copy.deepcopy(render("dev"))
    assert len(trainer(job)["env"]) == 10
    break_it(job)
    # When validated / Then the error names the path
    with pytest.raises(TrainingJobInvalid) as err:
        validate_trainjob(job)
    assert err.value.kind == "TrainJob"
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_the_models_alone_would_drop_an_unknown_field():
    # Given a job with a misspelt field
    job = copy.deepcopy(render("dev"))
    trainer(job)["numnodes"] = 4
    # Then the package's own parse takes it and silently drops it (this is why the strict walk exists)
    assert "numnodes" not in TrainerV1alpha1TrainJob.from_dict(job).to_dict()["spec"]["trainer"]
    assert schema_problems(job) == ["spec.trainer.numnodes: unknown field"]


def test_credentials_and_reserved_variables_cannot_be_passed_as_env():
    spec = train_spec(settings_for("dev"))
    for env in ({"AWS_SECRET_ACCESS_KEY": "x"}, {"MASTER_ADDR": "x"}, {"PET_NNODES": "2"}):
        with pytest.raises(ValueError):
            build_trainjob(spec, "j", ARGS, env)
    with pytest.raises(ValueError, match="entry point's arguments"):
        build_trainjob(spec, "j", ["python", "-m", "training.train", *ARGS])


# --- the backend, with the Kubernetes client against the fake API server --------------------


def job_for(name: str) -> TrainingJob:
    """A job whose data is on the object store already (nothing to upload)."""
    return TrainingJob(name, ARGS[1], ARGS[1], entry_spec={"lineage": {"job_name": name}})


def backend(api, keep_job="on_failure", env="dev", **options) -> TrainJobBackend:
    spec = train_spec(settings_for(env, keep_job=keep_job))
    return backend_for(spec, client_configuration=api.configuration(), poll_interval=0.02, log_drain_timeout=10,
                       **options)


def submit(api, name: str, **options) -> dict:
    chosen = backend(api, **options)
    return chosen.run(chosen.manifest(job_for(name)))


def test_the_backend_is_chosen_by_name_and_a_dry_run_needs_no_cluster():
    # Given the trainjob backend with no API server configured at all
    chosen = backend_for(train_spec(settings_for("dev")))
    # When the job is rendered
    job = chosen.manifest(job_for("train-dry"))
    # Then it is a valid TrainJob and no client was ever created
    assert isinstance(chosen, TrainJobBackend) and chosen.name == "trainjob"
    validate_trainjob(job)
    assert not chosen.kube.connected


def test_a_successful_job_streams_node_0s_log_and_is_deleted(fake_k8s, capsys):
    # Given a Trainer that takes the job through Created -> Running -> Complete
    fake_k8s.scripts["train-ok"] = JobScript(steps=["Created", "Running", "Complete"],
                                             master_log=["epoch 1 val_roc_auc 0.71", "saved model"])
    # When the backend runs it (keep_job on_failure)
    status = submit(fake_k8s, "train-ok")
    # Then the job was created once, clean against the models, and its Complete condition ended the wait
    (create,) = fake_k8s.calls("POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/flywheel-dev/trainjobs$")
    assert create.body["metadata"]["name"] == "train-ok" and fake_k8s.warnings == []
    assert [(c["type"], c["reason"]) for c in status["conditions"]] == [("Complete", "AllJobsCompleted")]
    # ... node 0's log reached our stdout, found by JobSet's labels and read from container `node`
    out = capsys.readouterr().out
    assert re.search(rf"\[Pod {POD_NAME.format(job='train-ok')}\]: epoch 1 val_roc_auc 0.71", out), out
    assert "saved model" in out and "TrainJob train-ok: Complete (AllJobsCompleted)" in out
    assert fake_k8s.calls("GET", "/pods$")[0].query["labelSelector"] == (
        "jobset.sigs.k8s.io/jobset-name=train-ok,jobset.sigs.k8s.io/replicatedjob-name=node,"
        "batch.kubernetes.io/job-completion-index=0")
    (log_read,) = fake_k8s.calls("GET", rf"/pods/{POD_NAME.format(job='train-ok')}/log$")
    assert log_read.query["container"] == "node" and log_read.query["follow"] == "True"
    # ... and the job is gone, with its pods
    assert fake_k8s.calls("DELETE", "/trainjobs/train-ok$") and not fake_k8s.trainjobs and not fake_k8s.pods


@pytest.mark.parametrize("reason, message", [
    ("", ""),  # JobSet's own failure: Trainer copies its Failed condition
    ("DeadlineExceeded", "TrainJob exceeded its activeDeadlineSeconds"),
])
def test_a_failed_job_raises_its_reason_and_is_kept(fake_k8s, capsys, reason, message):
    # Given a Trainer that fails the job after it ran
    fake_k8s.scripts["train-bad"] = JobScript(
        steps=["Created", "Running", "Failed"], reason=reason, message=message,
        master_log=["Traceback (most recent call last):", "RuntimeError: CUDA out of memory"])
    # When the backend runs it (keep_job on_failure)
    with pytest.raises(TrainingJobFailed) as err:
        submit(fake_k8s, "train-bad")
    # Then the error carries the condition's reason and message, the log was streamed, the job kept
    assert err.value.kind == "TrainJob" and err.value.job_name == "train-bad"
    assert err.value.reason == (reason or "FailedJobs")
    assert err.value.message == (message or "jobset failed due to one or more job failures")
    assert err.value.reason in str(err.value)
    assert "CUDA out of memory" in capsys.readouterr().out
    assert not fake_k8s.calls("DELETE") and ("flywheel-dev", "train-bad") in fake_k8s.trainjobs


def test_a_job_that_never_finishes_times_out_and_is_deleted(fake_k8s):
    # Given a Trainer that leaves the job running forever
    fake_k8s.scripts["train-stuck"] = JobScript(steps=["Created", "Running"])
    # When the backend's wait runs out
    with pytest.raises(TrainingJobFailed) as err:
        submit(fake_k8s, "train-stuck", wait_timeout=0.3)
    # Then it says so, and deletes the job so it stops holding GPUs
    assert err.value.reason == "Timeout"
    assert fake_k8s.calls("DELETE", "/trainjobs/train-stuck$") and not fake_k8s.trainjobs


def test_a_job_that_vanishes_while_waited_on_is_a_watch_failure(fake_k8s):
    # Given a running job that someone deletes behind the backend's back
    fake_k8s.scripts["train-gone"] = JobScript(steps=["Created", "Running"])
    threading.Timer(0.2, lambda: fake_k8s.trainjobs.clear()).start()
    # When the backend polls it
    with pytest.raises(TrainingJobFailed) as err:
        submit(fake_k8s, "train-gone")
    # Then the API's 404 ends the wait as a lost watch, not as a timeout
    assert err.value.reason == "WatchFailed" and "404" in err.value.message


@pytest.mark.parametrize("keep_job, steps, deleted", [
    ("always", ["Created", "Running", "Complete"], False),
    ("never", ["Created", "Running", "Failed"], True),
])
def test_keep_job_policy(fake_k8s, keep_job, steps, deleted):
    fake_k8s.scripts["train-policy"] = JobScript(steps=steps, master_log=[])
    try:
        submit(fake_k8s, "train-policy", keep_job=keep_job)
    except TrainingJobFailed:
        assert steps[-1] == "Failed"
    assert bool(fake_k8s.calls("DELETE", "/trainjobs/")) is deleted
    assert (("flywheel-dev", "train-policy") in fake_k8s.trainjobs) is not deleted


def test_an_invalid_job_never_reaches_the_api_server(fake_k8s):
    with pytest.raises(TrainingJobInvalid):
        submit(fake_k8s, "Bad_Name")
    assert fake_k8s.requests == []


def test_a_second_create_of_the_same_name_is_a_one_line_training_failure(fake_k8s):
    # Given a job that exists already (a kept failed attempt of the same name)
    fake_k8s.scripts["train-twice"] = JobScript(steps=["Created", "Running", "Failed"], master_log=[])
    with pytest.raises(TrainingJobFailed):
        submit(fake_k8s, "train-twice")
    # When it is submitted again
    with pytest.raises(TrainingJobFailed) as err:
        submit(fake_k8s, "train-twice")
    # Then the API server's 409 is the reason, on one line
    assert err.value.reason == "CreateFailed" and "409" in err.value.message and "AlreadyExists" in err.value.message
    assert "\n" not in str(err.value)


def test_the_fake_api_server_rejects_what_the_models_reject(fake_k8s):
    # Given a job the trainer API models reject, sent straight through the Kubernetes client
    from kubernetes import client

    job = copy.deepcopy(render("dev"))
    trainer(job)["numNodes"] = "two"
    api = client.CustomObjectsApi(client.ApiClient(fake_k8s.configuration()))
    # Then it answers 422 Invalid, a misspelt field is pruned with a warning, and a missing job is a 404
    with pytest.raises(client.ApiException) as err:
        api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "flywheel-dev", "trainjobs", job)
    assert err.value.status == 422 and yaml.safe_load(err.value.body)["reason"] == "Invalid"
    trainer(job)["numNodes"], trainer(job)["numnodes"] = 2, 2
    created = api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "flywheel-dev", "trainjobs", job)
    assert created["metadata"]["uid"] and fake_k8s.warnings == ["spec.trainer.numnodes"]
    with pytest.raises(client.ApiException) as err:
        api.get_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "flywheel-dev", "trainjobs", "nope")
    assert err.value.status == 404 and yaml.safe_load(err.value.body)["reason"] == "NotFound"


def test_the_fake_trainers_status_and_pods_are_what_the_api_models_read(fake_k8s):
    # Given a submitted job, polled to its end
    from kubernetes import client

    api = client.CustomObjectsApi(client.ApiClient(fake_k8s.configuration()))
    api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "flywheel-dev", "trainjobs", render("dev"))
    for _ in range(3):
        job = api.get_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "flywheel-dev", "trainjobs",
                                               "flywheel-train-dev")
    # Then its status parses into the trainer API's model, and each node pod carries our patch
    status = TrainerV1alpha1TrainJob.from_dict(job).status
    assert [(c.type, c.status) for c in status.conditions] == [("Complete", "True")]
    index = lambda pod: pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]
    pods = sorted(fake_k8s.pods.values(), key=index)
    assert [index(p) for p in pods] == ["0", "1"]
    assert all(p["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}
               and p["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] is True for p in pods)


# --- CLI ------------------------------------------------------------------------------------


@pytest.fixture
def trainjob_config(config_dir, monkeypatch):
    """config/ with prod on the trainjob backend; `extra` sections merge into prod.yaml too."""
    def use(**extra) -> None:
        path = config_dir / "prod.yaml"
        prod = yaml.safe_load(path.read_text())
        prod["training"]["backend"] = "trainjob"
        for section, values in extra.items():
            prod.setdefault(section, {}).update(values)
        path.write_text(yaml.safe_dump(prod, sort_keys=False))
        # load_settings reads the module's CONFIG_DIR on each call (FLYWHEEL_CONFIG_DIR only at import).
        monkeypatch.setattr("pipelines.config.CONFIG_DIR", config_dir)

    return use


def dry_run(env: str = "prod") -> dict:
    import pipelines.cli as cli

    result = CliRunner().invoke(cli.app, ["train", "--env", env, "--dry-run"])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)


def test_train_dry_run_prints_prods_trainjob(trainjob_config):
    # Given prod configured for the trainjob backend
    trainjob_config()
    # When `flywheel train --env prod --dry-run` runs
    job = dry_run()
    # Then it prints one valid TrainJob with prod's 4 nodes, A100 selector, tolerations and object store
    validate_trainjob(job)
    settings = load_settings("prod", overrides=TRAINJOB)
    assert job["kind"] == "TrainJob" and job["metadata"]["namespace"] == "flywheel-prod"
    assert trainer(job)["numNodes"] == 4 and trainer(job)["image"] == settings.image.ref
    assert node_pod(job)["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert node_pod(job)["spec"]["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"},
        {"effect": "NoSchedule", "key": "dedicated", "operator": "Equal", "value": "ml-training"}]
    args = trainer(job)["args"]
    data, model = args[args.index("--data") + 1], args[args.index("--model-dir") + 1]
    prefix = f"s3://flywheel-prod-artifacts/pipelines/flywheel-jobs/{job['metadata']['name']}/"
    assert data == f"{prefix}data.parquet" and model == f"{prefix}model"


def test_the_dry_run_shows_what_the_backend_submits(trainjob_config, fake_k8s, s3_env, tmp_path):
    # Given prod on the trainjob backend (a smaller dataset: only its schema reaches the job), its
    # staging bucket on an S3 API server, and a Trainer that fails every job (nothing trains here)
    import pipelines.cli_cluster as cli_cluster

    trainjob_config(dataset={"rows": 2000})
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="flywheel-prod-artifacts")
    fake_k8s.default_trainjob_script = JobScript(steps=["Created", "Failed"], master_log=[])
    # When the dry run prints its TrainJob, and the same job (same run stamp) is trained for real
    shown = dry_run()
    stamp = shown["metadata"]["annotations"]["flywheel/pipeline-run"].removeprefix("cli-")
    settings = load_settings("prod")
    spec = train_spec(settings)
    job = cli_cluster._cli_job(settings, spec, tmp_path / "run", stamp, write=True)
    runner = TrainJobBackend(spec, client_configuration=fake_k8s.configuration(), poll_interval=0.02,
                             log_drain_timeout=10)
    with pytest.raises(TrainingJobFailed):
        runner.train(job)
    # Then what reached the API server is what the dry run showed, but for the attempt's random suffix
    (create,) = fake_k8s.calls("POST", "/trainjobs$")
    assert job.name != shown["metadata"]["name"] and job.name[:-5] == shown["metadata"]["name"][:-5]
    assert json.loads(json.dumps(shown).replace(shown["metadata"]["name"], job.name)) == create.body
    assert fake_k8s.warnings == []
