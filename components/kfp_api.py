"""The KFP API calls that both a pipeline task and the `flywheel` CLI make: credentials from the
environment, starting a run of a stored pipeline with the reasons it was started for, and the
runs of a pipeline still in flight.

It sits here, beside the ops, because the monitoring pipeline's trigger op starts a training run
from inside a KFP task, and ops may not import `pipelines/` (layer 5, which knows `Settings`):
`pipelines/kfp_client.py` takes its credentials and name filters from this module, and
`pipelines/retrain.py` its run starting and in-flight listing. Nothing here reads config: what to
talk to comes as a `KfpTarget` (a plain dict in a compiled pipeline). kfp is imported lazily.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

BEARER_TOKEN_ENV = "KFP_BEARER_TOKEN"
BEARER_TOKEN_FILE_ENV = "KFP_BEARER_TOKEN_FILE"
COOKIE_ENV = "KFP_COOKIE"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.client.KF_PIPELINES_SA_TOKEN_ENV
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"  # kfp.client.KF_PIPELINES_SA_TOKEN_PATH

# V2beta1RuntimeState values of a run that has not ended (CANCELING is on its way out).
IN_FLIGHT_STATES = ("PENDING", "RUNNING", "PAUSED")
MAX_DESCRIPTION = 1000  # what the KFP UI shows comfortably; the full reasons are in the MLflow audit run
MAX_NAME = 128


class CredentialsError(ValueError):
    """A credential source is set but unusable; the message says which and why."""


def credentials() -> tuple[str, dict]:
    """(description, kfp.Client kwargs) from the first credential source that is set:

    1. $KFP_BEARER_TOKEN, or the file named by $KFP_BEARER_TOKEN_FILE (`existing_token`);
    2. $KFP_COOKIE, sent as the Cookie header (oauth2-proxy / dex `authservice_session`);
    3. kfp's in-cluster ServiceAccount token volume ($KF_PIPELINES_SA_TOKEN_PATH, default
       /var/run/secrets/kubeflow/pipelines/token) when that file exists: what a pipeline task uses;
    4. nothing (a port-forward or an unauthenticated dev install).
    """
    token = os.environ.get(BEARER_TOKEN_ENV, "").strip()
    if token:
        return f"${BEARER_TOKEN_ENV}", {"existing_token": token}
    token_file = os.environ.get(BEARER_TOKEN_FILE_ENV)
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as err:
            raise CredentialsError(f"${BEARER_TOKEN_FILE_ENV}={token_file} cannot be read: {err.strerror}") from None
        if not token:
            raise CredentialsError(f"${BEARER_TOKEN_FILE_ENV}={token_file} is empty")
        return f"${BEARER_TOKEN_FILE_ENV} ({token_file})", {"existing_token": token}
    cookie = os.environ.get(COOKIE_ENV, "").strip()
    if cookie:
        return f"${COOKIE_ENV}", {"cookies": cookie}
    sa_path = os.environ.get(SA_TOKEN_PATH_ENV) or SA_TOKEN_PATH
    if os.path.isfile(sa_path):
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        # kfp re-reads the file before each request, so kubelet's token rotation is picked up.
        return f"ServiceAccount token {sa_path}", {"credentials": ServiceAccountTokenVolumeCredentials(sa_path)}
    return "no credentials", {}


def name_filter(name: str) -> str:
    """A KFP list filter: display_name equals NAME."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


@dataclass(frozen=True)
class KfpTarget:
    """Where a training run is started: the KFP host, the experiment, the stored pipeline.

    Args:
        host: The KFP API endpoint.
        experiment: The experiment runs are started in (created if missing).
        pipeline: The stored pipeline's display name, e.g. flywheel-prod-training; its runs'
            names start with it, which is how the in-flight ones are told apart.
        namespace: The profile namespace of a multi-user install.
        pipeline_root: Where the run's artifacts go.
        service_account: The ServiceAccount of the run's task pods.
    """

    host: str
    experiment: str
    pipeline: str
    namespace: str | None = None
    pipeline_root: str | None = None
    service_account: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> KfpTarget:
        if not data.get("host"):
            raise ValueError("no KFP host in the trigger's target: this environment runs on this machine "
                             "(start retraining with `flywheel monitor --trigger` there)")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown KFP target keys {unknown}; known: {sorted(known)}")
        return cls(**data)


def connect(target: KfpTarget):
    """A kfp.Client for the target, authenticated as `credentials()` says."""
    import kfp

    _, auth = credentials()
    return kfp.Client(host=target.host.rstrip("/"), namespace=target.namespace or "kubeflow", **auth)


def run_description(request: dict) -> str:
    """What a triggered run says about itself in the KFP UI: its source, dedup key and reasons."""
    reasons = "; ".join(str(r) for r in request.get("reasons") or []) or "no reason given"
    text = (f"Retraining started by flywheel's guarded trigger ({request.get('source', 'manual')}, "
            f"key {request.get('dedup_key', '')!r}): {reasons}")
    return text if len(text) <= MAX_DESCRIPTION else text[:MAX_DESCRIPTION - 3] + "..."


def run_name(pipeline: str, request: dict, stamp: str) -> str:
    """`<pipeline> retrain <source> <stamp>`: starts with the pipeline's name, so it counts as in flight."""
    return f"{pipeline} retrain {request.get('source', 'manual')} {stamp}"[:MAX_NAME]


def start_run(client, *, experiment_id: str, pipeline_id: str, version_id: str, name: str, description: str,
              params: dict | None = None, pipeline_root: str | None = None, service_account: str | None = None):
    """Start a run of a stored pipeline version, with a description; the V2beta1Run.

    `kfp.Client.run_pipeline` has no description argument (and KFP v2 runs have no labels), so the
    body is built here the way run_pipeline builds it, plus the description.
    """
    import kfp_server_api

    body = kfp_server_api.V2beta1Run(
        experiment_id=experiment_id, display_name=name, description=description,
        pipeline_version_reference=kfp_server_api.V2beta1PipelineVersionReference(
            pipeline_id=pipeline_id, pipeline_version_id=version_id),
        runtime_config=kfp_server_api.V2beta1RuntimeConfig(pipeline_root=pipeline_root, parameters=params or {}),
        service_account=service_account)
    return client.runs.run_service_create_run(run=body)


def runs_in_flight(client, experiment_id: str, prefix: str) -> list[dict]:
    """Runs in the experiment whose display name starts with PREFIX and whose state is not final."""
    found, token = [], ""
    while True:
        page = client.list_runs(experiment_id=experiment_id, page_token=token, page_size=100,
                                sort_by="created_at desc")
        for run in page.runs or []:
            if (run.display_name or "").startswith(prefix) and run.state in IN_FLIGHT_STATES:
                found.append({"run_id": run.run_id, "name": run.display_name, "state": run.state,
                              "created_at": str(run.created_at or "")})
        token = page.next_page_token
        if not token:
            return found


def find_experiment_id(client, target: KfpTarget) -> str | None:
    found = client.list_experiments(filter=name_filter(target.experiment), namespace=target.namespace or "",
                                    page_size=2)
    return found.experiments[0].experiment_id if found.experiments else None


def latest_version(client, target: KfpTarget) -> tuple[str, str]:
    """(pipeline id, newest version id) of the target's stored pipeline."""
    found = client.list_pipelines(filter=name_filter(target.pipeline), namespace=target.namespace, page_size=2)
    pipelines = found.pipelines or []
    if len(pipelines) != 1:
        raise LookupError(f"{len(pipelines) or 'no'} KFP pipelines named {target.pipeline!r}"
                          + ("; upload it with `flywheel submit` or `flywheel schedule`" if not pipelines else ""))
    pipeline_id = pipelines[0].pipeline_id
    versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc").pipeline_versions
    if not versions:
        raise LookupError(f"KFP pipeline {target.pipeline!r} has no versions")
    return pipeline_id, versions[0].pipeline_version_id


def start_training_run(target: KfpTarget | dict, request: dict, client=None, stamp: str | None = None) -> str:
    """Start the target pipeline's newest version in the target experiment and return the run id.

    What a pipeline task can do without config: the run gets the version's compiled parameter
    defaults (each env's config, compiled in), its name says it was triggered and its
    description carries the request's reasons.
    """
    import datetime as dt

    target = target if isinstance(target, KfpTarget) else KfpTarget.from_dict(target)
    client = client or connect(target)
    experiment = client.create_experiment(name=target.experiment, namespace=target.namespace)  # get-or-create
    pipeline_id, version_id = latest_version(client, target)
    stamp = stamp or f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    run = start_run(client, experiment_id=experiment.experiment_id, pipeline_id=pipeline_id, version_id=version_id,
                    name=run_name(target.pipeline, request, stamp), description=run_description(request),
                    pipeline_root=target.pipeline_root, service_account=target.service_account)
    return run.run_id


def training_runs_in_flight(target: KfpTarget | dict, client=None) -> list[dict]:
    """The target pipeline's runs in the target experiment that have not ended."""
    target = target if isinstance(target, KfpTarget) else KfpTarget.from_dict(target)
    client = client or connect(target)
    experiment_id = find_experiment_id(client, target)
    return runs_in_flight(client, experiment_id, target.pipeline) if experiment_id else []
