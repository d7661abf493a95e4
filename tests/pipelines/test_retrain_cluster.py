"""Retraining on a cluster, against the fake KFP API: the guarded trigger starts the newest published
version of the env's training pipeline with the reasons on the run, counts only that pipeline's
unfinished runs as in flight, and says how to publish when nothing is. (Every cluster entry point
starting the same published version: test_retraining.py.)"""
import datetime as dt

import pytest

import pipelines.publish as flywheel_publish
import pipelines.submit as flywheel_submit
from gateways import kfp_api
from pipelines import retrain
from pipelines.arguments import kfp_target_parameter
from pipelines.config import load_settings
from tests.fakes import tiny_pipeline, tiny_registry
from tests.fakes.kfp_api_server import isolated, server  # noqa: F401
from tests.monitoring.trigger_fakes import REASONS, Clock


def staging(server, **overrides):
    return load_settings("staging", overrides={"kfp": {"host": server.url}, **overrides})


def test_cluster_start_run_puts_the_reasons_on_the_run(server, isolated, tmp_path):
    # Given staging's training pipeline published (its arguments compiled in as defaults)
    settings = staging(server)
    published = flywheel_publish.publish(settings, "training", catalog=tiny_registry.WithDefaults)
    clock = Clock()
    decisions = []
    trigger = retrain.guarded_trigger(settings, audit=decisions.append, clock=clock,
                                      state_path=str(tmp_path / "state.json"))
    # When a drift decision fires on staging
    decision = trigger.fire(REASONS, "drift", "drift/staging/v3/w1")
    # Then one run of flywheel-staging-training started in the env's experiment, saying why
    assert decision["started"], decision
    (run,) = server.runs.values()
    assert decision["run_id"] == run.run_id
    assert run.display_name.startswith("flywheel-staging-training retrain drift ")
    assert "drift/staging/v3/w1" in run.description
    for reason in REASONS:
        assert reason in run.description
    (experiment,) = server.experiments.values()
    assert run.experiment_id == experiment.experiment_id and experiment.display_name == "credit-default-staging"
    assert run.runtime_config.parameters == tiny_pipeline.pipeline_arguments(settings, "training")
    assert run.runtime_config.pipeline_root == "s3://flywheel-staging-artifacts/pipelines"
    assert run.service_account == "flywheel-pipeline-runner"
    (create,) = server.find("POST", "/runs")
    assert create.body["description"] == run.description  # checked against V2beta1Run by the fake
    (version,) = server.versions.values()
    assert run.pipeline_version_reference.pipeline_version_id == version.pipeline_version_id == published.version_id

    # While that run is PENDING on KFP, past the cool-down, another decision is refused: in flight
    clock.advance(24 * 60)
    refused = trigger.fire(REASONS, "alert", "alert/fp@t1")
    assert refused["guard"] == "in_flight" and refused["in_flight"][0]["run_id"] == run.run_id
    assert refused["in_flight"][0]["state"] == "PENDING"
    # Once it has ended, a new decision starts a run of the same published version (nothing uploaded)
    run.state = "SUCCEEDED"
    again = trigger.fire(REASONS, "alert", "alert/fp@t1")
    assert again["started"] and len(server.runs) == 2 and len(server.versions) == 1
    assert [d["guard"] for d in decisions] == [None, "in_flight", None]


def test_runs_of_other_pipelines_or_ended_runs_are_not_in_flight(server, isolated):
    settings = staging(server)
    submitted = flywheel_submit.submit_pipeline(settings, "training", catalog=tiny_pipeline)
    target = flywheel_publish.require_target(settings, "training")
    in_flight = lambda: kfp_api.published_runs_in_flight(target)  # what the env's GuardedTrigger lists
    assert [r["run_id"] for r in in_flight()] == [submitted.run_id]  # a submitted run counts too
    for state in ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"):
        server.runs[submitted.run_id].state = state
        assert in_flight() == []
    for state in ("RUNNING", "PAUSED"):
        server.runs[submitted.run_id].state = state
        assert len(in_flight()) == 1
    server.runs[submitted.run_id].display_name = "flywheel-staging-monitoring 2025"
    assert in_flight() == []


def test_the_trigger_op_helpers_start_the_newest_published_version(server, isolated):
    # Given the training pipeline submitted twice (two stored versions), as a pipeline task sees KFP
    settings = staging(server)
    registry = tiny_registry.WithDefaults
    flywheel_submit.submit_pipeline(settings, "training", catalog=registry, version="v-old")
    newest = flywheel_submit.submit_pipeline(settings, "training", catalog=registry, version="v-new")
    for version in server.versions.values():  # the old one an hour older (the fake's clock has seconds)
        if version.display_name == "v-old":
            version.created_at -= dt.timedelta(hours=1)
    for run in server.runs.values():
        run.state = "SUCCEEDED"
    target = kfp_target_parameter(settings)
    assert target == {"host": server.url, "experiment": "credit-default-staging",
                      "pipeline": "flywheel-staging-training", "namespace": "flywheel-staging",
                      "pipeline_root": "s3://flywheel-staging-artifacts/pipelines",
                      "service_account": "flywheel-pipeline-runner"}
    assert kfp_api.published_runs_in_flight(target) == []
    # When the op's helper starts a run from the target dict alone
    run_id = kfp_api.start_published_run(target, {"reasons": REASONS, "source": "drift", "dedup_key": "k"},
                                         stamp="20250615-100000")
    # Then it runs the newest version with the arguments compiled into it (no config in a task), saying why
    run = server.runs[run_id]
    assert server.find("POST", "/runs")[-1].status == 200
    assert run.pipeline_version_reference.pipeline_version_id == newest.version_id
    assert run.runtime_config.parameters == tiny_pipeline.pipeline_arguments(settings, "training")
    assert run.display_name == "flywheel-staging-training retrain drift 20250615-100000"
    assert REASONS[0] in run.description
    assert [r["run_id"] for r in kfp_api.published_runs_in_flight(target)] == [run_id]


def test_retraining_without_a_published_version_says_how_to_publish(server, isolated, tmp_path):
    trigger = retrain.guarded_trigger(staging(server), audit=lambda d: None, state_path=str(tmp_path / "s.json"))
    decision = trigger.fire(REASONS, "manual", "k")
    assert decision["guard"] == "error" and server.runs == {}
    assert "no published version of 'flywheel-staging-training'" in decision["why"]
    assert "flywheel schedule" in decision["why"] and "\n" not in decision["why"]


def test_the_trigger_op_target_needs_a_host():
    with pytest.raises(ValueError, match="no KFP host"):
        kfp_api.KfpTarget.from_dict(kfp_target_parameter(load_settings("local")))
