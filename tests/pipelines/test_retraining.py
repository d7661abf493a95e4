"""Retraining means one thing: every cluster entry point (the monitoring pipeline's trigger op, the
monitor service's alert webhook, `flywheel monitor --trigger`) starts the env's PUBLISHED training
pipeline version with the arguments it was published with, through the same guard; and the
monitor service builds its trigger from a rendered file, not from pipelines/."""
import datetime as dt
import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import pipelines.cli as cli
import pipelines.cli_app as cli_app
from components.monitor import trigger_op
from monitoring.trigger import GuardedTrigger, trigger_from_file
from pipelines.arguments import as_parameter, kfp_target_parameter, monitor_config
from pipelines.config import load_settings
from pipelines.publish import publish
from tests.fakes import tiny_pipeline, tiny_registry
from tests.fakes.kfp_api_server import isolated, server  # noqa: F401
from tests.support import local_settings, reference, write_window

REASONS = ["age: PSI 0.412 > 0.2"]
ALERT = {"version": "4", "status": "firing", "receiver": "flywheel-retrain", "groupKey": "g",
         "alerts": [{"status": "firing", "fingerprint": "f1", "startsAt": "2025-06-15T10:00:00Z",
                     "labels": {"alertname": "FlywheelFeatureDrift", "flywheel_action": "retrain", "feature": "age"},
                     "annotations": {"summary": "Feature age drifted: PSI 0.350 > 0.2 for v7"}}]}


def on_kfp(tmp_path, server):
    """The local env's check (champion, windows, MLflow on this machine) whose KFP is the fake one:
    a cluster env's retraining path with a local sink. model_copy skips the validator that keeps
    an env with a KFP host off local sinks, which is the point here."""
    settings = local_settings(tmp_path, cooldown_minutes=0)
    return settings.model_copy(update={"kfp": settings.kfp.model_copy(update={"host": server.url})})


def render_trigger_file(settings, monkeypatch, path):
    monkeypatch.setattr(cli_app, "load_settings", lambda env: settings)
    result = CliRunner().invoke(cli.app, ["monitor-config", "--env", settings.env, "--out", str(path)])
    assert result.exit_code == 0, result.output
    return path


def end_all(server):
    for run in server.runs.values():
        run.state = "SUCCEEDED"


def test_every_cluster_entry_point_starts_the_published_version_with_its_arguments(
        server, isolated, tmp_path, champion, monkeypatch):
    # Given the env's training pipeline published (its arguments compiled in), as `flywheel schedule` does
    settings = on_kfp(tmp_path, server)
    published = publish(settings, "training", catalog=tiny_registry.WithDefaults)
    assert published.arguments == tiny_pipeline.pipeline_arguments(settings, "training")

    # When the monitoring pipeline's trigger op fires (what the compiled pipeline passes it)
    decision = tmp_path / "decision.json"
    decision.write_text(json.dumps({"reasons": REASONS, "dedup_key": "drift/op/w1"}))
    op = trigger_op(decision=SimpleNamespace(path=str(decision)), retraining_spec=as_parameter(settings.retraining),
                    kfp_target=kfp_target_parameter(settings), tracking=as_parameter(settings.mlflow),
                    env=settings.env, monitoring_spec=as_parameter(settings.monitoring))
    assert op["started"], op
    end_all(server)

    # and Alertmanager posts to the monitor service, whose trigger comes from the rendered file
    from starlette.testclient import TestClient

    from monitoring.service import alert_trigger, create_app
    from monitoring.sink import PayloadSink

    hook = trigger_from_file(str(render_trigger_file(settings, monkeypatch, tmp_path / "trigger.yaml")))
    sink = PayloadSink(str(tmp_path / "service-sink"), start=False)
    try:
        answer = TestClient(create_app(sink, trigger=alert_trigger(hook.fire))).post("/alerts", json=ALERT)
    finally:
        sink.close()
    assert answer.status_code == 202 and answer.json()["decision"]["started"], answer.text
    end_all(server)

    # and `flywheel monitor --trigger` decides to retrain (two drifting windows in a row)
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)
    shifted = reference(600, seed=5).assign(age=lambda f: f.age + 15)
    scores = np.random.default_rng(2).beta(2, 5, 600)
    when = dt.datetime(2025, 6, 15, 10, tzinfo=dt.UTC)
    for hour in (0, 1):
        write_window(settings.monitoring.sink.root, "7", shifted, when + dt.timedelta(hours=hour), scores)
        result = CliRunner().invoke(cli.app, ["monitor", "--env", "local", "--trigger", "--window", "600"])
        assert result.exit_code == 0, result.output
    assert "trigger: started " in result.stdout, result.stdout

    # Then three runs, one per entry point, each of the published version with the published arguments
    runs = sorted(server.runs.values(), key=lambda r: r.display_name)
    assert [r.display_name.split()[2] for r in runs] == ["alert", "drift", "drift"]
    assert {r.pipeline_version_reference.pipeline_version_id for r in runs} == {published.version_id}
    assert all(r.runtime_config.parameters == published.arguments for r in runs)
    assert {r.experiment_id for r in runs} == {e.experiment_id for e in server.experiments.values()}
    assert len(server.versions) == 1, "no entry point compiled or uploaded anything"


def test_the_rendered_monitor_config_holds_no_secrets_and_round_trips(tmp_path, monkeypatch, server):
    settings = load_settings("staging", overrides={"kfp": {"host": server.url}})
    path = render_trigger_file(settings, monkeypatch, tmp_path / "trigger.yaml")
    data = yaml.safe_load(path.read_text())
    assert data == monitor_config(settings)
    assert set(data) == {"env", "sink", "retraining", "kfp", "sink_root", "tracking"}
    # The one file configures the whole service: the env's sink settings come through as they are
    from monitoring.service import sink_spec

    assert sink_spec(str(path)) == settings.monitoring.sink
    assert data["kfp"] == {"host": server.url, "experiment": "credit-default-staging",
                           "pipeline": "flywheel-staging-training", "namespace": "flywheel-staging",
                           "pipeline_root": "s3://flywheel-staging-artifacts/pipelines",
                           "service_account": "flywheel-pipeline-runner"}
    assert not any(word in path.read_text().lower() for word in ("secret_access_key", "token", "password"))
    trigger = trigger_from_file(str(path))
    assert isinstance(trigger, GuardedTrigger) and trigger.env == "staging"
    assert trigger.state_path == f"{settings.monitoring.sink.root}/retraining-trigger.json"
    assert trigger.spec == settings.retraining


def test_a_monitor_service_of_an_env_without_kfp_gets_no_trigger(tmp_path, monkeypatch):
    # the local env retrains with `flywheel monitor --trigger`; a monitor service never runs a pipeline
    path = render_trigger_file(load_settings("local"), monkeypatch, tmp_path / "trigger.json")
    assert yaml.safe_load(path.read_text())["kfp"] is None
    assert trigger_from_file(str(path)) is None


@pytest.mark.parametrize("content, message", [
    ("env: staging\n", "missing retraining, sink_root, tracking; render it with `flywheel monitor-config"),
    ("env: [unclosed\n", "monitor config"),
])
def test_a_bad_monitor_config_is_one_line(tmp_path, content, message):
    path = tmp_path / "trigger.yaml"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        trigger_from_file(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)
