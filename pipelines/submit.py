"""`flywheel submit`: compile a pipeline for an environment, upload it as a new version of the
KFP pipeline `flywheel-<env>-<pipeline>`, and start a run in the env's experiment."""
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
    _quiet,
    _require_host,
    _step,
    _ui_url,
    default_registry,
    default_version_name,
    kfp_pipeline_name,
    make_client,
)
from storage.endpoints import doing


@dataclass(frozen=True)
class SubmitResult:
    pipeline_name: str
    pipeline_id: str
    version_name: str
    version_id: str
    experiment_name: str
    experiment_id: str
    run_id: str
    run_url: str
    state: str

    def summary(self) -> str:
        rows = [
            ("pipeline", self.pipeline_name, self.pipeline_id),
            ("version", self.version_name, self.version_id),
            ("experiment", self.experiment_name, self.experiment_id),
            ("run", self.state, self.run_id),
        ]
        lines = [f"  {label:<11}{name}  ({ident})" for label, name, ident in rows]
        return "\n".join(["submitted:", *lines, f"  {'url':<11}{self.run_url}"])


def submit_pipeline(
    settings: Settings,
    pipeline_name: str,
    version: str | None = None,
    wait: bool = False,
    client=None,
    *,
    registry=None,
    timeout_s: float = 24 * 3600,
    poll_s: float = 15,
) -> SubmitResult:
    """Compile PIPELINE_NAME for settings.env, upload it as a new version, start a run."""
    host = _require_host(settings)
    registry = registry or default_registry()
    display_name = kfp_pipeline_name(settings, pipeline_name)
    with tempfile.TemporaryDirectory(prefix="flywheel-submit-") as tmp:
        package, arguments = _compile(registry, settings, pipeline_name, Path(tmp))
        version_name = version or default_version_name(package.read_bytes())
        with doing(f"submitting {display_name}"):
            client = client or make_client(settings)
        with _quiet():
            with _step(f"finding or creating pipeline {display_name!r}", host):
                pipeline_id = _ensure_pipeline_id(client, settings, pipeline_name)
            with _step(f"uploading version {version_name!r} of {display_name!r}", host):
                uploaded = client.upload_pipeline_version(
                    str(package), version_name, pipeline_id=pipeline_id,
                    description=f"submitted by flywheel for {settings.env}")
    with _quiet():
        with _step(f"finding or creating experiment {settings.kfp.experiment!r}", host):
            experiment = _ensure_experiment(client, settings)
        with _step(f"starting a run of {display_name!r}", host):
            run = client.run_pipeline(
                experiment_id=experiment.experiment_id, job_name=f"{display_name} {version_name}",
                params=arguments, pipeline_id=pipeline_id, version_id=uploaded.pipeline_version_id,
                pipeline_root=settings.kfp.pipeline_root, service_account=settings.kfp.service_account)
    url = _ui_url(settings, f"runs/details/{run.run_id}")
    state = run.state or "PENDING"
    if wait:
        with _quiet(), _step(f"waiting for run {run.run_id}", host):
            finished = client.wait_for_run_completion(run.run_id, timeout=timeout_s, sleep_duration=poll_s)
        state = finished.state or "UNKNOWN"
        if state != "SUCCEEDED":
            why = f": {' '.join(finished.error.message.split())}" if finished.error and finished.error.message else ""
            raise SubmitError(f"run {run.run_id} of {display_name} ended {state}{why} ({url})")
    return SubmitResult(display_name, pipeline_id, version_name, uploaded.pipeline_version_id,
                        settings.kfp.experiment, experiment.experiment_id, run.run_id, url, state)
