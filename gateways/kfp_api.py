"""The Kubeflow Pipelines API, the one way Flywheel reaches it: an authenticated client (probed
first, so a host that is not there fails in seconds), lookups (pipeline by name, its versions,
experiment), one pagination loop, uploading a version, starting a run with the reasons it was
started for, the runs and recurring runs of a pipeline, and starting the published training run.

Only this module imports `kfp.client` (`kfp.Client`) and `kfp_server_api` (tests/project/test_layers.py
checks it). It reads no config: what to talk to comes as a `KfpTarget`, which a compiled pipeline
carries as a plain dict (a task has no `Settings`). kfp is imported lazily, so importing this
module stays cheap. Every failure a user can reach is a `KfpError` with a one-line message;
credentials never appear in one.
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
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.endpoints import Unreachable, probe

BEARER_TOKEN_ENV = "KFP_BEARER_TOKEN"
BEARER_TOKEN_FILE_ENV = "KFP_BEARER_TOKEN_FILE"
COOKIE_ENV = "KFP_COOKIE"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.client.KF_PIPELINES_SA_TOKEN_ENV
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"  # kfp.client.KF_PIPELINES_SA_TOKEN_PATH
UI_ENDPOINT_ENV = "KF_PIPELINES_UI_ENDPOINT"

# V2beta1RuntimeState values of a run that has not ended (CANCELING is on its way out).
IN_FLIGHT_STATES = ("PENDING", "RUNNING", "PAUSED")
MAX_DESCRIPTION = 1000  # what the KFP UI shows comfortably; the full reasons are in the MLflow audit run
MAX_NAME = 128
PAGE_SIZE = 100


class KfpError(RuntimeError):
    """A KFP request (or the credentials for it) failed; the message is one line that says why."""


class KfpUnreachable(KfpError, Unreachable):
    """The KFP API did not answer a connection: `cannot reach KFP at HOST (WHAT): REASON`. A
    KfpError (callers that catch those still do) and an `Unreachable`, so that a dry run can tell
    "no server to compare with" from a server that refused the request."""

    __init__ = Unreachable.__init__  # KfpError's MRO would otherwise pick RuntimeError's
    __str__ = Unreachable.__str__


@dataclass(frozen=True)
class KfpTarget:
    """Where runs of a stored pipeline are started: the KFP host, the experiment, the pipeline.

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

    def as_dict(self) -> dict:
        """The target without unset keys (a KFP STRUCT parameter holds no null)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def target_of(target: KfpTarget | dict) -> KfpTarget:
    return target if isinstance(target, KfpTarget) else KfpTarget.from_dict(target)


# --- the client -----------------------------------------------------------------------------------

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
            raise KfpError(f"${BEARER_TOKEN_FILE_ENV}={token_file} cannot be read: {err.strerror}") from None
        if not token:
            raise KfpError(f"${BEARER_TOKEN_FILE_ENV}={token_file} is empty")
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


def auth_hint() -> str:
    """What to check after a 401/403, naming the credential source used (never its value)."""
    try:
        used = credentials()[0]
    except KfpError:
        used = f"${BEARER_TOKEN_FILE_ENV} (unreadable)"
    return (f"check the credentials (used: {used}); set ${BEARER_TOKEN_ENV} or ${BEARER_TOKEN_FILE_ENV} "
            f"(bearer token) or ${COOKIE_ENV} (session cookie, e.g. authservice_session=...)")


def connect(target: KfpTarget):
    """A kfp.Client for the target's host, authenticated as `credentials()` says.

    kfp_server_api's urllib3 pool has no connect timeout and ignores $HTTPS_PROXY (kfp.Client
    takes `proxy=` instead), so the host itself is probed first, directly (a no-op outside the
    CLI: `storage.endpoints.probe`)."""
    import kfp

    host = target.host.rstrip("/")
    _, auth = credentials()
    try:
        probe("KFP", host, proxy=None)
    except Unreachable as err:
        raise KfpUnreachable("KFP", host, err.reason) from None  # what for: the caller's `doing`

    class Client(kfp.Client):
        """kfp.Client whose healthz probe tries once.

        Without a namespace, kfp.Client probes healthz while connecting and retries any API
        error 5 times, 5 s apart; a 401 or 403 is not transient, so fail at once instead.
        """

        def get_kfp_healthz(self, sleep_duration: int = 5):
            return self._healthz_api.healthz_service_get_healthz()

    with quiet(), step("connecting to KFP", host):
        return Client(host=host, namespace=target.namespace or "kubeflow", **auth)


def ui_url(host: str, fragment: str) -> str:
    """A link into the KFP UI ($KF_PIPELINES_UI_ENDPOINT when the UI is not at the API's host)."""
    base = os.environ.get(UI_ENDPOINT_ENV) or host or ""
    return f"{base.rstrip('/')}/#/{fragment}"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """kfp.Client prints links and warns about server versions, urllib3 logs each connection
    retry; the CLI prints its own summary or one-line error instead."""
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
def step(what: str, host: str) -> Iterator[None]:
    """Turn whatever the kfp client raises during WHAT into a one-line KfpError."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except KfpError:
        raise
    except kfp_server_api.ApiException as err:
        if not err.status:  # kfp_server_api's wrapper for TLS errors
            raise KfpUnreachable("KFP", host, _unreachable_reason(err), what) from err
        status = f"HTTP {err.status} {err.reason or ''}".strip()
        if err.status in (401, 403):
            raise KfpError(f"{what}: KFP at {host} refused the request ({status}: {_api_message(err)}); "
                           f"{auth_hint()}") from err
        raise KfpError(f"{what}: KFP at {host} answered {status}: {_api_message(err)}") from err
    except (urllib3.exceptions.HTTPError, ConnectionError) as err:
        raise KfpUnreachable("KFP", host, _unreachable_reason(err), what) from err
    except (ValueError, TimeoutError) as err:  # kfp's own checks, e.g. duplicate names
        raise KfpError(f"{what}: {' '.join(str(err).split()) or type(err).__name__}") from err


# --- lookups --------------------------------------------------------------------------------------

def pages(list_page: Callable[..., object], field: str, **kwargs) -> Iterator:
    """Every item of a paginated KFP list call: `list_page(page_token=..., page_size=..., **kwargs)`
    answers a response whose FIELD holds the page's items and `next_page_token` the next page."""
    token = ""
    while True:
        page = list_page(page_token=token, page_size=PAGE_SIZE, **kwargs)
        yield from getattr(page, field) or []
        token = page.next_page_token
        if not token:
            return


def name_filter(name: str) -> str:
    """A KFP list filter: display_name equals NAME."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def find_pipeline_id(client, name: str, namespace: str | None) -> str | None:
    """The id of the stored pipeline whose display name is NAME; None when there is none."""
    found = client.list_pipelines(filter=name_filter(name), namespace=namespace, page_size=2).pipelines or []
    if len(found) > 1:
        raise KfpError(f"more than one KFP pipeline is named {name!r}; remove the duplicates")
    return found[0].pipeline_id if found else None


def ensure_pipeline_id(client, name: str, namespace: str | None, description: str) -> str:
    """The pipeline's id, creating it (with no versions) when it is not stored yet."""
    import kfp_server_api

    pipeline_id = find_pipeline_id(client, name, namespace)
    if pipeline_id:
        return pipeline_id
    body = kfp_server_api.V2beta1Pipeline(display_name=name, namespace=namespace, description=description)
    try:
        return client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id
    except kfp_server_api.ApiException as err:
        if err.status != 409:  # 409: someone created it just now; use theirs
            raise
    return find_pipeline_id(client, name, namespace)


def newest_version(client, pipeline_id: str):
    """The pipeline's most recently created version (the published one), or None."""
    versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc").pipeline_versions
    return versions[0] if versions else None


def upload_version(client, package: Path, name: str, pipeline_id: str, description: str):
    """Upload a compiled pipeline as version NAME of the stored pipeline; the V2beta1PipelineVersion."""
    return client.upload_pipeline_version(str(package), name, pipeline_id=pipeline_id, description=description)


def find_experiment(client, name: str, namespace: str | None):
    found = client.list_experiments(filter=name_filter(name), namespace=namespace or "", page_size=2)
    return (found.experiments or [None])[0]


def ensure_experiment(client, name: str, namespace: str | None):
    # kfp's create_experiment is get-or-create by name (in the namespace for multi-user installs).
    return client.create_experiment(name=name, namespace=namespace)


def content_hash(package: bytes) -> str:
    return hashlib.sha256(package).hexdigest()[:10]


def version_name(package: bytes, now: dt.datetime | None = None) -> str:
    """UTC time sorts versions; the content hash says which ones are the same pipeline."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%d-%H%M%S}-{content_hash(package)}"


def compiled_defaults(version) -> dict:
    """The root parameters' default values compiled into a stored version (its config)."""
    spec = version.pipeline_spec or {}
    spec = spec.get("pipeline_spec", spec)  # a version with a platform spec stores both
    parameters = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: p["defaultValue"] for name, p in parameters.items() if "defaultValue" in p}


# --- runs -----------------------------------------------------------------------------------------

def run_description(request: dict) -> str:
    """What a triggered run says about itself in the KFP UI: its source, dedup key and reasons."""
    reasons = "; ".join(str(r) for r in request.get("reasons") or []) or "no reason given"
    text = (f"Retraining started by flywheel's guarded trigger ({request.get('source', 'manual')}, "
            f"key {request.get('dedup_key', '')!r}): {reasons}")
    return text if len(text) <= MAX_DESCRIPTION else text[:MAX_DESCRIPTION - 3] + "..."


def run_name(pipeline: str, request: dict, stamp: str) -> str:
    """`<pipeline> retrain <source> <stamp>`: starts with the pipeline's name, so it counts as in flight."""
    return f"{pipeline} retrain {request.get('source', 'manual')} {stamp}"[:MAX_NAME]


def start_run(client, target: KfpTarget, *, experiment_id: str, pipeline_id: str, version_id: str, name: str,
              description: str, params: dict | None = None):
    """Start a run of a stored pipeline version in the target's experiment; the V2beta1Run.

    `kfp.Client.run_pipeline` has no description argument (and KFP v2 runs have no labels), so the
    body is built here the way run_pipeline builds it, plus the description.
    """
    import kfp_server_api

    body = kfp_server_api.V2beta1Run(
        experiment_id=experiment_id, display_name=name, description=description,
        pipeline_version_reference=kfp_server_api.V2beta1PipelineVersionReference(
            pipeline_id=pipeline_id, pipeline_version_id=version_id),
        runtime_config=kfp_server_api.V2beta1RuntimeConfig(pipeline_root=target.pipeline_root,
                                                            parameters=params or {}),
        service_account=target.service_account)
    return client.runs.run_service_create_run(run=body)


def runs_in_flight(client, experiment_id: str, prefix: str) -> list[dict]:
    """Runs in the experiment whose display name starts with PREFIX and whose state is not final."""
    return [{"run_id": run.run_id, "name": run.display_name, "state": run.state,
             "created_at": str(run.created_at or "")}
            for run in pages(client.list_runs, "runs", experiment_id=experiment_id, sort_by="created_at desc")
            if (run.display_name or "").startswith(prefix) and run.state in IN_FLIGHT_STATES]


def recurring_runs(client, experiment_id: str, prefix: str) -> dict[str, list]:
    """The experiment's recurring runs whose names start with PREFIX, by name (oldest first)."""
    found: dict[str, list] = {}
    for run in pages(client.list_recurring_runs, "recurring_runs", experiment_id=experiment_id):
        if (run.display_name or "").startswith(prefix):
            found.setdefault(run.display_name, []).append(run)
    return found


# --- the published training pipeline: what every retraining starts --------------------------------

def published_version(client, target: KfpTarget):
    """(pipeline id, version) of the target pipeline's published version: its newest one, which
    `pipelines.publish.publish` keeps the last one `flywheel schedule`/`submit` published."""
    pipeline_id = find_pipeline_id(client, target.pipeline, target.namespace)
    version = newest_version(client, pipeline_id) if pipeline_id else None
    if version is None:
        raise KfpError(f"KFP has no published version of {target.pipeline!r}: "
                       "publish it with `flywheel schedule` or `flywheel submit`")
    return pipeline_id, version


def start_published_run(target: KfpTarget | dict, request: dict, client=None, stamp: str | None = None) -> str:
    """Start the target's published version with the arguments compiled into it (the config it
    was published from) in the target's experiment; the run id. Its name says it was triggered,
    its description carries the request's source, dedup key and reasons."""
    target = target_of(target)
    host = target.host.rstrip("/")
    client = client or connect(target)
    stamp = stamp or f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    with quiet():
        with step(f"looking up the published version of {target.pipeline!r}", host):
            pipeline_id, version = published_version(client, target)
        with step(f"finding or creating experiment {target.experiment!r}", host):
            experiment = ensure_experiment(client, target.experiment, target.namespace)
        with step(f"starting a retraining run of {target.pipeline!r}", host):
            run = start_run(client, target, experiment_id=experiment.experiment_id, pipeline_id=pipeline_id,
                            version_id=version.pipeline_version_id, name=run_name(target.pipeline, request, stamp),
                            description=run_description(request), params=compiled_defaults(version))
    return run.run_id


def published_runs_in_flight(target: KfpTarget | dict, client=None) -> list[dict]:
    """The target pipeline's runs in the target experiment that have not ended (submitted,
    scheduled and triggered ones alike: they share the pipeline's name as a prefix)."""
    target = target_of(target)
    client = client or connect(target)
    with quiet(), step("listing retraining runs in flight", target.host.rstrip("/")):
        experiment = find_experiment(client, target.experiment, target.namespace)
        return runs_in_flight(client, experiment.experiment_id, target.pipeline) if experiment else []
