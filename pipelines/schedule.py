"""`flywheel schedule`: make the env's scheduled-retraining KFP recurring run match config."""
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
    _name_filter,
    _quiet,
    _require_host,
    _step,
    content_hash,
    default_registry,
    default_version_name,
    kfp_pipeline_name,
    make_client,
)

RETRAIN_PIPELINE = "training"
# The KFP backend rejects recurring runs outside this range (recurring_run_server.go).
MAX_CONCURRENCY_RANGE = (1, 10)


@dataclass(frozen=True)
class Change:
    """One reconcile decision about a recurring run; `applied` is False in a dry run."""

    action: str  # create | update | delete | unchanged
    name: str
    detail: str
    applied: bool

    def __str__(self) -> str:
        verb = self.action if self.applied or self.action == "unchanged" else f"would {self.action}"
        return f"{verb} {self.name}: {self.detail}"


def recurring_run_name(settings: Settings, pipeline: str = RETRAIN_PIPELINE) -> str:
    """Stable, so the reconciler finds what it created before."""
    return f"flywheel-{settings.env}-{pipeline}-retrain"


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


def _existing_recurring_runs(client, experiment_id: str, name: str) -> list:
    found = client.list_recurring_runs(experiment_id=experiment_id, filter=_name_filter(name), page_size=100)
    return [r for r in (found.recurring_runs or []) if r.display_name == name]


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
    """Make the env's retraining recurring run match config: create, update, delete or leave it.

    KFP cannot update a recurring run, so an update is a delete followed by a create. The run
    uses a pipeline version with the same content hash as a fresh compile (uploaded if none).
    """
    host = _require_host(settings)
    name = recurring_run_name(settings)
    retraining = settings.retraining
    client = client or make_client(settings)
    with _quiet(), _step(f"reading recurring run {name!r}", host):
        experiment = _find_experiment(client, settings)
        existing = _existing_recurring_runs(client, experiment.experiment_id, name) if experiment else []

    if not retraining.enabled:
        if not existing:
            return [Change("unchanged", name, "retraining is disabled and no recurring run exists", applied=False)]
        changes = []
        for current in existing:
            if not dry_run:
                with _quiet(), _step(f"deleting recurring run {current.recurring_run_id}", host):
                    client.delete_recurring_run(current.recurring_run_id)
            changes.append(Change("delete", name, f"retraining is disabled (id {current.recurring_run_id})",
                                  applied=not dry_run))
        return changes

    low, high = MAX_CONCURRENCY_RANGE
    if not low <= retraining.max_concurrency <= high:
        raise SubmitError(f"retraining.max_concurrency is {retraining.max_concurrency}; KFP allows {low}-{high}")
    cron = kfp_cron(retraining.schedule)
    registry = registry or default_registry()
    display_name = kfp_pipeline_name(settings, RETRAIN_PIPELINE)
    with tempfile.TemporaryDirectory(prefix="flywheel-schedule-") as tmp:
        package, arguments = _compile(registry, settings, RETRAIN_PIPELINE, Path(tmp))
        package_bytes = package.read_bytes()
        package_hash = content_hash(package_bytes)
        with _quiet(), _step(f"looking up versions of {display_name!r}", host):
            pipeline_id = _find_pipeline_id(client, settings, display_name)
            version = _find_version(client, pipeline_id, package_hash) if pipeline_id else None
        version_id = version.pipeline_version_id if version else None

        describe = (f"cron {cron!r} (config {retraining.schedule!r}), max_concurrency {retraining.max_concurrency}, "
                    f"no catchup, version {version.display_name if version else 'new upload (' + package_hash + ')'}")
        if len(existing) == 1:
            reasons = _differences(existing[0], cron, retraining.max_concurrency, arguments, version_id,
                             settings.kfp.service_account)
            if not reasons:
                return [Change("unchanged", name, describe, applied=False)]
            action, detail = "update", "; ".join(reasons) + " (delete + create)"
        elif existing:
            action, detail = "update", f"{len(existing)} recurring runs share the name; replace with one: {describe}"
        else:
            action, detail = "create", describe
        if dry_run:
            return [Change(action, name, detail, applied=False)]

        with _quiet():
            if version is None:
                with _step(f"uploading a version of {display_name!r}", host):
                    pipeline_id = pipeline_id or _ensure_pipeline_id(client, settings, RETRAIN_PIPELINE)
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
                    experiment_id=experiment.experiment_id, job_name=name,
                    description=f"Flywheel scheduled retraining ({settings.env}); managed by `flywheel schedule`",
                    cron_expression=cron, max_concurrency=retraining.max_concurrency, no_catchup=True,
                    params=arguments, pipeline_id=pipeline_id, version_id=version.pipeline_version_id,
                    enabled=True, pipeline_root=settings.kfp.pipeline_root,
                    service_account=settings.kfp.service_account)
    return [Change(action, name, detail, applied=True)]
