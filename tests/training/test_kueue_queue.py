"""Training jobs opt into Kueue with the queue label on cluster envs, and a queued (suspended)
job is waited on, not failed, with a progress line saying so."""
from __future__ import annotations

import io
import time
from functools import partial

import pytest

import training.backends.pytorchjob as pytorchjob_module
from gateways.kube_api import PYTORCHJOBS, TRAINJOBS, KubeApi
from pipelines.arguments import train_spec
from pipelines.catalog import compile_pipeline, load_compiled, pipeline_arguments
from pipelines.config import load_settings
from specs import TrainSpec, TuningSpec
from stages.tuning import trial_spec
from tests.fakes.kube_api_server import fake_k8s  # noqa: F401 (fixture)
from tests.fakes.kube_operators import JobScript
from training.backends.cluster import TrainingJobFailed
from training.backends.jobs import QUEUE_LABEL
from training.backends.pytorchjob import PyTorchJobBackend, build_pytorchjob, validate_pytorchjob
from training.backends.queueing import QueueWatch, suspended, wait_through_queue
from training.backends.trainjob import TrainJobBackend, build_trainjob, validate_trainjob

ARGS = ["--data", "s3://b/d.parquet", "--model-dir", "s3://b/m", "--spec", "{}"]
BUILDERS = [(build_pytorchjob, validate_pytorchjob), (build_trainjob, validate_trainjob)]


def spec_for(env: str, **overrides) -> TrainSpec:
    return TrainSpec.model_validate(train_spec(load_settings(env)).model_dump() | overrides)


@pytest.mark.parametrize(("build", "validate"), BUILDERS)
@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_a_cluster_envs_job_carries_the_queue_label(build, validate, env):
    job = build(spec_for(env), "flywheel-train-abc-x1y2z", ARGS)
    assert job["metadata"]["labels"][QUEUE_LABEL] == "flywheel"
    validate(job)  # still a valid job for its API


@pytest.mark.parametrize(("build", "validate"), BUILDERS)
def test_without_a_queue_the_job_has_no_label(build, validate):
    assert train_spec(load_settings("local")).queue_name is None  # the embedded env queues nothing
    job = build(spec_for("prod", queue_name=None), "flywheel-train-abc-x1y2z", ARGS)
    assert QUEUE_LABEL not in job["metadata"]["labels"]
    assert "suspend" not in (job["spec"].get("runPolicy") or {}) and "suspend" not in job["spec"]  # Kueue's to set


def test_queue_disabled_in_config_means_no_queue_name():
    settings = load_settings("prod")
    settings = settings.model_copy(update={"fleet": settings.fleet.model_copy(
        update={"queue": settings.fleet.queue.model_copy(update={"enabled": False})})})
    assert train_spec(settings).queue_name is None


def test_tuning_trials_keep_the_queue():
    trial = trial_spec(spec_for("prod"), TuningSpec(), {"hidden": 32})
    assert build_pytorchjob(trial, "flywheel-trial-abc-1-r1-x1y2z", ARGS)["metadata"]["labels"][QUEUE_LABEL] == \
        "flywheel"


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_the_compiled_train_op_receives_the_queue_name(env, tmp_path):
    settings = load_settings(env)
    spec = load_compiled(compile_pipeline(settings, "training", tmp_path))
    default = spec["root"]["inputDefinitions"]["parameters"]["train_spec"]["defaultValue"]
    assert default["queue_name"] == "flywheel" == pipeline_arguments(settings, "training")["train_spec"]["queue_name"]


# -- waiting through the queue, against the fake API server ---------------------------------
# The backends' real HTTP calls meet the fake's Training Operator / Trainer, whose "Suspended" and
# "Resumed" steps are Kueue queueing (or preempting) and admitting the job (tests/fakes/kube_*jobs.py).

NAME = "flywheel-train-abc-x1y2z"
QUEUED_THEN_RUN = ["Suspended"] * 10 + ["Resumed", "Running", "Succeeded"]
PREEMPTED_ONCE = ["Suspended", "Resumed", "Running", "Suspended", "Resumed", "Running", "Complete"]


def pytorchjob_backend(fake, env: str = "prod", **options) -> PyTorchJobBackend:
    spec = spec_for(env, keep_job=options.pop("keep_job", "never"))
    return PyTorchJobBackend(spec, client_configuration=fake.configuration(), out=io.StringIO(), **options)


def trainjob_backend(fake, env: str = "staging", **options) -> TrainJobBackend:
    spec = spec_for(env, backend="trainjob", keep_job=options.pop("keep_job", "never"))
    return TrainJobBackend(spec, client_configuration=fake.configuration(), out=io.StringIO(), **options)


def said(backend) -> str:
    return backend.out.getvalue()


def test_a_queued_job_waits_longer_than_its_timeout_and_says_it_is_queued(fake_k8s):
    fake_k8s.scripts[NAME] = JobScript(steps=QUEUED_THEN_RUN, master_log=["done"])
    backend = pytorchjob_backend(fake_k8s, wait_timeout=0.3, poll_interval=0.05)
    started = time.monotonic()
    status = backend.run(build_pytorchjob(backend.spec, NAME, ARGS))
    # 10 queued polls take longer than the whole wait timeout: queued time must not count.
    assert time.monotonic() - started > backend.wait_timeout
    log = said(backend)
    assert status["conditions"][-1]["type"] == "Succeeded"
    assert log.count(f"PyTorchJob {NAME}: queued in flywheel (waiting for quota)") == 1
    assert "admitted from flywheel; starting" in log
    assert log.index("queued in flywheel") < log.index("admitted from flywheel")
    # We sent the label and no suspend (Kueue's webhook set it), and the fake took the body as it is.
    (create,) = fake_k8s.calls("POST", "/pytorchjobs$")
    assert create.body["metadata"]["labels"][QUEUE_LABEL] == "flywheel"
    assert "suspend" not in create.body["spec"]["runPolicy"] and fake_k8s.warnings == []
    assert fake_k8s.calls("DELETE", f"/pytorchjobs/{NAME}$") and not fake_k8s.jobs


def test_a_trainjob_preempted_back_into_the_queue_is_announced_again(fake_k8s):
    fake_k8s.scripts[NAME] = JobScript(steps=PREEMPTED_ONCE, master_log=[])
    backend = trainjob_backend(fake_k8s, wait_timeout=5, poll_interval=0.01)
    status = backend.run(build_trainjob(backend.spec, NAME, ARGS))
    assert said(backend).count("queued in flywheel (waiting for quota)") == 2
    assert said(backend).count("admitted from flywheel; starting") == 2
    assert [(c["type"], c["status"]) for c in status["conditions"]] == [("Suspended", "False"), ("Complete", "True")]
    assert fake_k8s.warnings == []


def test_a_queue_labelled_job_on_a_cluster_without_kueue_simply_runs(fake_k8s):
    # Given the fake's operators and no Kueue: the label is inert, the job is never suspended
    pytorchjob = pytorchjob_backend(fake_k8s, keep_job="always", wait_timeout=5, poll_interval=0.01)
    trainjob = trainjob_backend(fake_k8s, keep_job="always", wait_timeout=5, poll_interval=0.01)
    pytorchjob.run(build_pytorchjob(pytorchjob.spec, NAME, ARGS))
    trainjob.run(build_trainjob(trainjob.spec, NAME, ARGS))
    # Then both run to the end without a word about queues, carrying the CRDs' default suspend: false
    for backend in (pytorchjob, trainjob):
        assert "queued" not in said(backend) and "admitted" not in said(backend)
    job = fake_k8s.jobs[(pytorchjob.namespace, NAME)].obj
    train = fake_k8s.trainjobs[(trainjob.namespace, NAME)].obj
    assert job["metadata"]["labels"][QUEUE_LABEL] == train["metadata"]["labels"][QUEUE_LABEL] == "flywheel"
    assert job["spec"]["runPolicy"]["suspend"] is False and train["spec"]["suspend"] is False
    for obj in (job, train):
        assert not suspended(obj) and "Suspended" not in [c["type"] for c in obj["status"]["conditions"]]


def test_a_job_queued_too_long_fails_its_task_saying_it_is_still_queued(fake_k8s, monkeypatch):
    # Given a job Kueue never admits, and a queue timeout short enough to reach
    monkeypatch.setattr(pytorchjob_module, "wait_through_queue", partial(wait_through_queue, queue_timeout=0.2))
    fake_k8s.scripts[NAME] = JobScript(steps=["Suspended"])
    backend = pytorchjob_backend(fake_k8s, wait_timeout=0.05, poll_interval=0.02)
    with pytest.raises(TrainingJobFailed) as err:
        backend.run(build_pytorchjob(backend.spec, NAME, ARGS))
    # Then the failure says why (still queued), not that the job ran out of its wait timeout
    assert err.value.reason == "Timeout"
    assert err.value.message == f"PyTorchJob {NAME} still queued in flywheel after 0s (no quota freed)"
    assert "still queued in flywheel" in str(err.value) and "not finished" not in str(err.value)
    assert said(backend).count("queued in flywheel (waiting for quota)") == 1
    assert fake_k8s.calls("DELETE", f"/pytorchjobs/{NAME}$") and not fake_k8s.jobs  # it holds a queue slot


def test_a_running_timeout_names_the_whole_wait_timeout_after_a_preemption(fake_k8s):
    # Given a job preempted after running a while, then never finishing
    fake_k8s.scripts[NAME] = JobScript(steps=["Suspended", "Resumed", *["Running"] * 4, "Suspended", "Resumed",
                                              "Running"])
    backend = pytorchjob_backend(fake_k8s, wait_timeout=0.6, poll_interval=0.05)
    with pytest.raises(TrainingJobFailed) as err:
        backend.run(build_pytorchjob(backend.spec, NAME, ARGS))
    # Then the message gives the wait timeout, not what was left of it after the first run
    assert err.value.reason == "Timeout"
    assert err.value.message == f"PyTorchJob {NAME} not done after running 1s"


def in_the_fake(fake, namespace: str, name: str, steps: list[str]) -> KubeApi:
    """A KubeApi on the fake, holding a queue-labelled PyTorchJob `name` that walks `steps`."""
    fake.scripts[name] = JobScript(steps=steps, master_log=[])
    kube = KubeApi(fake.configuration())
    kube.create(PYTORCHJOBS, namespace, build_pytorchjob(spec_for("prod", namespace=namespace), name, ARGS))
    return kube


def poller(kube, namespace: str = "ns", name: str = "j"):
    return lambda until, limit, seen: kube.wait_for(PYTORCHJOBS, namespace, name, until, timeout=limit, poll=0.01,
                                                    on_poll=seen)


def test_a_job_queued_too_long_times_out_saying_so(fake_k8s):
    kube, said_lines = in_the_fake(fake_k8s, "ns", "j", ["Suspended"]), []
    watch = QueueWatch("PyTorchJob", "j", "flywheel", said_lines.append)
    with pytest.raises(TimeoutError, match="still queued in flywheel after 0s"):
        wait_through_queue(poller(kube),
                           lambda j: False, 60, watch, lambda j: None, queue_timeout=0.03)
    assert said_lines == ["PyTorchJob j: queued in flywheel (waiting for quota)"]


def test_running_time_still_times_out(fake_k8s):
    kube = in_the_fake(fake_k8s, "ns", "j", ["Created", "Running"])
    watch = QueueWatch("PyTorchJob", "j", "flywheel", lambda line: None)
    with pytest.raises(TimeoutError, match="PyTorchJob j not done after running 0s"):
        wait_through_queue(poller(kube),
                           lambda j: False, 0.03, watch, lambda j: None)


# -- the fake's Kueue part, held to the operators' sources and the SDK models ----------------


def pytorchjob_model(obj: dict):
    """The object as kubeflow-training's TrainingClient reads it (its model, strictly deserialized)."""
    from kubeflow.training.api_client import ApiClient
    from kubeflow.training.utils.utils import FakeResponse

    return ApiClient().deserialize(FakeResponse(obj), "KubeflowOrgV1PyTorchJob")


def test_the_fakes_suspended_pytorchjob_is_what_the_training_operator_reports(fake_k8s):
    import jsonschema

    from tests.fakes.kube_pytorchjobs import crd_schema

    kube = in_the_fake(fake_k8s, "ns", "j", ["Suspended", "Resumed", "Running", "Suspended", "Resumed", "Running",
                                             "Succeeded"])
    created = fake_k8s.jobs[("ns", "j")].obj
    assert created["spec"]["runPolicy"]["suspend"] is True  # Kueue's webhook, on create
    seen = [kube.get(PYTORCHJOBS, "ns", "j") for _ in range(7)]
    validator = jsonschema.Draft4Validator(crd_schema())
    for obj in seen:  # every state is a valid PyTorchJob, status and all, that the SDK model reads
        assert list(validator.iter_errors(obj)) == [] and pytorchjob_model(obj).status is not None

    def state(obj):
        return ({(c["type"], c["status"], c["reason"]) for c in obj["status"]["conditions"]},
                obj["spec"]["runPolicy"]["suspend"])

    queued, admitted, running, preempted = seen[0], seen[1], seen[2], seen[3]
    assert state(queued) == ({("Created", "True", "PyTorchJobCreated"),
                              ("Suspended", "True", "PyTorchJobSuspended")}, True)
    assert [c["message"] for c in queued["status"]["conditions"]] == ["PyTorchJob j is created.",
                                                                     "PyTorchJob j is suspended."]
    assert state(admitted)[0] >= {("Suspended", "False", "PyTorchJobResumed")} and state(admitted)[1] is False
    assert admitted["status"]["startTime"]
    assert ("Running", "True", "PyTorchJobRunning") in state(running)[0]
    # Preempted: Running False and Suspended True, both for the suspension; active replicas 0
    assert state(preempted) == ({("Created", "True", "PyTorchJobCreated"),
                                 ("Suspended", "True", "PyTorchJobSuspended"),
                                 ("Running", "False", "PyTorchJobSuspended")}, True)
    assert all(r.get("active") == 0 for r in preempted["status"]["replicaStatuses"].values())
    assert [c["type"] for c in seen[-1]["status"]["conditions"]] == ["Created", "Suspended", "Running", "Succeeded"]
    assert suspended(queued) and not suspended(admitted) and suspended(preempted) and not suspended(seen[-1])


def test_the_fake_runs_no_pods_for_a_suspended_job(fake_k8s):
    kube = in_the_fake(fake_k8s, "ns", "j", ["Suspended", "Resumed", "Running", "Suspended", "Resumed", "Running"])
    pods = []
    for _ in range(6):
        kube.get(PYTORCHJOBS, "ns", "j")
        pods.append(sorted(p["metadata"]["name"] for p in kube.list_pods("ns", "training.kubeflow.org/job-name=j")))
    # Queued and admitted: no pods; running: prod's master and 3 workers; preempted: all deleted; then back
    replicas = ["j-master-0", "j-worker-0", "j-worker-1", "j-worker-2"]
    assert pods == [[], [], replicas, [], [], replicas]


@pytest.mark.parametrize("steps", [["Suspended", "Running"], ["Suspended", "Succeeded"]])
def test_the_fake_refuses_a_script_that_runs_a_suspended_job(fake_k8s, steps):
    # The operator creates no pods for a suspended job: a script that says otherwise is a broken test.
    in_the_fake(fake_k8s, "ns", "j", steps)
    scripted = fake_k8s.jobs[("ns", "j")]
    fake_k8s._advance(scripted)
    with pytest.raises(ValueError, match="is suspended"):
        fake_k8s._advance(scripted)


def test_the_fakes_suspended_trainjob_is_what_trainer_reports(fake_k8s):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    fake_k8s.scripts[NAME] = JobScript(steps=PREEMPTED_ONCE, master_log=[])
    kube = KubeApi(fake_k8s.configuration())
    spec = spec_for("staging", backend="trainjob", namespace="ns")
    created = kube.create(TRAINJOBS, "ns", build_trainjob(spec, NAME, ARGS))
    assert created["spec"]["suspend"] is True  # Kueue's webhook, on create
    seen, pods = [], []
    for _ in range(len(PREEMPTED_ONCE)):
        seen.append(kube.get(TRAINJOBS, "ns", NAME))
        pods.append(len(kube.list_pods("ns", f"jobset.sigs.k8s.io/jobset-name={NAME}")))
    parsed = [TrainerV1alpha1TrainJob.from_dict(obj) for obj in seen]  # the API models read every state
    suspended_cond = [next((c for c in p.status.conditions or [] if c.type == "Suspended"), None) for p in parsed]
    assert [(c.status, c.reason, c.message) for c in suspended_cond] == [
        ("True", "Suspended", "TrainJob is suspended"), ("False", "Resumed", "TrainJob is resumed"),
        ("False", "Resumed", "TrainJob is resumed"), ("True", "Suspended", "TrainJob is suspended"),
        ("False", "Resumed", "TrainJob is resumed"), ("False", "Resumed", "TrainJob is resumed"),
        ("False", "Resumed", "TrainJob is resumed")]
    assert [p.spec.suspend for p in parsed] == [True, False, False, True, False, False, False]
    assert [p.status.jobs_status[0].suspended for p in parsed] == [1, 0, 0, 1, 0, 0, 0]
    assert pods == [0, 0, 2, 0, 0, 2, 2]  # staging's 2 nodes; their pods go while the JobSet is suspended
    assert [suspended(obj) for obj in seen] == [True, False, False, True, False, False, False]


def cond(kind: str, status: str = "True", reason: str = "") -> dict:
    return {"type": kind, "status": status, "reason": reason or kind}


# As Training Operator v1.9 reports them (reasons are the kind + Suspended/Resumed/Running).
QUEUED = {"spec": {"runPolicy": {"suspend": True}},
          "status": {"conditions": [cond("Suspended", reason="PyTorchJobSuspended")]}}
RUNNING = {"spec": {"runPolicy": {"suspend": False}},
           "status": {"conditions": [cond("Suspended", "False", "PyTorchJobResumed"),
                                     cond("Running", reason="PyTorchJobRunning")]}}
DONE = {"spec": {"runPolicy": {"suspend": False}}, "status": {"conditions": [cond("Succeeded")]}}


@pytest.mark.parametrize(("job", "expected"), [
    (QUEUED, True), (RUNNING, False), (DONE, False),
    ({"spec": {"suspend": True}}, True),
    ({"status": {"conditions": [cond("Suspended")]}}, True),  # no flag: the operator's condition
    ({"spec": {"runPolicy": {"suspend": False}}, "status": {"conditions": [cond("Suspended")]}}, False),  # flag wins
])
def test_suspended_reads_the_flag_then_the_condition(job, expected):
    assert suspended(job) is expected
