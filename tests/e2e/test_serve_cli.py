"""`flywheel serve`, `deploy` and `rollback` on the embedded environment, against a real MLflow
registry and real server processes; `deploy --dry-run` on a cluster environment."""
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import crds
import pipelines.cli as cli
from pipelines.config import load_settings
from stages.dataset import ReferenceTask
from stages.versions import CHAMPION, PREVIOUS_CHAMPION
from tests.e2e.serving import NAME, aliases
from tests.support import CONFIG_DIR, free_port

runner = CliRunner()


@pytest.fixture
def use_config(registry, monkeypatch):
    monkeypatch.setattr("pipelines.config.CONFIG_DIR", registry[1])
    return registry


@pytest.mark.slow
def test_serve_keeps_the_champion_up_until_sigterm(registry, tmp_path):
    tracking, config = registry
    port = free_port()
    # Given `flywheel serve` started as a user starts it
    env = {**os.environ, "FLYWHEEL_CONFIG_DIR": str(config), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--env", "local", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops serving" in line:
                break
        text = "".join(lines)
        # Then it says what it serves and prints an example request that works as printed
        assert f"serving {NAME} v2" in text and f"http://127.0.0.1:{port}" in text, text
        body = text.split("-d '", 1)[1].split("'", 1)[0]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{NAME}:predict", data=body.encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["model_version"] == "2" and len(answer["predictions"]) == 1
    finally:
        # When it gets SIGTERM, Then both servers stop and it exits cleanly
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    assert "stopping" in rest
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)


@pytest.mark.slow
def test_deploy_smoke_tests_the_champion_on_loopback(use_config):
    result = runner.invoke(cli.app, ["deploy", "--env", "local"])
    assert result.exit_code == 0, result.output
    assert f"live: {NAME} v2 (served)" in result.output and "smoke test passed" in result.output


@pytest.mark.slow
def test_rollback_serves_the_previous_champion_and_makes_it_the_champion(use_config, tmp_path, monkeypatch):
    tracking, _ = use_config
    monkeypatch.chdir(tmp_path)  # no `flywheel serve` state here: nothing serves it afterwards
    assert aliases(tracking) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}
    # When the user rolls back
    result = runner.invoke(cli.app, ["rollback", "--env", "local"])
    # Then v1 was served and smoke-tested, and the registry says v1 is the champion again
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"live: {NAME} v1 (served)\n"), result.output  # no URL of a stopped server
    assert "nothing serves it here now: `flywheel serve --env local` does" in result.output
    assert aliases(tracking) == {CHAMPION: "1"}  # v1 has no earlier champion
    from gateways.mlflow_api import client

    assert client(tracking).get_model_version(NAME, "2").tags.get("rolled_back") == "true"
    # And rolling back again does not flip-flop back to the rolled-back v2
    again = runner.invoke(cli.app, ["rollback", "--env", "local"])
    assert again.exit_code == 1 and "nothing older to roll back to" in again.output, again.output
    assert aliases(tracking) == {CHAMPION: "1"}
    # And rolling forward to v2 restores it, untagged
    forward = runner.invoke(cli.app, ["rollback", "--env", "local", "--to", "2"])
    assert forward.exit_code == 0 and f"live: {NAME} v2 (served)" in forward.output, forward.output
    assert aliases(tracking) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}
    assert "rolled_back" not in client(tracking).get_model_version(NAME, "2").tags
    # And a version that does not exist is refused by name
    unknown = runner.invoke(cli.app, ["rollback", "--env", "local", "--to", "9"])
    assert unknown.exit_code == 1 and "has no version '9' (versions: 1, 2)" in unknown.output, unknown.output


@pytest.mark.slow
def test_rollback_and_the_banner_need_no_training_data(registry, tmp_path, monkeypatch):
    from pipelines.serving import example_records

    tracking, config = registry
    # Given an env whose training data file is gone
    copy = tmp_path / "config"
    shutil.copytree(config, copy)
    data = yaml.safe_load((copy / "local.yaml").read_text())
    data["dataset"] = {"source": "file", "uri": str(tmp_path / "gone.parquet")}
    data["mlflow"]["registered_model"] = NAME  # a file dataset's default model name is its file's
    (copy / "local.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setattr("pipelines.config.CONFIG_DIR", copy)
    monkeypatch.chdir(tmp_path)
    settings = load_settings("local")
    assert settings.dataset.source == "file" and not Path(settings.dataset.uri).exists()
    # Then the example rows (smoke test, banner) are the input example registered with the version
    columns = settings.dataset.features.columns
    registered = ReferenceTask(rows=20, seed=1).generate()[columns].head(3)  # what the fixture registered
    assert example_records(settings, "2") == json.loads(registered.to_json(orient="records"))
    assert len(example_records(settings, "2", rows=1)) == 1
    # And rollback and roll-forward serve and smoke-test without reading the dataset
    assert aliases(tracking) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}
    result = runner.invoke(cli.app, ["rollback", "--env", "local"])
    assert result.exit_code == 0 and f"live: {NAME} v1 (served)" in result.output, result.output
    forward = runner.invoke(cli.app, ["rollback", "--env", "local", "--to", "2"])
    assert forward.exit_code == 0 and f"live: {NAME} v2 (served)" in forward.output, forward.output
    assert aliases(tracking) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}


def test_deploy_dry_run_prints_the_inferenceservice_for_the_champion(use_config):
    # Given prod (Knative, canary 10%) and a champion in its registry
    result = runner.invoke(cli.app, ["deploy", "--env", "prod", "--dry-run"])
    assert result.exit_code == 0, result.output
    isvc = yaml.safe_load(result.output)
    # Then it is an InferenceService for the champion's files that holds to the CRD
    assert isvc["kind"] == "InferenceService" and isvc["metadata"]["namespace"] == "flywheel-prod"
    assert crds.schema_problems(isvc, crds.INFERENCESERVICE, "v1beta1") == []
    args = [c["args"] for c in isvc["spec"]["predictor"]["containers"]]
    assert all(a[a.index("--model_version") + 1] == "2" for a in args), args  # the champion's version is served
    assert isvc["spec"]["predictor"].get("canaryTrafficPercent") == 10


def test_serve_and_deploy_refuse_what_does_not_fit_the_env(use_config):
    assert "serves on a cluster" in runner.invoke(cli.app, ["serve", "--env", "prod"]).output
    result = runner.invoke(cli.app, ["deploy", "--env", "local", "--dry-run"])
    assert result.exit_code == 1 and "nothing to print" in result.output


def test_serve_without_a_champion_says_how_to_get_one(tmp_path, monkeypatch):
    config = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, config)
    (config / "local.yaml").write_text((config / "local.yaml").read_text()
                                       + f"mlflow: {{tracking_uri: 'sqlite:///{tmp_path / 'empty.db'}'}}\n")
    monkeypatch.setattr("pipelines.config.CONFIG_DIR", config)
    result = runner.invoke(cli.app, ["serve", "--env", "local"])
    assert result.exit_code == 1 and "has no champion" in result.output and "flywheel run" in result.output


@pytest.mark.slow
def test_the_run_summary_ends_with_real_predictions_over_v1_and_v2(use_config):
    from rich.console import Console

    from pipelines.local_runner import show_predictions

    # Given the champion in the registry, When `flywheel run` ends
    console = Console(record=True, width=200)
    show_predictions(load_settings("local"), console)
    text = console.export_text()
    # Then the champion was served and a few rows went through the transformer over both protocols
    assert f"{NAME} v2 served at http://127.0.0.1:" in text
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("│").split("│")]
        v1_label, v1_p, v2_label, v2_p = cells[-4:]
        assert v1_label == v2_label and v1_label in ("0", "1") and v1_p == v2_p
