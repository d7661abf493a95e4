"""`flywheel schedule`: the retraining recurring run reconciled from config, against the fake KFP API."""
import pytest
from typer.testing import CliRunner

import pipelines.cli as cli
import pipelines.kfp_client as kfp_client
import pipelines.submit as flywheel_submit
from pipelines.config import load_settings
from pipelines.schedule import kfp_cron, reconcile_schedules
from tests.fakes import tiny_pipeline
from tests.fakes.kfp_api_server import isolated, robfig_cron_errors, server  # noqa: F401

NAME = "flywheel-staging-training-retrain"


pytestmark = pytest.mark.usefixtures("isolated")


def staging(server, schedule="0 4 * * *", enabled=True, **overrides):
    """Staging retrains daily at 04:00 in config; tests vary it through overrides."""
    return load_settings("staging", overrides={
        "kfp": {"host": server.url}, "retraining": {"enabled": enabled, "schedule": schedule}, **overrides})


def reconcile(settings, dry_run=False):
    return reconcile_schedules(settings, dry_run=dry_run, registry=tiny_pipeline)


def mutations(server):
    return [r for r in server.requests if r.method in ("POST", "DELETE")]


@pytest.mark.parametrize("config, kfp", [
    ("0 3 * * 1", "0 0 3 * * 1"),
    ("*/15 * * * *", "0 */15 * * * *"),
    ("30 2 1 */3 *", "0 30 2 1 */3 *"),
])
def test_config_cron_gets_a_seconds_field(config, kfp):
    assert kfp_cron(config) == kfp
    assert robfig_cron_errors(kfp) is None


def test_create_when_enabled(server):
    # Given retraining enabled in config and no recurring run on KFP
    settings = staging(server)
    # When reconciled
    (change,) = reconcile(settings)
    # Then one enabled recurring run exists with KFP's 6-field cron, no catchup and the env's arguments
    assert (change.action, change.name, change.applied) == ("create", NAME, True)
    (job,) = server.recurring_runs.values()
    assert job.display_name == NAME and job.mode == "ENABLE" and job.no_catchup is True
    assert job.trigger.cron_schedule.cron == "0 0 4 * * *"
    assert job.max_concurrency == "1"
    assert job.runtime_config.parameters == tiny_pipeline.pipeline_arguments(settings, "training")
    assert job.runtime_config.pipeline_root == "s3://flywheel-staging-artifacts/pipelines"
    (experiment,) = server.experiments.values()
    assert job.experiment_id == experiment.experiment_id and experiment.namespace == "flywheel-staging"
    (version,) = server.versions.values()
    assert job.pipeline_version_reference.pipeline_version_id == version.pipeline_version_id
    (create,) = server.find("POST", "/recurringruns")
    assert create.body["max_concurrency"] == 1 and create.body["trigger"] == {"cron_schedule": {"cron": "0 0 4 * * *"}}


def test_reconcile_again_is_a_no_op(server):
    settings = staging(server)
    reconcile(settings)
    before = len(mutations(server))
    (change,) = reconcile(settings)
    assert change.action == "unchanged" and not change.applied
    assert len(mutations(server)) == before


def test_submitted_version_with_same_content_is_reused(server):
    # Given the training pipeline was submitted (same compiled content) before scheduling
    settings = staging(server)
    submitted = flywheel_submit.submit_pipeline(settings, "training", registry=tiny_pipeline)
    # When reconciled, then no new version is uploaded and the schedule runs the submitted one
    reconcile(settings)
    assert len(server.versions) == 1
    (job,) = server.recurring_runs.values()
    assert job.pipeline_version_reference.pipeline_version_id == submitted.version_id


def test_schedule_change_is_delete_and_create(server):
    reconcile(staging(server))
    (old_id,) = server.recurring_runs
    # When the config's schedule changes
    (change,) = reconcile(staging(server, schedule="0 5 * * 1-5"))
    # Then the old recurring run is deleted and a new one created with the new cron
    assert change.action == "update" and "'0 0 4 * * *' -> '0 0 5 * * 1-5'" in change.detail
    (new_id,) = server.recurring_runs
    assert new_id != old_id and server.recurring_runs[new_id].trigger.cron_schedule.cron == "0 0 5 * * 1-5"
    assert [r.path for r in server.find("DELETE", old_id)] == [f"/apis/v2beta1/recurringruns/{old_id}"]


def test_new_pipeline_content_uploads_a_version_and_updates(server):
    reconcile(staging(server))
    (first_version,) = server.versions
    # When the compiled pipeline changes (a new image) and so do the arguments
    settings = staging(server, image={"tag": "0.2.0"}, dataset={"rows": 1234})
    (change,) = reconcile(settings)
    assert change.action == "update" and "pipeline version" in change.detail and "parameters" in change.detail
    assert len(server.versions) == 2
    (job,) = server.recurring_runs.values()
    assert job.pipeline_version_reference.pipeline_version_id != first_version
    assert job.runtime_config.parameters["dataset"]["rows"] == 1234


def test_delete_when_disabled(server):
    reconcile(staging(server))
    (change,) = reconcile(staging(server, enabled=False))
    assert (change.action, change.applied) == ("delete", True)
    assert server.recurring_runs == {}


def test_disabled_and_absent_is_a_no_op(server):
    (change,) = reconcile(staging(server, enabled=False))
    assert change.action == "unchanged"
    assert mutations(server) == []


def test_dry_run_changes_nothing(server):
    # Given nothing on KFP, a dry run plans a create and sends no writes
    (change,) = reconcile(staging(server), dry_run=True)
    assert (change.action, change.applied) == ("create", False) and str(change).startswith("would create")
    assert mutations(server) == []
    # Given a recurring run, a dry run with a new schedule plans an update and leaves it alone
    reconcile(staging(server))
    before = len(mutations(server))
    (change,) = reconcile(staging(server, schedule="0 6 * * *"), dry_run=True)
    assert change.action == "update" and not change.applied
    assert len(mutations(server)) == before
    (job,) = server.recurring_runs.values()
    assert job.trigger.cron_schedule.cron == "0 0 4 * * *"


def test_max_concurrency_outside_kfp_range_fails_before_any_write(server):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="retraining.max_concurrency: Input should be less than or equal to 10"):
        reconcile(staging(server, retraining={"enabled": True, "max_concurrency": 11}))
    assert mutations(server) == []


def test_fake_rejects_concurrency_the_backend_rejects(server, tmp_path):
    # The fake enforces the backend's 1-10 limit too, with the backend's message.
    import kfp_server_api

    settings = staging(server)
    client = kfp_client.make_client(settings)
    experiment = client.create_experiment("e", namespace="flywheel-staging")
    package = tiny_pipeline.compile_pipeline(settings, "training", tmp_path)
    with pytest.raises(kfp_server_api.ApiException) as err:
        client.create_recurring_run(experiment.experiment_id, "r", cron_expression="0 0 4 * * *", max_concurrency=11,
                                    pipeline_package_path=str(package),
                                    params=tiny_pipeline.pipeline_arguments(settings, "training"))
    assert err.value.status == 400 and "out of range. Support 1-10. Received 11" in err.value.body


def test_cli_schedule_dry_run_prints_the_plan(server, monkeypatch):
    monkeypatch.setattr(cli, "load_settings", lambda env: staging(server))
    monkeypatch.setattr(flywheel_submit, "default_registry", lambda: tiny_pipeline)
    result = CliRunner().invoke(cli.app, ["schedule", "--env", "staging", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"would create {NAME}: cron '0 0 4 * * *' (config '0 4 * * *')")
    assert mutations(server) == []
    applied = CliRunner().invoke(cli.app, ["schedule", "--env", "staging"])
    assert applied.exit_code == 0 and applied.stdout.startswith(f"create {NAME}:")
    assert len(server.recurring_runs) == 1


def test_cli_schedule_on_local_is_an_error():
    result = CliRunner().invoke(cli.app, ["schedule", "--env", "local"])
    assert result.exit_code == 1 and "no KFP host" in result.stderr


def test_service_account_change_is_an_update_and_is_sent(server):
    reconcile(staging(server))
    (job,) = server.recurring_runs.values()
    assert job.service_account == "flywheel-pipeline-runner"
    settings = load_settings("staging", overrides={
        "kfp": {"host": server.url, "service_account": "retrainer"},
        "retraining": {"enabled": True, "schedule": "0 4 * * *"}})
    (change,) = reconcile(settings)
    assert change.action == "update" and "service account 'flywheel-pipeline-runner' -> 'retrainer'" in change.detail
