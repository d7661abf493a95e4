"""Training jobs opt into Kueue with the queue label on cluster envs, and a queued (suspended)
job is waited on, not failed, with a progress line saying so."""
from __future__ import annotations

import io

import pytest

from gateways.kube_api import PYTORCHJOBS, KubeApi
from pipelines.arguments import train_spec
from pipelines.catalog import compile_pipeline, load_compiled, pipeline_arguments
from pipelines.config import load_settings
from specs import TrainSpec, TuningSpec
from stages.tuning import trial_spec
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


# -- waiting through the queue ---------------------------------------------------------------


class ScriptedKube(KubeApi):
    """Answers GETs of one job from a script of (suspend flag, conditions) states, one per GET."""

    def __init__(self, states: list[dict]):
        super().__init__()
        self.states, self.gets, self.created, self.deleted = states, 0, None, []

    def create(self, kind, namespace, obj):
        self.created = obj

    def get(self, kind, namespace, name):
        state = self.states[min(self.gets, len(self.states) - 1)]
        self.gets += 1
        return {"metadata": {"name": name}, "spec": state.get("spec", {}), "status": state.get("status", {})}

    def list_pods(self, namespace, label_selector):
        return []

    def delete(self, kind, namespace, name):
        self.deleted.append(name)


def cond(kind: str, status: str = "True", reason: str = "") -> dict:
    return {"type": kind, "status": status, "reason": reason or kind}


QUEUED = {"spec": {"runPolicy": {"suspend": True}},
          "status": {"conditions": [cond("Suspended", reason="JobSuspended")]}}
RUNNING = {"spec": {"runPolicy": {"suspend": False}},
           "status": {"conditions": [cond("Suspended", "False", "JobResumed"), cond("Running")]}}
DONE = {"spec": {"runPolicy": {"suspend": False}}, "status": {"conditions": [cond("Succeeded")]}}


def test_a_queued_job_waits_longer_than_its_timeout_and_says_it_is_queued():
    kube, out = ScriptedKube([QUEUED] * 6 + [RUNNING, DONE]), io.StringIO()
    # 6 queued polls take far longer than the whole wait timeout: queued time must not count.
    backend = PyTorchJobBackend(spec_for("prod", keep_job="never"), kube=kube, wait_timeout=0.05,
                                poll_interval=0.02, out=out)
    job = build_pytorchjob(backend.spec, "flywheel-train-abc-x1y2z", ARGS)
    status = backend.run(job)
    log = out.getvalue()
    assert status["conditions"][-1]["type"] == "Succeeded"
    assert log.count("PyTorchJob flywheel-train-abc-x1y2z: queued in flywheel (waiting for quota)") == 1
    assert "admitted from flywheel; starting" in log
    assert log.index("queued in flywheel") < log.index("admitted from flywheel")


def test_a_trainjob_preempted_back_into_the_queue_is_announced_again():
    queued = {"spec": {"suspend": True}, "status": {"conditions": [cond("Suspended")]}}
    running = {"spec": {"suspend": False}, "status": {"conditions": [cond("Suspended", "False", "Resumed")]}}
    kube, out = ScriptedKube([queued, running, queued, running, {"status": {"conditions": [cond("Complete")]}}]), \
        io.StringIO()
    backend = TrainJobBackend(spec_for("staging", backend="trainjob", keep_job="never"), kube=kube,
                              wait_timeout=5, poll_interval=0.001, out=out)
    backend.run(build_trainjob(backend.spec, "flywheel-train-abc-x1y2z", ARGS))
    assert out.getvalue().count("queued in flywheel (waiting for quota)") == 2


def poller(kube):
    return lambda until, limit, seen: kube.wait_for(PYTORCHJOBS, "ns", "j", until, timeout=limit, poll=0.01,
                                                    on_poll=seen)


def test_a_job_queued_too_long_times_out_saying_so():
    kube, said = ScriptedKube([QUEUED]), []
    watch = QueueWatch("PyTorchJob", "j", "flywheel", said.append)
    with pytest.raises(TimeoutError, match="still queued in flywheel after 0s"):
        wait_through_queue(poller(kube),
                           lambda j: False, 60, watch, lambda j: None, queue_timeout=0.03)
    assert said == ["PyTorchJob j: queued in flywheel (waiting for quota)"]


def test_running_time_still_times_out():
    kube = ScriptedKube([RUNNING])
    watch = QueueWatch("PyTorchJob", "j", "flywheel", lambda line: None)
    with pytest.raises(TimeoutError):
        wait_through_queue(poller(kube),
                           lambda j: False, 0.03, watch, lambda j: None)


@pytest.mark.parametrize(("job", "expected"), [
    (QUEUED, True), (RUNNING, False), (DONE, False),
    ({"spec": {"suspend": True}}, True),
    ({"status": {"conditions": [cond("Suspended")]}}, True),  # no flag: the operator's condition
    ({"spec": {"runPolicy": {"suspend": False}}, "status": {"conditions": [cond("Suspended")]}}, False),  # flag wins
])
def test_suspended_reads_the_flag_then_the_condition(job, expected):
    assert suspended(job) is expected
