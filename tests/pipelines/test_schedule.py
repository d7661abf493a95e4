"""`flywheel schedule`: both recurring runs (weekly retraining, the monitoring check every N hours)
reconciled from config, against the fake KFP API."""
import pytest
from typer.testing import CliRunner

import pipelines.cli as cli
import pipelines.cli_app as cli_app
import pipelines.publish as flywheel_publish
import pipelines.submit as flywheel_submit
from pipelines.config import load_settings
from pipelines.schedule import every_hours_cron, kfp_cron, reconcile_schedules
from tests.fakes import tiny_pipeline, tiny_registry
from tests.fakes.kfp_api_server import isolated, robfig_cron_errors, server  # noqa: F401

NAME = "flywheel-staging-training-retrain"
CHECK = "flywheel-staging-monitoring-check"


pytestmark = pytest.mark.usefixtures("isolated")


def staging(server, schedule="0 4 * * *", enabled=True, **overrides):
    """Staging retrains daily at 04:00 in config; tests vary it through overrides."""
    return load_settings("staging", overrides={
        "kfp": {"host": server.url}, "retraining": {"enabled": enabled, "schedule": schedule}, **overrides})


def reconcile(settings, dry_run=False):
    return reconcile_schedules(settings, dry_run=dry_run, catalog=tiny_registry)


def by_name(changes):
    assert len({c.name for c in changes}) == len(changes), changes
    return {c.name: c for c in changes}


def jobs(server):
    assert len({j.display_name for j in server.recurring_runs.values()}) == len(server.recurring_runs)
    return {j.display_name: j for j in server.recurring_runs.values()}


def versions_of(server, pipeline):
    (pipeline_id,) = [p.pipeline_id for p in server.pipelines.values() if p.display_name == pipeline]
    return [v for v in server.versions.values() if v.pipeline_id == pipeline_id]


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


@pytest.mark.parametrize("hours, kfp", [(6, "0 0 */6 * * *"), (1, "0 0 */1 * * *"), (24, "0 0 */24 * * *")])
def test_monitoring_check_every_n_hours_is_a_six_field_cron(hours, kfp):
    assert every_hours_cron(hours) == kfp
    assert robfig_cron_errors(kfp) is None


def test_create_when_enabled(server):
    # Given retraining enabled in config and no recurring run on KFP
    settings = staging(server)
    # When reconciled
    changes = reconcile(settings)
    # Then both recurring runs are created, retraining first
    assert [(c.action, c.name, c.applied) for c in changes] == [("create", NAME, True), ("create", CHECK, True)]
    # and each is enabled with KFP's 6-field cron, no catchup and its pipeline's arguments for the env
    found = jobs(server)
    job = found[NAME]
    assert job.mode == "ENABLE" and job.no_catchup is True
    assert job.trigger.cron_schedule.cron == "0 0 4 * * *"
    assert job.max_concurrency == "1"
    assert job.runtime_config.parameters == tiny_pipeline.pipeline_arguments(settings, "training")
    assert job.runtime_config.pipeline_root == "s3://flywheel-staging-artifacts/pipelines"
    check = found[CHECK]
    assert check.mode == "ENABLE" and check.no_catchup is True and check.max_concurrency == "1"
    assert check.trigger.cron_schedule.cron == "0 0 */6 * * *"  # monitoring.check_every_hours: 6
    assert check.runtime_config.parameters == tiny_registry.pipeline_arguments(settings, "monitoring")
    assert check.service_account == job.service_account == "flywheel-pipeline-runner"
    (experiment,) = server.experiments.values()
    assert {j.experiment_id for j in found.values()} == {experiment.experiment_id}
    assert experiment.namespace == "flywheel-staging"
    (training_version,) = versions_of(server, "flywheel-staging-training")
    (monitoring_version,) = versions_of(server, "flywheel-staging-monitoring")
    assert job.pipeline_version_reference.pipeline_version_id == training_version.pipeline_version_id
    assert check.pipeline_version_reference.pipeline_version_id == monitoring_version.pipeline_version_id
    creates = {r.body["display_name"]: r.body for r in server.find("POST", "/recurringruns")}
    assert creates[NAME]["max_concurrency"] == 1
    assert creates[NAME]["trigger"] == {"cron_schedule": {"cron": "0 0 4 * * *"}}
    assert creates[CHECK]["trigger"] == {"cron_schedule": {"cron": "0 0 */6 * * *"}}


def test_reconcile_again_is_a_no_op(server):
    settings = staging(server)
    reconcile(settings)
    before = len(mutations(server))
    changes = reconcile(settings)
    assert [(c.action, c.name, c.applied) for c in changes] == [("unchanged", NAME, False),
                                                                ("unchanged", CHECK, False)]
    assert len(mutations(server)) == before


def test_submitted_version_with_same_content_is_reused(server):
    # Given the training pipeline was submitted (same compiled content) before scheduling
    settings = staging(server)
    submitted = flywheel_submit.submit_pipeline(settings, "training", catalog=tiny_pipeline)
    # When reconciled, then no new training version is uploaded and the schedule runs the submitted one
    reconcile(settings)
    (version,) = versions_of(server, "flywheel-staging-training")
    assert version.pipeline_version_id == submitted.version_id
    assert jobs(server)[NAME].pipeline_version_reference.pipeline_version_id == submitted.version_id


def test_schedule_change_is_delete_and_create(server):
    reconcile(staging(server))
    old_id = jobs(server)[NAME].recurring_run_id
    check_id = jobs(server)[CHECK].recurring_run_id
    # When the config's schedule changes
    changes = by_name(reconcile(staging(server, schedule="0 5 * * 1-5")))
    # Then the old recurring run is deleted and a new one created with the new cron
    assert changes[NAME].action == "update" and "'0 0 4 * * *' -> '0 0 5 * * 1-5'" in changes[NAME].detail
    new = jobs(server)[NAME]
    assert new.recurring_run_id != old_id and new.trigger.cron_schedule.cron == "0 0 5 * * 1-5"
    assert [r.path for r in server.find("DELETE", old_id)] == [f"/apis/v2beta1/recurringruns/{old_id}"]
    # and the monitoring check, whose config did not change, is left alone
    assert changes[CHECK].action == "unchanged" and jobs(server)[CHECK].recurring_run_id == check_id


def test_check_every_hours_change_updates_only_the_monitoring_run(server):
    reconcile(staging(server))
    before = {name: job.recurring_run_id for name, job in jobs(server).items()}
    # When monitoring.check_every_hours goes from 6 to 2
    changes = by_name(reconcile(staging(server, monitoring={"check_every_hours": 2})))
    # Then the monitoring check is recreated with the new cron, the retraining run stays
    assert changes[CHECK].action == "update" and "'0 0 */6 * * *' -> '0 0 */2 * * *'" in changes[CHECK].detail
    assert changes[NAME].action == "unchanged"
    after = jobs(server)
    assert after[NAME].recurring_run_id == before[NAME]
    assert after[CHECK].recurring_run_id != before[CHECK]
    assert after[CHECK].trigger.cron_schedule.cron == "0 0 */2 * * *"
    assert [r.path for r in server.find("DELETE", before[CHECK])] == [f"/apis/v2beta1/recurringruns/{before[CHECK]}"]


def test_new_pipeline_content_uploads_a_version_and_updates(server):
    reconcile(staging(server))
    (first_version,) = versions_of(server, "flywheel-staging-training")
    # When the compiled pipelines change (a new image) and so do the arguments
    settings = staging(server, image={"tag": "0.2.0"}, dataset={"rows": 1234}, monitoring={"window_rows": 777})
    changes = by_name(reconcile(settings))
    for name in (NAME, CHECK):
        assert changes[name].action == "update", changes[name]
        assert "pipeline version" in changes[name].detail and "parameters" in changes[name].detail
    assert len(versions_of(server, "flywheel-staging-training")) == 2
    assert len(versions_of(server, "flywheel-staging-monitoring")) == 2
    found = jobs(server)
    assert found[NAME].pipeline_version_reference.pipeline_version_id != first_version.pipeline_version_id
    assert found[NAME].runtime_config.parameters["dataset"]["rows"] == 1234
    assert found[CHECK].runtime_config.parameters["window_rows"] == 777


def test_delete_when_disabled(server):
    reconcile(staging(server))
    changes = by_name(reconcile(staging(server, enabled=False)))
    assert (changes[NAME].action, changes[NAME].applied) == ("delete", True)
    assert "retraining is disabled" in changes[NAME].detail
    # the monitoring check does not depend on scheduled retraining
    assert changes[CHECK].action == "unchanged"
    assert set(jobs(server)) == {CHECK}


def test_disabled_and_absent_is_a_no_op(server):
    # Given retraining disabled and never scheduled (the monitoring check in place)
    reconcile(staging(server, enabled=False))
    assert set(jobs(server)) == {CHECK}
    before = len(mutations(server))
    # When reconciled again, then nothing is written and retraining is reported as left alone
    changes = by_name(reconcile(staging(server, enabled=False)))
    assert changes[NAME].action == "unchanged" and "retraining is disabled" in changes[NAME].detail
    assert changes[CHECK].action == "unchanged"
    assert len(mutations(server)) == before


def test_undeclared_recurring_runs_of_the_env_are_deleted(server, tmp_path):
    # Given the env's two recurring runs, a stale one of the env and two that are not ours
    settings = staging(server)
    reconcile(settings)
    client = flywheel_publish.client_for(settings)
    (experiment,) = server.experiments.values()
    package = tiny_pipeline.compile_pipeline(settings, "training", tmp_path)
    params = tiny_pipeline.pipeline_arguments(settings, "training")
    for name in ("flywheel-staging-old-nightly", "someone-elses-job", "flywheel-prod-training-retrain"):
        client.create_recurring_run(experiment.experiment_id, name, cron_expression="0 0 1 * * *",
                                    pipeline_package_path=str(package), params=params)
    stale = jobs(server)["flywheel-staging-old-nightly"].recurring_run_id
    # When reconciled, then only the env's undeclared one is deleted (a dry run first says so)
    planned = by_name(reconcile(settings, dry_run=True))
    assert planned["flywheel-staging-old-nightly"].action == "delete"
    assert str(planned["flywheel-staging-old-nightly"]).startswith("would delete flywheel-staging-old-nightly: "
                                                                   "not declared in config")
    assert stale in server.recurring_runs
    changes = by_name(reconcile(settings))
    assert (changes["flywheel-staging-old-nightly"].action, changes["flywheel-staging-old-nightly"].applied) == (
        "delete", True)
    assert set(changes) == {NAME, CHECK, "flywheel-staging-old-nightly"}
    assert set(jobs(server)) == {NAME, CHECK, "someone-elses-job", "flywheel-prod-training-retrain"}


def test_dry_run_changes_nothing(server):
    # Given nothing on KFP, a dry run plans both creates and sends no writes
    changes = reconcile(staging(server), dry_run=True)
    assert [(c.action, c.name, c.applied) for c in changes] == [("create", NAME, False), ("create", CHECK, False)]
    assert all(str(c).startswith("would create") for c in changes)
    assert mutations(server) == []
    # Given the recurring runs, a dry run with a new schedule plans an update and leaves it alone
    reconcile(staging(server))
    before = len(mutations(server))
    changes = by_name(reconcile(staging(server, schedule="0 6 * * *", monitoring={"check_every_hours": 12}),
                                dry_run=True))
    assert changes[NAME].action == changes[CHECK].action == "update"
    assert not changes[NAME].applied and not changes[CHECK].applied
    assert len(mutations(server)) == before
    assert jobs(server)[NAME].trigger.cron_schedule.cron == "0 0 4 * * *"
    assert jobs(server)[CHECK].trigger.cron_schedule.cron == "0 0 */6 * * *"


def test_max_concurrency_outside_kfp_range_fails_before_any_write(server):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="retraining.max_concurrency: Input should be less than or equal to 10"):
        reconcile(staging(server, retraining={"enabled": True, "max_concurrency": 11}))
    assert mutations(server) == []


def test_fake_rejects_concurrency_the_backend_rejects(server, tmp_path):
    # The fake enforces the backend's 1-10 limit too, with the backend's message.
    import kfp_server_api

    settings = staging(server)
    client = flywheel_publish.client_for(settings)
    experiment = client.create_experiment("e", namespace="flywheel-staging")
    package = tiny_pipeline.compile_pipeline(settings, "training", tmp_path)
    with pytest.raises(kfp_server_api.ApiException) as err:
        client.create_recurring_run(experiment.experiment_id, "r", cron_expression="0 0 4 * * *", max_concurrency=11,
                                    pipeline_package_path=str(package),
                                    params=tiny_pipeline.pipeline_arguments(settings, "training"))
    assert err.value.status == 400 and "out of range. Support 1-10. Received 11" in err.value.body


def test_cli_schedule_dry_run_prints_the_plan(server, monkeypatch):
    monkeypatch.setattr(cli_app, "load_settings", lambda env: staging(server))
    monkeypatch.setattr(flywheel_publish, "default_catalog", lambda: tiny_registry)
    result = CliRunner().invoke(cli.app, ["schedule", "--env", "staging", "--dry-run"])
    assert result.exit_code == 0, result.output
    first, second = result.stdout.splitlines()
    assert first.startswith(f"would create {NAME}: cron '0 0 4 * * *' (config '0 4 * * *')")
    assert second.startswith(f"would create {CHECK}: cron '0 0 */6 * * *' (every 6 h)")
    assert mutations(server) == []
    applied = CliRunner().invoke(cli.app, ["schedule", "--env", "staging"])
    assert applied.exit_code == 0 and applied.stdout.startswith(f"create {NAME}:")
    assert f"create {CHECK}:" in applied.stdout
    assert set(jobs(server)) == {NAME, CHECK}


def test_cli_schedule_on_local_is_an_error():
    result = CliRunner().invoke(cli.app, ["schedule", "--env", "local"])
    assert result.exit_code == 1 and "no KFP host" in result.stderr


def test_service_account_change_is_an_update_and_is_sent(server):
    reconcile(staging(server))
    assert jobs(server)[NAME].service_account == "flywheel-pipeline-runner"
    settings = load_settings("staging", overrides={
        "kfp": {"host": server.url, "service_account": "retrainer"},
        "retraining": {"enabled": True, "schedule": "0 4 * * *"}})
    changes = by_name(reconcile(settings))
    for name in (NAME, CHECK):
        assert changes[name].action == "update"
        assert "service account 'flywheel-pipeline-runner' -> 'retrainer'" in changes[name].detail
    assert {job.service_account for job in jobs(server).values()} == {"retrainer"}
