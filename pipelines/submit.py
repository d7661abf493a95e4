"""`flywheel submit`: publish a pipeline for an environment (`pipelines.publish`: the compiled
content becomes the newest version of the KFP pipeline `flywheel-<env>-<pipeline>`) and start a run
of it in the env's experiment."""
from __future__ import annotations

from dataclasses import dataclass

from gateways import kfp_api
from gateways.kfp_api import KfpError
from pipelines.config import Settings
from pipelines.publish import client_for, publish, require_target
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
    catalog=None,
    timeout_s: float = 24 * 3600,
    poll_s: float = 15,
) -> SubmitResult:
    """Publish PIPELINE_NAME for settings.env (a named VERSION is always uploaded), start a run."""
    target = require_target(settings, pipeline_name)
    host = target.host.rstrip("/")
    with doing(f"submitting {target.pipeline}"):
        client = client or client_for(settings)
    published = publish(settings, pipeline_name, client=client, catalog=catalog, version=version,
                        by="flywheel submit")
    with kfp_api.quiet():
        with kfp_api.step(f"finding or creating experiment {target.experiment!r}", host):
            experiment = kfp_api.ensure_experiment(client, target.experiment, target.namespace)
        with kfp_api.step(f"starting a run of {target.pipeline!r}", host):
            run = client.run_pipeline(
                experiment_id=experiment.experiment_id, job_name=f"{target.pipeline} {published.version_name}",
                params=published.arguments, pipeline_id=published.pipeline_id, version_id=published.version_id,
                pipeline_root=target.pipeline_root, service_account=target.service_account)
    url = kfp_api.ui_url(host, f"runs/details/{run.run_id}")
    state = run.state or "PENDING"
    if wait:
        with kfp_api.quiet(), kfp_api.step(f"waiting for run {run.run_id}", host):
            finished = client.wait_for_run_completion(run.run_id, timeout=timeout_s, sleep_duration=poll_s)
        state = finished.state or "UNKNOWN"
        if state != "SUCCEEDED":
            why = f": {' '.join(finished.error.message.split())}" if finished.error and finished.error.message else ""
            raise KfpError(f"run {run.run_id} of {target.pipeline} ended {state}{why} ({url})")
    return SubmitResult(target.pipeline, published.pipeline_id, published.version_name, published.version_id,
                        target.experiment, experiment.experiment_id, run.run_id, url, state)
