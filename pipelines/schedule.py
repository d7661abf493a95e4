"""`flywheel schedule`: make the env's KFP recurring runs match config.

Two recurring runs are declared, both in the env's experiment:

- `flywheel-<env>-training-retrain`: the training pipeline on `retraining.schedule` (when
  `retraining.enabled`);
- `flywheel-<env>-monitoring-check`: the monitoring pipeline every `monitoring.check_every_hours`
  hours (always on a cluster: with no traffic logged it records that and decides nothing).

A recurring run in the experiment whose name starts with `flywheel-<env>-` and that config does
not declare is deleted: what `flywheel schedule` created before and config no longer asks for.
"""
from __future__ import annotations

from dataclasses import dataclass

from gateways import kfp_api
from gateways.kfp_api import KfpError, KfpTarget
from pipelines.arguments import MONITORING, TRAINING
from pipelines.config import Settings
from pipelines.publish import client_for, publish, require_target
from storage.endpoints import doing

RETRAIN_PIPELINE = TRAINING
MONITOR_PIPELINE = MONITORING
# What each pipeline's recurring run is for: the last part of its name.
PURPOSE = {RETRAIN_PIPELINE: "retrain", MONITOR_PIPELINE: "check"}
# The KFP backend rejects recurring runs outside this range (recurring_run_server.go).
MAX_CONCURRENCY_RANGE = (1, 10)


@dataclass(frozen=True)
class Change:
    """One reconcile decision about a recurring run; `applied` is False in a dry run."""

    action: str  # create | update | delete | unchanged | declared (config's, not compared with the server)
    name: str
    detail: str
    applied: bool

    def __str__(self) -> str:
        verb = self.action if self.applied or self.action in ("unchanged", "declared") else f"would {self.action}"
        return f"{verb} {self.name}: {self.detail}"


def recurring_run_name(settings: Settings, pipeline: str = RETRAIN_PIPELINE) -> str:
    """Stable, so the reconciler finds what it created before."""
    return f"flywheel-{settings.env}-{pipeline}-{PURPOSE.get(pipeline, 'run')}"


def managed_prefix(settings: Settings) -> str:
    """Recurring runs whose names start with this are the reconciler's to create and delete."""
    return f"flywheel-{settings.env}-"


def kfp_cron(cron: str) -> str:
    """Config's 5-field cron (min hour dom month dow) -> KFP's 6 fields with seconds first.

    KFP parses schedules with robfig/cron v1, whose fields are `sec min hour dom month [dow]`:
    a 5-field string is accepted there but read as seconds..month ("0 3 * * 1" would mean
    minute 3 of every hour in January). So we always prepend "0" seconds.
    """
    fields = cron.split()
    if len(fields) != 5:
        raise KfpError(f"retraining.schedule {cron!r} must be a 5-field cron (minute hour day month weekday)")
    return " ".join(["0", *fields])


def every_hours_cron(hours: int) -> str:
    """KFP's 6-field cron for "every HOURS hours, on the hour" (sec min hour dom month dow)."""
    if not 1 <= hours <= 24:
        raise KfpError(f"monitoring.check_every_hours is {hours}; use 1-24")
    return f"0 0 */{hours} * * *"


@dataclass(frozen=True)
class Declared:
    """A recurring run config asks for."""

    pipeline: str
    name: str
    cron: str
    config: str  # where the cron comes from, in config's words
    max_concurrency: int
    description: str


def declared_schedules(settings: Settings) -> list[Declared]:
    """The recurring runs config declares for the env, checked against KFP's limits."""
    declared = []
    retraining = settings.retraining
    if retraining.enabled:
        low, high = MAX_CONCURRENCY_RANGE
        if not low <= retraining.max_concurrency <= high:
            raise KfpError(f"retraining.max_concurrency is {retraining.max_concurrency}; KFP allows {low}-{high}")
        declared.append(Declared(
            RETRAIN_PIPELINE, recurring_run_name(settings, RETRAIN_PIPELINE), kfp_cron(retraining.schedule),
            f"config {retraining.schedule!r}", retraining.max_concurrency,
            f"Flywheel scheduled retraining ({settings.env}); managed by `flywheel schedule`"))
    hours = settings.monitoring.check_every_hours
    declared.append(Declared(
        MONITOR_PIPELINE, recurring_run_name(settings, MONITOR_PIPELINE), every_hours_cron(hours),
        f"every {hours} h", 1,
        f"Flywheel monitoring check ({settings.env}): drift and quality of live traffic, guarded retraining "
        "trigger; managed by `flywheel schedule`"))
    return declared


def declared_plan(settings: Settings) -> list[Change]:
    """What config declares, for a dry run with no KFP to compare it with (nothing is read)."""
    changes = [Change("declared", s.name, f"cron {s.cron!r} ({s.config}), max_concurrency {s.max_concurrency}, "
                      "no catchup", applied=False) for s in declared_schedules(settings)]
    if not settings.retraining.enabled:
        changes.insert(0, Change("declared", recurring_run_name(settings, RETRAIN_PIPELINE),
                                 "none: retraining is disabled", applied=False))
    return changes


def _differences(current, cron: str, concurrency: int, parameters: dict, version_id: str | None,
           service_account: str | None = None) -> list[str]:
    """What differs between a recurring run on the server and the one config asks for."""
    reasons = []
    current_cron = current.trigger.cron_schedule.cron if current.trigger and current.trigger.cron_schedule else None
    if current_cron != cron:
        reasons.append(f"cron {current_cron!r} -> {cron!r}")
    if int(current.max_concurrency or 0) != concurrency:
        reasons.append(f"max_concurrency {current.max_concurrency} -> {concurrency}")
    ref = current.pipeline_version_reference
    current_version = ref.pipeline_version_id if ref else current.pipeline_version_id
    if version_id is None or current_version != version_id:
        reasons.append("pipeline version -> " + ("a new upload" if version_id is None else version_id))
    if ((current.runtime_config and current.runtime_config.parameters) or {}) != parameters:
        reasons.append("parameters changed")
    if (current.service_account or None) != service_account:
        reasons.append(f"service account {current.service_account!r} -> {service_account!r}")
    if not current.no_catchup:
        reasons.append("catchup -> off")
    if current.mode != "ENABLE":
        reasons.append(f"mode {current.mode} -> ENABLE")
    return reasons


def reconcile_schedules(
    settings: Settings, client=None, dry_run: bool = False, *, catalog=None
) -> list[Change]:
    """Make the env's recurring runs match config: create, update, delete or leave each one.

    KFP cannot update a recurring run, so an update is a delete followed by a create. A run uses
    the pipeline's published version (`pipelines.publish`: the newest, uploaded when a fresh
    compile differs from it). Declared runs come first in the changes (retraining, monitoring),
    then undeclared deletions.
    """
    target = require_target(settings, RETRAIN_PIPELINE)
    host = target.host.rstrip("/")
    declared = declared_schedules(settings)
    with doing(f"reading recurring runs {managed_prefix(settings)}*"):
        client = client or client_for(settings)
    with kfp_api.quiet(), kfp_api.step(f"reading recurring runs {managed_prefix(settings)}*", host):
        experiment = kfp_api.find_experiment(client, target.experiment, target.namespace)
        existing = kfp_api.recurring_runs(client, experiment.experiment_id, managed_prefix(settings)) \
            if experiment else {}

    changes = []
    retrain_name = recurring_run_name(settings, RETRAIN_PIPELINE)
    if not settings.retraining.enabled and retrain_name not in existing:
        changes.append(Change("unchanged", retrain_name, "retraining is disabled and no recurring run exists",
                              applied=False))
    for schedule in declared:
        change, experiment = _reconcile_one(settings, client, catalog, schedule, existing.pop(schedule.name, []),
                                            experiment, dry_run)
        changes.append(change)
    for name, runs in sorted(existing.items()):
        why = "retraining is disabled" if name == retrain_name else "not declared in config"
        for current in runs:
            if not dry_run:
                with kfp_api.quiet(), kfp_api.step(f"deleting recurring run {current.recurring_run_id}", host):
                    client.delete_recurring_run(current.recurring_run_id)
            changes.append(Change("delete", name, f"{why} (id {current.recurring_run_id})", applied=not dry_run))
    return changes


def _reconcile_one(settings: Settings, client, catalog, schedule: Declared, existing: list, experiment,
                   dry_run: bool):
    """(the change for one declared recurring run, the experiment, created if it had to be)."""
    target: KfpTarget = require_target(settings, schedule.pipeline)
    host, name = target.host.rstrip("/"), schedule.name
    published = publish(settings, schedule.pipeline, client=client, catalog=catalog, dry_run=dry_run,
                        by="flywheel schedule")
    version = published.version_name if published.version_id else \
        f"new upload ({published.version_name.rsplit('-', 1)[-1]})"  # the would-be name's content hash
    describe = (f"cron {schedule.cron!r} ({schedule.config}), max_concurrency {schedule.max_concurrency}, "
                f"no catchup, version {version}")
    if len(existing) == 1:
        reasons = _differences(existing[0], schedule.cron, schedule.max_concurrency, published.arguments,
                               published.version_id, settings.kfp.service_account)
        if not reasons:
            return Change("unchanged", name, describe, applied=False), experiment
        action, detail = "update", "; ".join(reasons) + " (delete + create)"
    elif existing:
        action, detail = "update", f"{len(existing)} recurring runs share the name; replace with one: {describe}"
    else:
        action, detail = "create", describe
    if dry_run:
        return Change(action, name, detail, applied=False), experiment

    with kfp_api.quiet():
        with kfp_api.step(f"finding or creating experiment {target.experiment!r}", host):
            experiment = experiment or kfp_api.ensure_experiment(client, target.experiment, target.namespace)
        for current in existing:
            with kfp_api.step(f"deleting recurring run {current.recurring_run_id}", host):
                client.delete_recurring_run(current.recurring_run_id)
        with kfp_api.step(f"creating recurring run {name!r}", host):
            client.create_recurring_run(
                experiment_id=experiment.experiment_id, job_name=name, description=schedule.description,
                cron_expression=schedule.cron, max_concurrency=schedule.max_concurrency, no_catchup=True,
                params=published.arguments, pipeline_id=published.pipeline_id, version_id=published.version_id,
                enabled=True, pipeline_root=target.pipeline_root, service_account=target.service_account)
    return Change(action, name, detail, applied=True), experiment
