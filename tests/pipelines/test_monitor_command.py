"""`flywheel monitor` end to end on this machine: it checks the champion's logged traffic, reports,
and with `--trigger` retrains once; with no champion it says so in one line."""
import datetime as dt

import numpy as np
from typer.testing import CliRunner

import pipelines.cli as cli
import pipelines.cli_app as cli_app
import pipelines.local_runner as flywheel_local
import pipelines.serving as flywheel_serving
from monitoring.audit import STAGE
from pipelines import retrain
from tests.support import local_settings, reference, write_window


def test_flywheel_monitor_checks_reports_and_triggers_once(tmp_path, champion, monkeypatch):
    from mlflow import MlflowClient

    settings = local_settings(tmp_path)
    monkeypatch.setattr(cli_app, "load_settings", lambda env: settings)
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
    monkeypatch.setattr(cli_app, "load_settings", lambda env: settings)

    def none(settings, dst):
        raise LookupError("credit-default has no champion in sqlite:///...; run the training pipeline first")

    monkeypatch.setattr(flywheel_serving, "local_champion", none)
    result = CliRunner().invoke(cli.app, ["monitor", "--env", "local"])
    assert result.exit_code == 1 and "has no champion" in result.stderr
