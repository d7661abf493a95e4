"""Pipelines onto a Kubeflow Pipelines cluster: `flywheel submit` and `flywheel schedule`.

`submit_pipeline` compiles a pipeline for an environment, uploads it as a new version of the
KFP pipeline `flywheel-<env>-<pipeline>`, and starts a run in the env's experiment.
`reconcile_schedules` makes the KFP recurring run for scheduled retraining match config.

Every failure becomes a `SubmitError` with a one-line reason. Credentials come from the
environment (see `make_client`) and never appear in messages or logs.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipelines.config import Settings

BEARER_TOKEN_ENV = "KFP_BEARER_TOKEN"
BEARER_TOKEN_FILE_ENV = "KFP_BEARER_TOKEN_FILE"
COOKIE_ENV = "KFP_COOKIE"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.client.KF_PIPELINES_SA_TOKEN_ENV
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"  # kfp.client.KF_PIPELINES_SA_TOKEN_PATH
RETRAIN_PIPELINE = "training"
# The KFP backend rejects recurring runs outside this range (recurring_run_server.go).
MAX_CONCURRENCY_RANGE = (1, 10)


class SubmitError(RuntimeError):
    """Submitting or scheduling failed; the message is one line that says why."""


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


# --- naming -----------------------------------------------------------------------------------

def kfp_pipeline_name(settings: Settings, pipeline: str) -> str:
    return f"flywheel-{settings.env}-{pipeline}"


def recurring_run_name(settings: Settings, pipeline: str = RETRAIN_PIPELINE) -> str:
    """Stable, so the reconciler finds what it created before."""
    return f"flywheel-{settings.env}-{pipeline}-retrain"


def content_hash(package: bytes) -> str:
    return hashlib.sha256(package).hexdigest()[:10]


def default_version_name(package: bytes, now: dt.datetime | None = None) -> str:
    """UTC time sorts versions; the content hash says which ones are the same pipeline."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{content_hash(package)}"


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


# --- the client -------------------------------------------------------------------------------

def _auth() -> tuple[str, dict]:
    """(description, kfp.Client kwargs) from the first credential source that is set."""
    token = os.environ.get(BEARER_TOKEN_ENV, "").strip()
    if token:
        return f"${BEARER_TOKEN_ENV}", {"existing_token": token}
    token_file = os.environ.get(BEARER_TOKEN_FILE_ENV)
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as err:
            raise SubmitError(f"${BEARER_TOKEN_FILE_ENV}={token_file} cannot be read: {err.strerror}") from None
        if not token:
            raise SubmitError(f"${BEARER_TOKEN_FILE_ENV}={token_file} is empty")
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


def _auth_hint() -> str:
    try:
        used = _auth()[0]
    except SubmitError:
        used = f"${BEARER_TOKEN_FILE_ENV} (unreadable)"
    return (f"check the credentials (used: {used}); set ${BEARER_TOKEN_ENV} or ${BEARER_TOKEN_FILE_ENV} "
            f"(bearer token) or ${COOKIE_ENV} (session cookie, e.g. authservice_session=...)")


def make_client(settings: Settings):
    """A kfp.Client for ENV's host, authenticated from the environment, first match wins:

    1. $KFP_BEARER_TOKEN, or the file named by $KFP_BEARER_TOKEN_FILE (`existing_token`);
    2. $KFP_COOKIE, sent as the Cookie header (oauth2-proxy / dex `authservice_session`);
    3. kfp's in-cluster ServiceAccount token volume ($KF_PIPELINES_SA_TOKEN_PATH, default
       /var/run/secrets/kubeflow/pipelines/token) when that file exists;
    4. nothing (a port-forward or an unauthenticated dev install).
    """
    host = _require_host(settings)
    _, auth = _auth()
    with _quiet(), _step("connecting to KFP", host):
        return _client_class()(host=host, namespace=settings.kfp.namespace or "kubeflow", **auth)


def _client_class():
    import kfp

    class Client(kfp.Client):
        """kfp.Client whose healthz probe tries once.

        Without a namespace, kfp.Client probes healthz while connecting and retries any API
        error 5 times, 5 s apart; a 401 or 403 is not transient, so fail at once instead.
        """

        def get_kfp_healthz(self, sleep_duration: int = 5):
            return self._healthz_api.healthz_service_get_healthz()

    return Client


def _require_host(settings: Settings) -> str:
    if not settings.kfp.host:
        raise SubmitError(f"environment {settings.env!r} has no KFP host (kfp.host); "
                          f"use `flywheel run --env {settings.env}` to run the pipeline on this machine")
    return settings.kfp.host.rstrip("/")


def _ui_url(settings: Settings, fragment: str) -> str:
    base = os.environ.get("KF_PIPELINES_UI_ENDPOINT") or settings.kfp.host or ""
    return f"{base.rstrip('/')}/#/{fragment}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """kfp.Client prints links and warns about server versions, urllib3 logs each connection
    retry; our CLI prints its own summary or one-line error instead."""
    pool_logger = logging.getLogger("urllib3.connectionpool")
    level = pool_logger.level
    pool_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        pool_logger.setLevel(level)


def _api_message(err) -> str:
    body = err.body.decode("utf-8", "replace") if isinstance(err.body, bytes) else (err.body or "")
    message = None
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            message = data.get("message") or data.get("error_message")
    except ValueError:
        message = body
    return " ".join(str(message or err.reason or "no details").split())[:400]


def _unreachable_reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    text = re.sub(r"<[^>]+>:\s*", "", str(reason))  # drop urllib3's "<...Connection object at 0x..>: "
    return " ".join(text.split())[:300]


@contextlib.contextmanager
def _step(what: str, host: str) -> Iterator[None]:
    """Turn whatever the kfp client raises during WHAT into a one-line SubmitError."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except SubmitError:
        raise
    except kfp_server_api.ApiException as err:
        if not err.status:  # kfp_server_api's wrapper for TLS errors
            raise SubmitError(f"{what}: cannot reach KFP at {host}: {_unreachable_reason(err)}") from err
        status = f"HTTP {err.status} {err.reason or ''}".strip()
        if err.status in (401, 403):
            raise SubmitError(f"{what}: KFP at {host} refused the request ({status}: {_api_message(err)}); "
                              f"{_auth_hint()}") from err
        raise SubmitError(f"{what}: KFP at {host} answered {status}: {_api_message(err)}") from err
    except (urllib3.exceptions.HTTPError, ConnectionError) as err:
        raise SubmitError(f"{what}: cannot reach KFP at {host}: {_unreachable_reason(err)}") from err
    except (ValueError, TimeoutError) as err:  # kfp's own checks, e.g. duplicate names
        raise SubmitError(f"{what}: {' '.join(str(err).split()) or type(err).__name__}") from err


# --- the registry -----------------------------------------------------------------------------

def default_registry():
    """`pipelines.registry`: PIPELINES, compile_pipeline(settings, name, out_dir), pipeline_arguments."""
    from pipelines import registry

    return registry


def _compile(registry, settings: Settings, name: str, out_dir: Path) -> tuple[Path, dict]:
    known = sorted(registry.PIPELINES)
    if name not in registry.PIPELINES:
        raise SubmitError(f"unknown pipeline {name!r}; known: {', '.join(known)}")
    try:
        package = Path(registry.compile_pipeline(settings, name, out_dir))
        arguments = registry.pipeline_arguments(settings, name)
    except Exception as err:  # a pipeline that does not build for this env cannot be submitted
        raise SubmitError(f"compiling {name!r} for {settings.env}: {type(err).__name__}: "
                          f"{' '.join(str(err).split())}") from err
    return package, arguments


# --- KFP lookups ------------------------------------------------------------------------------

def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _find_pipeline_id(client, settings: Settings, display_name: str) -> str | None:
    found = client.list_pipelines(filter=_name_filter(display_name), namespace=settings.kfp.namespace, page_size=2)
    pipelines = found.pipelines or []
    if len(pipelines) > 1:
        raise SubmitError(f"more than one KFP pipeline is named {display_name!r}; remove the duplicates")
    return pipelines[0].pipeline_id if pipelines else None


def _ensure_pipeline_id(client, settings: Settings, pipeline: str) -> str:
    """The pipeline's id, creating it (with no versions) on first submit."""
    import kfp_server_api

    display_name = kfp_pipeline_name(settings, pipeline)
    pipeline_id = _find_pipeline_id(client, settings, display_name)
    if pipeline_id:
        return pipeline_id
    body = kfp_server_api.V2beta1Pipeline(
        display_name=display_name, namespace=settings.kfp.namespace,
        description=f"Flywheel {pipeline} pipeline, {settings.env} environment")
    try:
        return client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id
    except kfp_server_api.ApiException as err:
        if err.status != 409:  # 409: someone created it just now; use theirs
            raise
    return _find_pipeline_id(client, settings, display_name)


def _find_version(client, pipeline_id: str, package_hash: str):
    """A version whose name ends in this content hash: the same compiled pipeline."""
    token = ""
    while True:
        page = client.list_pipeline_versions(pipeline_id, page_token=token, page_size=100, sort_by="created_at desc")
        for version in page.pipeline_versions or []:
            if (version.display_name or "").endswith(f"-{package_hash}"):
                return version
        token = page.next_page_token
        if not token:
            return None


def _find_experiment(client, settings: Settings):
    namespace = settings.kfp.namespace or ""
    found = client.list_experiments(filter=_name_filter(settings.kfp.experiment), namespace=namespace, page_size=2)
    return (found.experiments or [None])[0]


def _ensure_experiment(client, settings: Settings):
    # kfp's create_experiment is get-or-create by name (in the namespace for multi-user installs).
    return client.create_experiment(name=settings.kfp.experiment, namespace=settings.kfp.namespace)


# --- submit -----------------------------------------------------------------------------------

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


# --- schedule ---------------------------------------------------------------------------------

def _existing_recurring_runs(client, experiment_id: str, name: str) -> list:
    found = client.list_recurring_runs(experiment_id=experiment_id, filter=_name_filter(name), page_size=100)
    return [r for r in (found.recurring_runs or []) if r.display_name == name]


def _drift(current, cron: str, concurrency: int, parameters: dict, version_id: str | None,
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
            reasons = _drift(existing[0], cron, retraining.max_concurrency, arguments, version_id,
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
