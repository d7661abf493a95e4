"""`flywheel submit` (publish, then run) with the real kfp.Client against a fake KFP API server held
to the REST contract."""
import datetime as dt
import json
import logging
import time

import pytest
import yaml
from typer.testing import CliRunner

import pipelines.cli as cli
import pipelines.cli_app as cli_app
import pipelines.publish as flywheel_publish
from gateways import kfp_api
from gateways.kfp_api import KfpError
from pipelines.config import load_settings
from pipelines.submit import submit_pipeline
from tests.fakes import tiny_pipeline
from tests.fakes.kfp_api_server import FakeKfpServer, isolated, server  # noqa: F401

TOKEN = "test-token-3f9a1c"  # a made-up token; the tests check it is sent and never shown


pytestmark = pytest.mark.usefixtures("isolated")


def dev_settings(server, **overrides):
    return load_settings("dev", overrides={"kfp": {"host": server.url}, **overrides})


def submit(settings, **kwargs):
    return submit_pipeline(settings, "training", catalog=tiny_pipeline, poll_s=0.01, **kwargs)


def test_first_submit_creates_pipeline_version_experiment_and_run(server):
    # Given an empty KFP
    settings = dev_settings(server)
    # When the training pipeline is submitted
    result = submit(settings)
    # Then one pipeline, one version, one experiment (in the env's namespace) and one run exist
    assert [p.display_name for p in server.pipelines.values()] == ["flywheel-dev-training"]
    assert [p.namespace for p in server.pipelines.values()] == ["flywheel-dev"]
    (version,) = server.versions.values()
    assert version.display_name == result.version_name and version.pipeline_id == result.pipeline_id
    (experiment,) = server.experiments.values()
    assert (experiment.display_name, experiment.namespace) == ("credit-default-dev", "flywheel-dev")
    (run,) = server.runs.values()
    assert run.experiment_id == experiment.experiment_id
    assert run.pipeline_version_reference.pipeline_version_id == version.pipeline_version_id
    assert run.runtime_config.pipeline_root == "s3://flywheel-dev-artifacts/pipelines"
    assert run.service_account == "flywheel-pipeline-runner", "task pods run as the SA manifests/ grants"
    # and the result says so, with a link into the KFP UI
    assert (result.run_id, result.experiment_id, result.version_id) == (
        run.run_id, experiment.experiment_id, version.pipeline_version_id)
    assert result.run_url == f"{server.url}/#/runs/details/{run.run_id}"
    assert result.state == "PENDING"
    assert result.run_id in result.summary() and "flywheel-dev-training" in result.summary()


def test_version_name_is_utc_timestamp_and_content_hash(server):
    result = submit(dev_settings(server))
    stamp, digest = result.version_name.rsplit("-", 1)
    assert len(stamp) == len("20250101-120000") and stamp.replace("-", "").isdigit()
    (upload,) = server.find("POST", "/pipelines/upload_version")
    assert upload.query["name"] == result.version_name and upload.form == {"uploadfile": "training.yaml"}
    assert digest == compiled_hash(dev_settings(server))


def compiled_hash(settings):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as out:
        return kfp_api.content_hash(tiny_pipeline.compile_pipeline(settings, "training", Path(out)).read_bytes())


def test_second_submit_adds_a_version_and_reuses_the_experiment(server):
    # Given a pipeline submitted once
    settings = dev_settings(server)
    first = submit(settings, version="v1")
    # When it is submitted again
    second = submit(settings, version="v2")
    # Then the same pipeline and experiment get a second version and a second run
    assert second.pipeline_id == first.pipeline_id and second.experiment_id == first.experiment_id
    assert sorted(v.display_name for v in server.versions.values()) == ["v1", "v2"]
    assert len(server.pipelines) == 1 and len(server.experiments) == 1 and len(server.runs) == 2
    assert len(server.find("POST", "/experiments")) == 1
    assert len(server.find("POST", "/apis/v2beta1/pipelines")) == 1


def test_submit_publishes_once_per_content_and_the_newest_version_is_the_published_one(server):
    # Given the training pipeline submitted once (no version name: published by content)
    first = submit(dev_settings(server))
    # When it is submitted again with the same config, Then the published version is reused
    again = submit(dev_settings(server))
    assert again.version_id == first.version_id and len(server.versions) == 1 and len(server.runs) == 2
    # When the compiled content changes, a new version is published; back to the first, that content is
    # published again as the newest version (what retraining starts is always the last published)
    changed = submit(dev_settings(server, image={"tag": "0.2.0"}))  # new content
    assert changed.version_id != first.version_id
    for version in server.versions.values():  # the fake's clock has seconds: make the order explicit
        version.created_at -= dt.timedelta(hours=2 if version.pipeline_version_id == first.version_id else 1)
    time.sleep(1.05)  # version names carry the second they were published in
    reverted = submit(dev_settings(server))
    assert reverted.version_id not in (first.version_id, changed.version_id) and len(server.versions) == 3
    assert reverted.version_name.endswith(first.version_name.rsplit("-", 1)[1])
    with kfp_api.quiet():
        client = flywheel_publish.client_for(dev_settings(server))
        target = flywheel_publish.require_target(dev_settings(server), "training")
        assert kfp_api.published_version(client, target)[1].pipeline_version_id == reverted.version_id


def test_run_parameters_equal_pipeline_arguments(server):
    settings = dev_settings(server)
    submit(settings)
    (create,) = server.find("POST", "/runs")
    sent = create.body["runtime_config"]["parameters"]
    assert sent == tiny_pipeline.pipeline_arguments(settings, "training")
    assert isinstance(sent["dataset"], dict) and isinstance(sent["epochs"], int)


def test_backend_rejects_arguments_that_do_not_match_the_pipeline(server, monkeypatch):
    # Given a registry whose arguments name a parameter the pipeline does not have
    real = tiny_pipeline.pipeline_arguments
    monkeypatch.setattr(tiny_pipeline, "pipeline_arguments", lambda s, n: real(s, n) | {"bogus": 1})
    # When submitted, then the API's 400 message comes back as a one-line reason
    with pytest.raises(KfpError) as err:
        submit(dev_settings(server))
    assert "HTTP 400" in str(err.value)
    assert "parameter(s) provided are not required by pipeline: bogus" in str(err.value)
    assert "\n" not in str(err.value)


def test_bearer_token_is_sent_and_never_shown(server, monkeypatch, caplog):
    # Given a KFP that requires a bearer token, given in the environment
    server.bearer_token = TOKEN
    monkeypatch.setenv("KFP_BEARER_TOKEN", TOKEN)
    monkeypatch.setattr(cli_app, "load_settings", lambda env: dev_settings(server))
    monkeypatch.setattr(flywheel_publish, "default_catalog", lambda: tiny_pipeline)
    caplog.set_level(logging.DEBUG)
    # When the CLI submits
    result = CliRunner().invoke(cli.app, ["submit", "training", "--env", "dev"])
    # Then every request carried it, and it appears in no output or log
    assert result.exit_code == 0, result.output
    assert server.requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in server.requests)
    assert TOKEN not in result.output and TOKEN not in caplog.text
    # nor when the server refuses it
    server.bearer_token = "rotated"
    refused = CliRunner().invoke(cli.app, ["submit", "training", "--env", "dev"])
    assert refused.exit_code == 1
    assert "credentials" in refused.output and TOKEN not in refused.output and TOKEN not in caplog.text


def test_token_file_is_read(server, monkeypatch, tmp_path):
    server.bearer_token = TOKEN
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("KFP_BEARER_TOKEN_FILE", str(tmp_path / "token"))
    submit(dev_settings(server))
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in server.requests)


def test_missing_token_file_is_a_kfp_error(server, monkeypatch, tmp_path):
    monkeypatch.setenv("KFP_BEARER_TOKEN_FILE", str(tmp_path / "absent"))
    with pytest.raises(KfpError, match="KFP_BEARER_TOKEN_FILE=.*cannot be read"):
        submit(dev_settings(server))
    assert server.requests == []


def test_service_account_token_is_used_and_reread(server, monkeypatch, tmp_path):
    # Given no token or cookie in the environment but a projected ServiceAccount token file
    sa = tmp_path / "sa-token"
    sa.write_text("sa-token-1")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(sa))
    server.bearer_token = "sa-token-1"
    client = flywheel_publish.client_for(dev_settings(server))
    submit(dev_settings(server), client=client)
    # When kubelet rotates the token, then the same client sends the new one
    sa.write_text("sa-token-2")
    server.bearer_token = "sa-token-2"
    submit(dev_settings(server), client=client, version="after-rotation")
    assert server.requests[-1].headers["authorization"] == "Bearer sa-token-2"


def test_cookie_auth(server, monkeypatch):
    server.cookie = "authservice_session=abc123"
    monkeypatch.setenv("KFP_COOKIE", "authservice_session=abc123")
    submit(dev_settings(server))
    assert all(r.headers.get("cookie") == "authservice_session=abc123" for r in server.requests)
    assert not any("authorization" in r.headers for r in server.requests)


def test_bearer_token_wins_over_cookie(server, monkeypatch):
    monkeypatch.setenv("KFP_BEARER_TOKEN", TOKEN)
    monkeypatch.setenv("KFP_COOKIE", "authservice_session=abc123")
    submit(dev_settings(server))
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" and "cookie" not in r.headers
               for r in server.requests)


def test_401_says_check_credentials(server):
    server.bearer_token = TOKEN  # required, not given
    with pytest.raises(KfpError) as err:
        submit(dev_settings(server))
    message = str(err.value)
    assert "HTTP 401" in message and "credentials" in message and "KFP_BEARER_TOKEN" in message
    assert "used: no credentials" in message and "\n" not in message


def test_server_error_is_one_line(server):
    server.fail_next(500, "database is locked\nretry later", path_contains="/upload_version")
    with pytest.raises(KfpError) as err:
        submit(dev_settings(server))
    assert str(err.value).startswith("uploading version")
    assert "HTTP 500" in str(err.value) and "database is locked retry later" in str(err.value)


def test_unknown_pipeline_lists_the_known_ones(server):
    with pytest.raises(KfpError, match=r"unknown pipeline 'trianing'; known: training"):
        submit_pipeline(dev_settings(server), "trianing", catalog=tiny_pipeline)
    assert server.requests == []


def test_local_env_has_no_host_and_points_to_flywheel_run():
    with pytest.raises(KfpError, match=r"no KFP host.*flywheel run --env local"):
        submit_pipeline(load_settings("local"), "training", catalog=tiny_pipeline)


def test_unreachable_host(server, monkeypatch):
    # Given a host where nothing listens any more
    monkeypatch.setattr(cli_app, "load_settings", lambda env: dev_settings(server))
    monkeypatch.setattr(flywheel_publish, "default_catalog", lambda: tiny_pipeline)
    server.stop()
    # When the CLI submits, then it says so in one line (urllib3's retry warnings kept out)
    result = CliRunner().invoke(cli.app, ["submit", "training", "--env", "dev"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"cannot reach KFP at {server.url}" in line and "Connection refused" in line


def test_single_user_401_fails_at_once():
    # Given a single-user install (no namespace: kfp.Client probes healthz) that wants a token
    fake = FakeKfpServer().start()
    fake.bearer_token = TOKEN
    try:
        settings = load_settings("dev", overrides={"kfp": {"host": fake.url, "namespace": None}})
        with pytest.raises(KfpError, match=r"connecting to KFP: .*HTTP 401.*credentials"):
            submit(settings)
    finally:
        fake.stop()
    # Then it asked once, not kfp's 5 tries 5 s apart
    assert len(fake.find("GET", "/healthz")) == 1


def test_wait_returns_the_final_state(server):
    server.polls_to_finish = 2
    result = submit(dev_settings(server), wait=True)
    assert result.state == "SUCCEEDED"
    assert len(server.find("GET", f"/runs/{result.run_id}")) == 2


def test_cli_submit_dev_exits_0(server, monkeypatch):
    monkeypatch.setattr(cli_app, "load_settings",
                        lambda env: load_settings(env, overrides={"kfp": {"host": server.url}}))
    monkeypatch.setattr(flywheel_publish, "default_catalog", lambda: tiny_pipeline)
    result = CliRunner().invoke(cli.app, ["submit", "training", "--env", "dev"])
    assert result.exit_code == 0, result.output
    (run,) = server.runs.values()
    assert run.run_id in result.stdout and "flywheel-dev-training" in result.stdout
    assert "Run details" not in result.stdout  # kfp's own prints are kept out of ours


def test_cli_failed_run_with_wait_exits_nonzero_with_one_line(server, monkeypatch):
    server.run_outcome = "FAILED"
    monkeypatch.setattr(cli_app, "load_settings",
                        lambda env: load_settings(env, overrides={"kfp": {"host": server.url}}))
    monkeypatch.setattr(flywheel_publish, "default_catalog", lambda: tiny_pipeline)
    result = CliRunner().invoke(cli.app, ["submit", "training", "--env", "dev", "--wait"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    (run,) = server.runs.values()
    assert line.startswith("error: run ") and "ended FAILED: task 'train' failed: exit code 1" in line
    assert run.run_id in line


# --- the fake holds the client to the contract (so the tests above can fail) -------------------

def test_fake_rejects_unknown_fields_and_wrong_types(server):
    import urllib.request

    def post(path, body):
        request = urllib.request.Request(server.url + path, json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())
        return 200, None

    status, body = post("/apis/v2beta1/experiments", {"display_name": "x", "colour": "red"})
    assert status == 400 and body["code"] == 3 and 'unknown field "colour"' in body["message"]
    status, body = post("/apis/v2beta1/experiments", {"display_name": 7})
    assert status == 400 and "body.display_name: expected a string" in body["message"]
    status, body = post("/apis/v2beta1/experiments", {"description": "no name"})
    assert status == 400 and "Experiment name is empty" in body["message"]
    status, body = post("/apis/v2beta1/recurringruns", {"display_name": "r", "mode": "ON"})
    assert status == 400 and "invalid value 'ON'" in body["message"]


def test_fake_rejects_a_package_that_is_not_a_pipeline_spec(tmp_path):
    from tests.fakes.kfp_api_server import ApiError, parse_pipeline_package

    with pytest.raises(ApiError, match="Failed to parse the pipeline spec"):
        parse_pipeline_package("p.yaml", yaml.safe_dump({"pipelineInfo": {"name": "x"}, "colour": 1}).encode())
    spec = (tiny_pipeline.compile_pipeline(load_settings("dev"), "training", tmp_path)).read_bytes()
    assert parse_pipeline_package("p.yaml", spec)["pipelineInfo"]["name"] == "tiny-dev"


@pytest.mark.slow
def test_real_training_pipeline_meets_the_backend_contract(server):
    # Given the real registry's training pipeline for dev (not the tiny one)
    settings = dev_settings(server)
    # When submitted, then the fake accepts its PipelineSpec/PlatformSpec and its arguments
    result = submit_pipeline(settings, "training", poll_s=0.01)
    (run,) = server.runs.values()
    assert run.run_id == result.run_id
    from pipelines.catalog import pipeline_arguments

    assert run.runtime_config.parameters == pipeline_arguments(settings, "training")


@pytest.mark.parametrize("multi_user, namespace", [(True, "flywheel-dev"), (False, None)])
def test_multi_user_and_single_user_installs(multi_user, namespace):
    # Given a multi-user KFP (namespace required) or a single-user one (no namespace in config)
    fake = FakeKfpServer(multi_user=multi_user).start()
    try:
        settings = load_settings("dev", overrides={"kfp": {"host": fake.url, "namespace": namespace}})
        result = submit(settings)
    finally:
        fake.stop()
    # Then the experiment lives in the configured namespace (or none) and the run starts
    (experiment,) = fake.experiments.values()
    assert (experiment.namespace or None) == namespace
    assert result.run_id in fake.runs
    # a single-user client probes healthz once while connecting; a namespaced one does not need to
    assert len(fake.find("GET", "/healthz")) == (0 if namespace else 1)
