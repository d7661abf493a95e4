"""The guarded retraining trigger: the storm guard (cool-down), one run in flight, dedup, every
decision audited in MLflow; the cluster run-starting against the fake KFP API with the reasons on
the run; the local runner's lock; the monitoring pipeline that fires it, compiled for every env;
`flywheel monitor` end to end on this machine. (Every cluster entry point starting the same
published version: tests/test_retraining.py.)"""
import datetime as dt
import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import pipelines.cli as cli
import pipelines.local_runner as flywheel_local
import pipelines.publish as flywheel_publish
import pipelines.serving as flywheel_serving
import pipelines.submit as flywheel_submit
from gateways import kfp_api
from monitoring.audit import STAGE, mlflow_audit
from monitoring.trigger import GuardedTrigger
from pipelines import retrain
from pipelines.arguments import kfp_target_parameter
from pipelines.catalog import compile_pipeline, load_compiled
from pipelines.config import environments, load_settings
from specs import RetrainingSpec
from tests.fakes import tiny_pipeline, tiny_registry
from tests.fakes.kfp_api_server import isolated, server  # noqa: F401

REASONS = ["age: PSI 0.412 > 0.2", "prediction drift: score PSI 0.31 > 0.2"]


class Clock:
    def __init__(self, now: float = 1_750_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, minutes: float) -> None:
        self.now += minutes * 60


class Runs:
    """start_run and runs_in_flight of a fake orchestrator: started runs stay in flight until ended."""

    def __init__(self):
        self.started: list[dict] = []
        self.in_flight: list[dict] = []

    def start(self, request: dict) -> str:
        run_id = f"run-{len(self.started) + 1}"
        self.started.append(request)
        self.in_flight.append({"run_id": run_id, "state": "RUNNING"})
        return run_id

    def end_all(self) -> None:
        self.in_flight.clear()


def make_trigger(tmp_path, runs: Runs, clock: Clock, audit=None, **spec) -> GuardedTrigger:
    decisions = [] if audit is None else None
    trigger = GuardedTrigger(RetrainingSpec(**{"cooldown_minutes": 60, **spec}), "staging", start_run=runs.start,
                             runs_in_flight=lambda: list(runs.in_flight),
                             audit=audit or decisions.append, clock=clock,
                             state_path=str(tmp_path / "state" / "retraining-trigger.json"))
    trigger.decisions = decisions
    return trigger


# --- the guards ---------------------------------------------------------------------------------

def test_a_second_drift_inside_the_cooldown_starts_no_second_run(tmp_path):
    runs, clock = Runs(), Clock()
    trigger = make_trigger(tmp_path, runs, clock)
    # Given a drift decision that started a run, which then finished
    first = trigger.fire(REASONS, "drift", "drift/staging/v3/window-1")
    assert first["started"] and first["run_id"] == "run-1" and first["guard"] is None
    runs.end_all()
    # When the next window drifts too, 10 minutes later (cool-down 60 min)
    second = trigger.fire(REASONS, "drift", "drift/staging/v3/window-2")
    # Then no second run starts, and the decision says why
    assert not second["started"] and second["guard"] == "cooldown" and second["run_id"] is None
    assert "60 min cool-down" in second["why"] and "run-1" in second["why"]
    # ... and an alert storm inside the cool-down is refused the same way
    clock.advance(30)
    assert trigger.fire(["alert FlywheelFeatureDrift"], "alert", "alert/abc@t")["guard"] == "cooldown"
    assert len(runs.started) == 1
    # Once the cool-down has passed, a new drift starts a run again
    clock.advance(31)
    third = trigger.fire(REASONS, "drift", "drift/staging/v3/window-3")
    assert third["started"] and third["run_id"] == "run-2"


def test_at_most_one_retraining_run_in_flight(tmp_path):
    runs, clock = Runs(), Clock()
    trigger = make_trigger(tmp_path, runs, clock, cooldown_minutes=0)
    assert trigger.fire(REASONS, "drift", "k1")["started"]
    # While run-1 is in flight, no cool-down at all: still refused
    clock.advance(5)
    refused = trigger.fire(REASONS, "alert", "k2")
    assert (refused["started"], refused["guard"]) == (False, "in_flight")
    assert refused["in_flight"] == [{"run_id": "run-1", "state": "RUNNING"}] and "run-1" in refused["why"]
    runs.end_all()
    assert trigger.fire(REASONS, "alert", "k2")["started"]
    assert [r["dedup_key"] for r in runs.started] == ["k1", "k2"]


def test_two_triggers_at_once_start_one_run(tmp_path):
    # Given a start_run that takes a while (a KFP call, or the local runner), and two triggers on one state
    runs, clock = Runs(), Clock()
    entered, release = threading.Event(), threading.Event()
    slow = Runs()

    def start(request):
        entered.set()
        release.wait(5)
        return slow.start(request)

    a = GuardedTrigger(RetrainingSpec(cooldown_minutes=0), "staging", start_run=start,
                       runs_in_flight=lambda: [], audit=lambda d: None, clock=clock,
                       state_path=str(tmp_path / "state.json"))
    b = GuardedTrigger(RetrainingSpec(cooldown_minutes=0), "staging", start_run=runs.start,
                       runs_in_flight=lambda: [], audit=lambda d: None, clock=clock,
                       state_path=str(tmp_path / "state.json"))
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault("a", a.fire(REASONS, "drift", "k-a")))
    thread.start()
    assert entered.wait(5)
    # When the second fires while the first is still starting its run
    results["b"] = b.fire(REASONS, "alert", "k-b")
    release.set()
    thread.join(5)
    # Then the second is refused: the first one's claim counts as a run in flight
    assert results["a"]["started"] and not results["b"]["started"]
    assert results["b"]["guard"] == "in_flight" and "another trigger is starting a run" in results["b"]["why"]
    assert len(slow.started) == 1 and runs.started == []


def test_a_handled_dedup_key_starts_nothing(tmp_path):
    runs, clock = Runs(), Clock()
    trigger = make_trigger(tmp_path, runs, clock, cooldown_minutes=0)
    assert trigger.fire(REASONS, "alert", "alert/fp1@2025-06-15T10:00:00Z")["started"]
    runs.end_all()
    # When Alertmanager repeats the same notification hours later
    clock.advance(240)
    again = trigger.fire(REASONS, "alert", "alert/fp1@2025-06-15T10:00:00Z")
    assert (again["started"], again["guard"]) == (False, "duplicate") and "run-1" in again["why"]
    assert len(runs.started) == 1


def test_trigger_on_drift_off_refuses_drift_and_alerts_not_a_person(tmp_path):
    runs, clock = Runs(), Clock()
    trigger = make_trigger(tmp_path, runs, clock, trigger_on_drift=False)
    for source in ("drift", "alert"):
        refused = trigger.fire(REASONS, source, f"{source}-1")
        assert (refused["started"], refused["guard"]) == (False, "disabled")
        assert "trigger_on_drift is false" in refused["why"]
    assert runs.started == []
    assert trigger.fire(["asked for by hand"], "manual", "manual-1")["started"]


def test_the_state_survives_a_restart(tmp_path):
    runs, clock = Runs(), Clock()
    make_trigger(tmp_path, runs, clock).fire(REASONS, "drift", "k1")
    runs.end_all()
    # A new trigger (a restarted service, the next monitoring pod) on the same state file
    clock.advance(1)
    restarted = make_trigger(tmp_path, runs, clock)
    assert restarted.fire(REASONS, "drift", "k2")["guard"] == "cooldown"
    assert restarted.fire(REASONS, "drift", "k1")["guard"] == "duplicate"
    state = restarted.state()
    assert state["last_run_id"] == "run-1" and set(state["handled"]) == {"k1"} and "claim" not in state


def test_a_failed_start_is_no_start(tmp_path):
    clock = Clock()
    calls = []

    def broken(request):
        calls.append(request)
        if len(calls) == 1:
            raise ConnectionError("KFP at https://kfp is unreachable")
        return "run-ok"

    decisions = []
    trigger = GuardedTrigger(RetrainingSpec(cooldown_minutes=60), "staging", start_run=broken,
                             runs_in_flight=lambda: [], audit=decisions.append, clock=clock,
                             state_path=str(tmp_path / "s.json"))
    failed = trigger.fire(REASONS, "drift", "k1")
    assert (failed["started"], failed["guard"]) == (False, "error") and "unreachable" in failed["why"]
    # No cool-down, no handled key, no leftover claim: the same decision may try again at once
    retried = trigger.fire(REASONS, "drift", "k1")
    assert retried["started"] and retried["run_id"] == "run-ok"
    assert [d["guard"] for d in decisions] == ["error", None]


def test_runs_that_cannot_be_listed_start_nothing(tmp_path):
    runs = Runs()

    def unlistable():
        raise TimeoutError("list_runs timed out")

    trigger = GuardedTrigger(RetrainingSpec(), "staging", start_run=runs.start, runs_in_flight=unlistable,
                             audit=lambda d: None, state_path=str(tmp_path / "s.json"))
    decision = trigger.fire(REASONS, "drift", "k1")
    assert decision["guard"] == "error" and "cannot list the runs in flight" in decision["why"]
    assert runs.started == []


def test_every_decision_is_an_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = {"tracking_uri": uri, "experiment": "credit-default-staging", "registered_model": "credit-default"}
    runs, clock = Runs(), Clock()
    trigger = make_trigger(tmp_path, runs, clock, audit=mlflow_audit(tracking))
    decisions = [trigger.fire(REASONS, "drift", "w1")]  # started
    clock.advance(61)
    decisions.append(trigger.fire(REASONS, "drift", "w2"))  # in flight
    runs.end_all()
    decisions.append(trigger.fire(REASONS, "drift", "w3"))  # started
    clock.advance(1)
    decisions.append(trigger.fire(["alert FlywheelFeatureDrift: age"], "alert", "a1"))  # cool-down
    assert [d["guard"] for d in decisions] == [None, "in_flight", None, "cooldown"]
    assert [d.get("audit_error") for d in decisions] == [None] * 4

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("credit-default-staging")
    found = client.search_runs([experiment.experiment_id], f"tags.`flywheel.stage` = '{STAGE}'",
                               order_by=["attributes.start_time ASC"])
    assert len(found) == 4
    by_key = {r.data.params["dedup_key"]: r for r in found}
    started = by_key["w1"]
    assert started.data.tags["flywheel.trigger.started"] == "true"
    assert started.data.tags["flywheel.trigger.run_id"] == "run-1"
    assert started.data.tags["flywheel.trigger.reasons"] == "; ".join(REASONS)
    assert [started.data.params[f"reason_{i}"] for i in range(2)] == REASONS
    assert started.data.params["source"] == "drift" and started.data.metrics["started"] == 1.0
    assert started.data.tags["flywheel.env"] == "staging" and started.info.status == "FINISHED"
    in_flight = by_key["w2"]
    assert in_flight.data.tags["flywheel.trigger.guard"] == "in_flight" and in_flight.data.metrics["started"] == 0
    assert in_flight.data.metrics["runs_in_flight"] == 1
    cooled = by_key["a1"]
    assert cooled.data.tags["flywheel.trigger.guard"] == "cooldown"
    assert cooled.data.params["reason_0"] == "alert FlywheelFeatureDrift: age"
    assert "cool-down" in cooled.data.tags["flywheel.trigger.why"]


def test_an_audit_that_fails_does_not_undo_the_decision(tmp_path):
    def broken(decision):
        raise ConnectionError("mlflow down")

    runs = Runs()
    decision = make_trigger(tmp_path, runs, Clock(), audit=broken).fire(REASONS, "drift", "k")
    assert decision["started"] and "mlflow down" in decision["audit_error"]


# --- on a cluster: the fake KFP API --------------------------------------------------------------

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


# --- on this machine: the local runner's lock -----------------------------------------------------

def test_local_runs_hold_a_lock_that_counts_as_in_flight(tmp_path, small_settings):
    lock = tmp_path / "retraining.lock"
    in_flight = retrain.local_runs_in_flight(lock)
    seen = []

    class Run:
        directory = tmp_path / "local" / "run-1"

    def execute(settings):
        seen.append(in_flight())
        return Run()

    start = retrain.local_start_run(small_settings, lock, execute=execute)
    assert in_flight() == []
    assert start({"reasons": REASONS, "source": "drift", "dedup_key": "k"}) == str(Run.directory)
    # during the run the lock was held (and named this process), afterwards it is free
    (held,) = seen[0]
    assert held["state"] == "RUNNING" and held["lock"] == str(lock) and isinstance(held["pid"], int)
    assert in_flight() == []


def test_a_trigger_is_refused_while_a_local_run_holds_the_lock(tmp_path, small_settings):
    lock = tmp_path / "retraining.lock"
    trigger = retrain.guarded_trigger(small_settings, audit=lambda d: None, lock_path=lock,
                                      state_path=str(tmp_path / "state.json"))
    with retrain.holding(lock):  # `flywheel monitor --trigger` running the pipeline elsewhere
        decision = trigger.fire(REASONS, "drift", "k")
    assert decision["guard"] == "in_flight" and "local pid" in decision["why"]


# --- the monitoring pipeline --------------------------------------------------------------------

@pytest.mark.parametrize("env", environments())
def test_the_monitoring_pipeline_compiles_with_its_trigger_behind_a_dsl_if(env, tmp_path):
    settings = load_settings(env)
    spec = load_compiled(compile_pipeline(settings, "monitoring", tmp_path))
    assert spec["pipelineInfo"]["name"] == "flywheel-monitoring"
    tasks = spec["root"]["dag"]["tasks"]
    assert {"champion-op", "window-op", "drift-op", "decide-op"} <= set(tasks)
    assert "trigger-op" not in tasks, "the trigger runs only inside the decision's branch"
    assert tasks["drift-op"]["dependentTasks"] == ["champion-op", "window-op"]
    (branch,) = [t for t in tasks.values() if "triggerPolicy" in t]
    assert branch["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--decide-op-Output'] " \
                                                   "== 'retrain'"
    inner = spec["components"][branch["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"trigger-op"}
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["monitoring_spec"]["window_rows"] == settings.monitoring.window_rows
    assert defaults["retraining_spec"]["cooldown_minutes"] == settings.retraining.cooldown_minutes
    assert defaults["kfp_target"]["pipeline"] == f"flywheel-{env}-training"
    outputs = spec["components"]["comp-drift-op"]["outputDefinitions"]["artifacts"]
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"
    if settings.embedded:
        assert "host" not in defaults["kfp_target"] and "platforms" not in spec
    else:
        assert defaults["kfp_target"]["host"] == settings.kfp.host
        executors = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        # the trigger task gets Kubeflow's KFP token (PodDefault by label) and object-store credentials by name
        assert executors["exec-trigger-op"]["podMetadata"]["labels"] == {"access-ml-pipeline": "true"}
        assert {s["secretName"] for e in executors.values() for s in e["secretAsEnv"]} == {"flywheel-object-store"}
        assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {settings.image.ref}


# --- the check's history and `flywheel monitor` on this machine ------------------------------------

FEATURES = {"numeric": ["age", "income"], "categorical": ["employment"]}


def reference(rows=4000, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.normal(40, 10, rows), "income": rng.lognormal(10, 0.5, rows),
                         "employment": rng.choice(["salaried", "self", "none"], rows, p=[0.6, 0.3, 0.1])})


def write_window(root, version, frame, when, scores):
    from monitoring.windows import window_file

    rows = frame.assign(request_id=[f"r-{when:%H%M}-{i}" for i in range(len(frame))], instance=0,
                        event_time=pd.Timestamp(when), model_name="credit-default", model_version=version,
                        probability=scores, prediction=np.where(scores > 0.5, "1", "0"), truth=None)
    path = Path(window_file(root, version, when))
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(path, index=False)


@pytest.fixture
def champion(tmp_path, monkeypatch):
    """A champion whose model directory carries a reference profile (no training: the registry lookup
    is replaced by a directory with the metadata training writes)."""
    from model.profile import build_profile

    rng = np.random.default_rng(1)
    profile = build_profile(reference(), FEATURES["numeric"], FEATURES["categorical"], rng.beta(2, 5, 2000),
                            rng.integers(0, 2, 2000))
    model_dir = tmp_path / "champion"
    model_dir.mkdir()
    (model_dir / "metadata.json").write_text(json.dumps({"reference_profile": profile, "features": FEATURES,
                                                         "labels": None}))
    monkeypatch.setattr(flywheel_serving, "local_champion", lambda settings, dst: ("7", str(model_dir)))
    return profile


def local_settings(tmp_path, **retraining):
    return load_settings("local", overrides={
        "dataset": {"features": FEATURES},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "monitoring": {"sink": {"root": str(tmp_path / "sink")}, "min_samples": 200, "consecutive_windows": 2},
        "retraining": {"cooldown_minutes": 60, **retraining},
    })


def test_the_same_window_checked_twice_counts_once(tmp_path, champion):
    from monitoring.check import history_uri, load_history, run_check
    from monitoring.windows import read_window

    settings = local_settings(tmp_path)
    root = settings.monitoring.sink.root
    when = dt.datetime(2025, 6, 15, 10, tzinfo=dt.UTC)
    shifted = reference(600, seed=5).assign(age=lambda f: f.age + 15)
    write_window(root, "7", shifted, when, np.random.default_rng(2).beta(2, 5, 600))

    def check():
        frame = read_window(root, model_version="7")
        return run_check(frame, champion, settings.monitoring, settings.dataset.features, model_version="7",
                         root=root, env="local", render=False)

    first = check()
    assert first.report.breaches and not first.retrain and "1 of 2" in first.reasons[0]
    second = check()  # no new traffic: the same window again
    assert not second.retrain and len(load_history(history_uri(root, "7"))) == 1
    write_window(root, "7", shifted, when + dt.timedelta(hours=1), np.random.default_rng(3).beta(2, 5, 600))
    third = check()
    assert third.retrain and "2 consecutive breaching windows" in third.reasons[0]
    assert third.dedup_key.startswith("drift/local/v7/") and third.dedup_key != first.dedup_key


def test_overlapping_windows_are_not_two_breaching_windows_but_disjoint_ones_are(tmp_path, champion):
    from monitoring.check import history_uri, load_history, run_check
    from monitoring.windows import read_window

    settings = local_settings(tmp_path)
    spec = settings.monitoring.model_copy(update={"window_rows": 600})  # a check reads the newest 600 rows
    root = spec.sink.root
    when = dt.datetime(2025, 6, 15, 10, tzinfo=dt.UTC)

    def traffic(rows, at, seed):
        shifted = reference(rows, seed=seed).assign(age=lambda f: f.age + 15)
        write_window(root, "7", shifted, at, np.random.default_rng(seed).beta(2, 5, rows))

    def check():
        frame = read_window(root, model_version="7", rows=spec.window_rows)
        return run_check(frame, champion, spec, settings.dataset.features, model_version="7", root=root,
                         env="local", render=False)

    # Given a breaching window of 600 rows
    traffic(600, when, 5)
    first = check()
    assert first.report.breaches and not first.retrain and "1 of 2" in first.reasons[0]
    # When a check hours later sees 100 new rows and 500 of the first window's (< min_samples 200 new)
    traffic(100, when + dt.timedelta(hours=3), 6)
    overlapping = check()
    # Then it breaches too, but it is not a second breaching window: no retraining, and it says why
    assert overlapping.report.breaches and overlapping.report.enough_data and not overlapping.retrain
    assert "1 of 2" in overlapping.reasons[0] and "not new evidence" in overlapping.reasons[0]
    assert "100 rows newer" in overlapping.reasons[0]
    history = load_history(history_uri(root, "7"))
    assert [(h["new_rows"], h["new_evidence"]) for h in history] == [(600, True), (100, False)]
    # When the next check's window is disjoint from the first's (600 rows, all new)
    traffic(600, when + dt.timedelta(hours=6), 7)
    disjoint = check()
    # Then the two breaching windows retrain
    assert disjoint.retrain and "2 consecutive breaching windows" in disjoint.reasons[0]
    assert load_history(history_uri(root, "7"))[-1]["new_rows"] == 600


def test_a_check_that_is_not_new_evidence_neither_adds_to_nor_breaks_the_streak():
    from monitoring.check import decide
    from specs import MonitoringSpec

    spec = MonitoringSpec(consecutive_windows=2)
    breach = {"enough_data": True, "breaches": ["age: PSI 0.4"], "rows": 800}
    calm = {"enough_data": True, "breaches": [], "rows": 800}
    stale = {"new_evidence": False, "new_rows": 50}
    assert not decide([breach, {**breach, **stale}], spec).retrain
    assert decide([breach, {**calm, **stale}, breach], spec).retrain
    assert decide([breach, breach], spec).retrain and not decide([breach, calm, breach], spec).retrain
    assert not decide([breach, {**breach, **stale, "enough_data": False}, breach], spec).retrain


def test_flywheel_monitor_checks_reports_and_triggers_once(tmp_path, champion, monkeypatch):
    from mlflow import MlflowClient

    settings = local_settings(tmp_path)
    monkeypatch.setattr(cli, "load_settings", lambda env: settings)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at 80 columns off a terminal
    started = []

    class Run:
        directory = tmp_path / "runs" / "local" / "retrained"

    def run_local(settings, verbose=False, predictions=True):
        started.append(settings.env)
        return Run()

    monkeypatch.setattr(flywheel_local, "run_local", run_local)
    monkeypatch.setattr(retrain, "PIPELINE_ROOT", tmp_path / "runs" / "local")
    root = settings.monitoring.sink.root
    when = dt.datetime(2025, 6, 15, 10, tzinfo=dt.UTC)
    scores = np.random.default_rng(2).beta(2, 5, 600)
    shifted = reference(600, seed=5).assign(age=lambda f: f.age + 15)

    def monitor(*extra):
        result = CliRunner().invoke(cli.app, ["monitor", "--env", "local", *extra])
        assert result.exit_code == 0, result.output
        return result.stdout

    # First drifting window: the table shows the drifted feature; one breaching window is not enough
    write_window(root, "7", shifted, when, scores)
    out = monitor("--trigger")
    assert "age" in out and "breach" in out and "decision: hold" in out
    assert "trigger: not fired" in out and started == []
    (report,) = (tmp_path / "runs" / "monitoring").glob("report-*.html")
    assert "<html" in report.read_text().lower()
    # Second drifting window: retrain, the trigger runs the training pipeline here
    write_window(root, "7", shifted, when + dt.timedelta(hours=1), scores)
    out = monitor("--trigger", "--window", "600")
    assert "decision: RETRAIN" in out and f"trigger: started {Run.directory}" in out
    assert started == ["local"]
    # Third: still drifting, inside the cool-down: refused, nothing started
    write_window(root, "7", shifted, when + dt.timedelta(hours=2), scores)
    out = monitor("--trigger", "--window", "600")
    assert "trigger: refused (cooldown)" in out and started == ["local"]
    # Both decisions are in MLflow
    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    found = client.search_runs([experiment.experiment_id], f"tags.`flywheel.stage` = '{STAGE}'")
    assert sorted(r.data.tags["flywheel.trigger.started"] for r in found) == ["false", "true"]


def test_flywheel_monitor_without_a_champion_says_so(tmp_path, monkeypatch):
    settings = local_settings(tmp_path)
    monkeypatch.setattr(cli, "load_settings", lambda env: settings)

    def none(settings, dst):
        raise LookupError("credit-default has no champion in sqlite:///...; run the training pipeline first")

    monkeypatch.setattr(flywheel_serving, "local_champion", none)
    result = CliRunner().invoke(cli.app, ["monitor", "--env", "local"])
    assert result.exit_code == 1 and "has no champion" in result.stderr


def test_compiled_defaults_hold_no_nulls():
    # the trigger's target and the specs travel as STRUCT defaults: protobuf structs hold no null
    from pipelines.arguments import monitoring_arguments as arguments

    def nulls(value, path=""):
        if isinstance(value, dict):
            return [p for k, v in value.items() for p in nulls(v, f"{path}.{k}")]
        if isinstance(value, list):
            return [p for i, v in enumerate(value) for p in nulls(v, f"{path}[{i}]")]
        return [path] if value is None else []

    for env in environments():
        assert nulls(arguments(load_settings(env))) == [], env


def test_the_check_ops_run_in_kfp_local_and_decide_with_hysteresis(tmp_path, run_pipeline):
    # Given the local env's real features, a profile of its data, a shifted window logged for v7,
    # and a history whose last check (an earlier window) breached already
    from model.profile import build_profile
    from monitoring.check import history_uri, load_history, save_history
    from pipelines.arguments import monitoring_arguments as arguments
    from stages.dataset import load_dataset
    from tests.fakes import monitor_pipeline

    settings = load_settings("local", overrides={
        "dataset": {"rows": 3000}, "monitoring": {"sink": {"root": str(tmp_path / "sink")}, "min_samples": 200}})
    root, features = settings.monitoring.sink.root, settings.dataset.features
    frame = load_dataset(settings.dataset)
    rng = np.random.default_rng(0)
    profile = build_profile(frame, features.numeric, features.categorical, rng.beta(2, 5, 1000),
                            rng.integers(0, 2, 1000))
    live = frame[features.columns].head(600).assign(age=lambda f: f.age + 20)
    write_window(root, "7", live, dt.datetime(2025, 6, 15, 10, tzinfo=dt.UTC), rng.beta(2, 5, len(live)))
    save_history(history_uri(root, "7"), [{"window": "v7/earlier", "rows": 600, "enough_data": True,
                                           "breaches": ["age: PSI 0.5 > 0.2"], "metrics": {}}])
    args = arguments(settings)
    champion_json = json.dumps({"model_version": "7", "profile": profile, "labels": None,
                                "features": features.model_dump()})
    # When the real window, drift and decide ops run through kfp.local
    run = run_pipeline(monitor_pipeline.build(), champion_json=champion_json, monitoring_spec=args["monitoring_spec"],
                       dataset_spec=args["dataset_spec"], suite=args["suite"], env="local")
    # Then the drift task logged KFP metrics per feature and wrote the HTML report
    drift_task = run.tasks["drift-op"]
    metrics = drift_task.artifacts["metrics"]["metadata"]
    assert metrics["rows"] == 600.0 and metrics["psi_age"] > settings.monitoring.psi_threshold
    assert metrics["drifted_age"] == 1.0
    assert "<html" in Path(drift_task.artifacts["report"]["uri"]).read_text().lower()
    assert drift_task.parameters["enough_data"] is True and drift_task.parameters["breaches"] >= 1
    # and, a second breaching window in a row (consecutive_windows 2), the decision is to retrain
    decide = run.tasks["decide-op"]
    assert decide.parameters["Output"] == "retrain"
    decision = json.loads(Path(decide.artifacts["decision"]["uri"]).read_text())
    assert decision["retrain"] and decision["dedup_key"].startswith("drift/local/v7/20250615T100000-")
    assert [h["window"] for h in load_history(history_uri(root, "7"))][0] == "v7/earlier"
    assert len(load_history(history_uri(root, "7"))) == 2


def test_the_checks_metrics_are_posted_to_the_monitors_drift_endpoint():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from monitoring.publish import drift_url, post_drift

    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            body = json.dumps({"gauges": 2, "model_version": "7"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/events"
        assert drift_url(url) == url.removesuffix("/events") + "/drift"
        line = post_drift(url, "7", {"psi_age": 0.35, "rows": 600.0})
        assert line.startswith("metrics: 2 gauges set at ") and line.endswith("/drift")
        assert received == [("/drift", {"model_version": "7", "metrics": {"psi_age": 0.35, "rows": 600.0}})]
    finally:
        httpd.shutdown()
        httpd.server_close()
    # a monitor that is down does not fail the check: it is said
    assert post_drift(url, "7", {"rows": 1.0}, timeout=2).startswith("metrics: not posted to ")
