"""Servers that are not there: every command that talks to MLflow, KFP or the Kubernetes API
answers within seconds in one line (the host, what it was doing, why), exit 1, no traceback;
dry-runs that need no server still work."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s
from typer.testing import CliRunner

from pipelines import cli, cli_app
from pipelines.config import load_settings
from storage.endpoints import Unreachable, doing, probe, redact
from tests.support import (
    ROOT,
    free_port,  # nothing listens there: connections are refused
)

ANSWER_WITHIN_S = 15


@pytest.fixture(autouse=True)
def fail_fast(monkeypatch):
    """What the CLI sets for itself (pipelines/cli.py); the subprocesses below go without it."""
    monkeypatch.setenv("FLYWHEEL_FAIL_FAST", "1")


def with_servers(config_dir: Path, env: str, *, mlflow: str | None = None, kfp: str | None = None) -> Path:
    path = config_dir / f"{env}.yaml"
    data = yaml.safe_load(path.read_text())
    if mlflow:
        data.setdefault("mlflow", {})["tracking_uri"] = mlflow
    if kfp:
        data.setdefault("kfp", {})["host"] = kfp
    path.write_text(yaml.safe_dump(data))
    return config_dir


def flywheel(args: list[str], config_dir: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """`flywheel ARGS` as a user runs it: a fresh process (imports included in the time)."""
    env = {key: value for key, value in os.environ.items() if key != "FLYWHEEL_FAIL_FAST"}
    env.update(FLYWHEEL_CONFIG_DIR=str(config_dir), KUBECONFIG=str(tmp_path / "no-kubeconfig"), NO_PROXY="*")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    return done, time.monotonic() - started


# --- the probe ------------------------------------------------------------------------------------


def test_a_refused_port_is_one_line_that_names_the_host_and_never_the_credentials():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(Unreachable) as err:
        probe("MLflow", f"http://alice:s3cret@127.0.0.1:{port}/mlflow?token=abc", proxy=None)
    assert time.monotonic() - started < 2
    line = str(err.value)
    assert line.startswith(f"cannot reach MLflow at http://127.0.0.1:{port}/mlflow: ") and "refused" in line
    assert "s3cret" not in line and "alice" not in line and "abc" not in line and "\n" not in line


def test_a_name_that_does_not_resolve_says_so():
    with pytest.raises(Unreachable, match=r"cannot reach KFP at http://mlflow\.invalid:5000: cannot resolve"):
        probe("KFP", "http://mlflow.invalid:5000", proxy=None)


def test_a_listening_server_passes_and_local_stores_are_not_probed():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        probe("MLflow", f"http://127.0.0.1:{server.getsockname()[1]}", proxy=None)
    probe("MLflow", "sqlite:///runs/mlflow.db")  # nothing to reach: no error
    probe("MLflow", "/tmp/mlruns")


def test_outside_the_cli_nothing_is_probed_and_the_clients_keep_their_retries(monkeypatch):
    # A pipeline task or a serving pod: a registry restarting for a minute is worth MLflow's retries
    monkeypatch.delenv("FLYWHEEL_FAIL_FAST")
    probe("MLflow", f"http://127.0.0.1:{free_port()}", proxy=None)


def test_the_probe_goes_where_the_client_goes_through_a_proxy(monkeypatch):
    # Given a server that listens, behind a proxy that does not: requests would fail at the proxy
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        proxy_port = free_port()
        monkeypatch.setenv("http_proxy", f"http://user:pw@127.0.0.1:{proxy_port}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        with pytest.raises(Unreachable, match=rf"through proxy http://127.0.0.1:{proxy_port}") as err:
            probe("MLflow", url)
        assert "pw" not in str(err.value)
        # and a host NO_PROXY names goes direct
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        probe("MLflow", url)


def test_the_innermost_activity_names_the_error():
    with pytest.raises(Unreachable) as err, doing("deploying"), doing("reading m@champion"):
        raise Unreachable("MLflow", "http://h:5000", "refused")
    assert str(err.value) == "cannot reach MLflow at http://h:5000 (reading m@champion): refused"


def test_redact_keeps_host_port_and_path_only():
    assert redact("https://tok:x@[::1]:8443/pipeline?auth=1#f") == "https://[::1]:8443/pipeline"
    assert redact("sqlite:///runs/mlflow.db") == "sqlite:///runs/mlflow.db"


# --- the clients --------------------------------------------------------------------------------


def test_the_registry_fails_in_seconds_not_after_mlflows_retries():
    from stages.versions import version_behind

    port = free_port()
    started = time.monotonic()
    with pytest.raises(Unreachable) as err:
        version_behind(f"http://127.0.0.1:{port}", "credit-default")
    assert time.monotonic() - started < 5, "MLflow's own retries take about 4 minutes"
    assert str(err.value).startswith(f"cannot reach MLflow at http://127.0.0.1:{port} "
                                     "(reading credit-default@champion): ")


def test_the_kubernetes_api_fails_in_seconds_naming_the_inferenceservice():
    from deployment.deployers import plan_model
    from deployment.rollout import InferenceServiceDeployer
    from pipelines.arguments import deploy_spec

    settings = load_settings("prod")
    isvc = plan_model(deploy_spec(settings), "3", model_uri="s3://models/credit-default/3")
    port = free_port()
    deployer = InferenceServiceDeployer(settings.namespace, client_configuration=k8s.Configuration(
        host=f"https://127.0.0.1:{port}"), log=lambda _: None)
    started = time.monotonic()
    with pytest.raises(Unreachable) as err:
        deployer.deploy(isvc)
    assert time.monotonic() - started < 5
    name = isvc["metadata"]["name"]
    assert str(err.value).startswith(f"cannot reach the Kubernetes API at https://127.0.0.1:{port} "
                                     f"(reading InferenceService {settings.namespace}/{name}): ")


def test_no_kubernetes_config_is_one_line(monkeypatch, tmp_path):
    from gateways.kube_api import KubeApi, NotConfigured

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(NotConfigured, match=r"^no Kubernetes API configured: .*KUBECONFIG"):
        KubeApi().connect()


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_cluster_training_backends_fail_in_seconds(backend):
    from pipelines.arguments import train_spec
    from training.backends.pytorchjob import PyTorchJobBackend
    from training.backends.trainjob import TrainJobBackend

    spec = train_spec(load_settings("dev"))
    configuration = k8s.Configuration(host=f"https://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(Unreachable, match=r"^cannot reach the Kubernetes API at https://127\.0\.0\.1:"):
        if backend == "pytorchjob":
            PyTorchJobBackend(spec, client_configuration=configuration).kube.connect()  # connected on first use
        else:
            TrainJobBackend(spec, client_configuration=configuration).kube.connect()
    assert time.monotonic() - started < 5


# --- the CLI ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "args", "mlflow", "doing_"), [
    ("dev", ["deploy", "--dry-run"], "http://127.0.0.1:{port}", "reading credit-default@champion"),
    ("dev", ["monitor"], "http://mlflow.invalid:5000", "reading credit-default@champion"),
    ("dev", ["rollback"], "http://127.0.0.1:{port}", None),
    ("dev", ["shadow", "start", "--dry-run"], "http://127.0.0.1:{port}", "reading credit-default@challenger"),
    ("dev", ["shadow", "start"], "http://127.0.0.1:{port}", "reading credit-default@challenger"),
    ("dev", ["shadow", "report"], "http://127.0.0.1:{port}", "reading credit-default@challenger"),
    ("local", ["serve", "--port", "{port}"], "http://127.0.0.1:{port}", "reading credit-default@champion"),
])
def test_cli_answers_in_one_line_within_seconds(env, args, mlflow, doing_, config_dir, tmp_path):
    port = free_port()
    uri = mlflow.format(port=port)
    args = [arg.format(port=port) for arg in args]
    done, elapsed = flywheel([*args, "--env", env], with_servers(config_dir, env, mlflow=uri), tmp_path)
    assert done.returncode == 1, done.stderr
    assert elapsed < ANSWER_WITHIN_S
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach MLflow at {uri}" + (f" ({doing_}): " if doing_ else "")), line
    assert done.stdout == ""


def test_deploy_dry_run_with_a_model_uri_needs_no_server(config_dir, tmp_path):
    from deployment.inferenceservice import validate_inferenceservice

    port = free_port()
    with_servers(config_dir, "prod", mlflow=f"http://127.0.0.1:{port}", kfp=f"http://127.0.0.1:{port}")
    done, elapsed = flywheel(["deploy", "--env", "prod", "--dry-run", "--model-uri", "s3://models/x/1",
                              "--version", "1"], config_dir, tmp_path)
    assert done.returncode == 0, done.stderr
    assert elapsed < ANSWER_WITHIN_S
    isvc = yaml.safe_load(done.stdout)
    assert validate_inferenceservice(isvc) == isvc
    assert isvc["metadata"]["annotations"]["flywheel/model-uri"] == "s3://models/x/1"
    assert isvc["metadata"]["annotations"]["flywheel/model-version"] == "1"
    assert "s3://models/x/1" in yaml.safe_dump(isvc["spec"])


def test_model_uri_goes_with_dry_run_only():
    result = CliRunner().invoke(cli.app, ["deploy", "--env", "prod", "--model-uri", "s3://models/x/1"])
    assert result.exit_code == 1 and "go with --dry-run" in result.stderr


def test_schedule_dry_run_offline_prints_what_config_declares(monkeypatch):
    port = free_port()
    settings = load_settings("staging", overrides={"kfp": {"host": f"http://127.0.0.1:{port}"},
                                                   "retraining": {"enabled": True, "schedule": "0 4 * * *"}})
    monkeypatch.setattr(cli_app, "load_settings", lambda env: settings)
    result = CliRunner().invoke(cli.app, ["schedule", "--env", "staging", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "declared flywheel-staging-training-retrain: cron '0 0 4 * * *' (config '0 4 * * *'), max_concurrency 1, "
        "no catchup",
        "declared flywheel-staging-monitoring-check: cron '0 0 */6 * * *' (every 6 h), max_concurrency 1, no catchup"]
    (note,) = result.stderr.strip().splitlines()
    assert note.startswith(f"note: not compared with the server: cannot reach KFP at http://127.0.0.1:{port} "
                           "(reading recurring runs flywheel-staging-*): ")
    # Applying needs the server: one line, exit 1
    applied = CliRunner().invoke(cli.app, ["schedule", "--env", "staging"])
    assert applied.exit_code == 1
    (line,) = applied.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach KFP at http://127.0.0.1:{port}")


def test_an_object_store_error_is_one_line_not_a_traceback(tmp_path):
    # s3fs raises botocore's errors (not OSError) for a refused endpoint or missing credentials
    import typer
    from botocore.exceptions import EndpointConnectionError

    app = typer.Typer(cls=cli_app.Commands)

    @app.command()
    def read() -> None:
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket/windows")

    @app.command()
    def other() -> None:
        raise KeyError("not ours to hide")

    result = CliRunner().invoke(app, ["read"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        'error: object store: Could not connect to the endpoint URL: "http://127.0.0.1:9/bucket/windows"']
    assert isinstance(CliRunner().invoke(app, ["other"]).exception, KeyError)
