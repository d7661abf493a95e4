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

import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import Settings
from pipelines.kfp_client import (
    SubmitError,
    _compile,
    _ensure_experiment,
    _ensure_pipeline_id,
    _find_experiment,
    _find_pipeline_id,
    _find_version,
    _quiet,
    _require_host,
    _step,
    content_hash,
    default_registry,
    default_version_name,
    kfp_pipeline_name,
    make_client,
)
from storage.endpoints import doing

RETRAIN_PIPELINE = "training"
MONITOR_PIPELINE = "monitoring"
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
        raise SubmitError(f"retraining.schedule {cron!r} must be a 5-field cron (minute hour day month weekday)")
    return " ".join(["0", *fields])


def every_hours_cron(hours: int) -> str:
    """KFP's 6-field cron for "every HOURS hours, on the hour" (sec min hour dom month dow)."""
    if not 1 <= hours <= 24:
        raise SubmitError(f"monitoring.check_every_hours is {hours}; use 1-24")
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
            raise SubmitError(f"retraining.max_concurrency is {retraining.max_concurrency}; KFP allows {low}-{high}")
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


def _existing_recurring_runs(client, experiment_id: str, prefix: str) -> dict[str, list]:
    """The experiment's recurring runs whose names start with PREFIX, by name (oldest first)."""
    found: dict[str, list] = {}
    token = ""
    while True:
        page = client.list_recurring_runs(experiment_id=experiment_id, page_token=token, page_size=100)
        for run in page.recurring_runs or []:
            if (run.display_name or "").startswith(prefix):
                found.setdefault(run.display_name, []).append(run)
        token = page.next_page_token
        if not token:
            return found


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
    settings: Settings, client=None, dry_run: bool = False, *, registry=None
) -> list[Change]:
    """Make the env's recurring runs match config: create, update, delete or leave each one.

    KFP cannot update a recurring run, so an update is a delete followed by a create. A run uses
    a pipeline version with the same content hash as a fresh compile (uploaded if none).
    Declared runs come first in the changes (retraining, monitoring), then undeclared deletions.
    """
    host = _require_host(settings)
    declared = declared_schedules(settings)
    with doing(f"reading recurring runs {managed_prefix(settings)}*"):
        client = client or make_client(settings)
    with _quiet(), _step(f"reading recurring runs {managed_prefix(settings)}*", host):
        experiment = _find_experiment(client, settings)
        existing = _existing_recurring_runs(client, experiment.experiment_id, managed_prefix(settings)) \
            if experiment else {}

    changes = []
    retrain_name = recurring_run_name(settings, RETRAIN_PIPELINE)
    if not settings.retraining.enabled and retrain_name not in existing:
        changes.append(Change("unchanged", retrain_name, "retraining is disabled and no recurring run exists",
                              applied=False))
    registry = registry or default_registry()
    with tempfile.TemporaryDirectory(prefix="flywheel-schedule-") as tmp:
        for schedule in declared:
            change, experiment = _reconcile_one(settings, client, registry, schedule, existing.pop(schedule.name, []),
                                                experiment, Path(tmp), dry_run)
            changes.append(change)
    for name, runs in sorted(existing.items()):
        why = "retraining is disabled" if name == retrain_name else "not declared in config"
        for current in runs:
            if not dry_run:
                with _quiet(), _step(f"deleting recurring run {current.recurring_run_id}", host):
                    client.delete_recurring_run(current.recurring_run_id)
            changes.append(Change("delete", name, f"{why} (id {current.recurring_run_id})", applied=not dry_run))
    return changes


def _reconcile_one(settings: Settings, client, registry, schedule: Declared, existing: list, experiment,
                   tmp: Path, dry_run: bool):
    """(the change for one declared recurring run, the experiment, created if it had to be)."""
    host = _require_host(settings)
    name = schedule.name
    display_name = kfp_pipeline_name(settings, schedule.pipeline)
    package, arguments = _compile(registry, settings, schedule.pipeline, tmp / schedule.pipeline)
    package_bytes = package.read_bytes()
    package_hash = content_hash(package_bytes)
    with _quiet(), _step(f"looking up versions of {display_name!r}", host):
        pipeline_id = _find_pipeline_id(client, settings, display_name)
        version = _find_version(client, pipeline_id, package_hash) if pipeline_id else None
    version_id = version.pipeline_version_id if version else None

    describe = (f"cron {schedule.cron!r} ({schedule.config}), max_concurrency {schedule.max_concurrency}, "
                f"no catchup, version {version.display_name if version else 'new upload (' + package_hash + ')'}")
    if len(existing) == 1:
        reasons = _differences(existing[0], schedule.cron, schedule.max_concurrency, arguments, version_id,
                               settings.kfp.service_account)
        if not reasons:
            return Change("unchanged", name, describe, applied=False), experiment
        action, detail = "update", "; ".join(reasons) + " (delete + create)"
    elif existing:
        action, detail = "update", f"{len(existing)} recurring runs share the name; replace with one: {describe}"
    else:
        action, detail = "create", describe
    if dry_run:
        return Change(action, name, detail, applied=False), experiment

    with _quiet():
        if version is None:
            with _step(f"uploading a version of {display_name!r}", host):
                pipeline_id = pipeline_id or _ensure_pipeline_id(client, settings, schedule.pipeline)
                version = client.upload_pipeline_version(
                    str(package), default_version_name(package_bytes), pipeline_id=pipeline_id,
                    description=f"uploaded by flywheel schedule for {settings.env}")
        with _step(f"finding or creating experiment {settings.kfp.experiment!r}", host):
            experiment = experiment or _ensure_experiment(client, settings)
        for current in existing:
            with _step(f"deleting recurring run {current.recurring_run_id}", host):
                client.delete_recurring_run(current.recurring_run_id)
        with _step(f"creating recurring run {name!r}", host):
            client.create_recurring_run(
                experiment_id=experiment.experiment_id, job_name=name, description=schedule.description,
                cron_expression=schedule.cron, max_concurrency=schedule.max_concurrency, no_catchup=True,
                params=arguments, pipeline_id=pipeline_id, version_id=version.pipeline_version_id,
                enabled=True, pipeline_root=settings.kfp.pipeline_root,
                service_account=settings.kfp.service_account)
    return Change(action, name, detail, applied=True), experiment
