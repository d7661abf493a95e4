"""Talking to a Kubeflow Pipelines API: an authenticated kfp.Client, one-line errors, lookups.

Credentials come from the environment (see `make_client`) and never appear in messages or logs.
Every failure of a step becomes a `SubmitError` with a one-line reason.
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
from collections.abc import Iterator
from pathlib import Path

from components.kfp_api import (  # noqa: F401 (re-exported: the credential variables' names)
    BEARER_TOKEN_ENV,
    BEARER_TOKEN_FILE_ENV,
    COOKIE_ENV,
    SA_TOKEN_PATH,
    SA_TOKEN_PATH_ENV,
    CredentialsError,
    credentials,
    name_filter,
)
from pipelines.config import Settings
from storage.endpoints import Unreachable, probe


class SubmitError(RuntimeError):
    """Submitting or scheduling failed; the message is one line that says why."""


class KfpUnreachable(SubmitError, Unreachable):
    """The KFP API did not answer a connection: `cannot reach KFP at HOST (WHAT): REASON`.
    A SubmitError (callers that catch those still do), and an `Unreachable`, so that a dry run
    can tell "no server to compare with" from a server that refused the request."""

    __init__ = Unreachable.__init__  # SubmitError's MRO would otherwise pick RuntimeError's
    __str__ = Unreachable.__str__


# --- naming -----------------------------------------------------------------------------------

def kfp_pipeline_name(settings: Settings, pipeline: str) -> str:
    return f"flywheel-{settings.env}-{pipeline}"


def content_hash(package: bytes) -> str:
    return hashlib.sha256(package).hexdigest()[:10]


def default_version_name(package: bytes, now: dt.datetime | None = None) -> str:
    """UTC time sorts versions; the content hash says which ones are the same pipeline."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%d-%H%M%S}-{content_hash(package)}"


# --- the client -------------------------------------------------------------------------------

def _auth() -> tuple[str, dict]:
    """(description, kfp.Client kwargs) from the first credential source that is set
    (`components.kfp_api.credentials`, shared with the pipeline tasks that start runs)."""
    try:
        return credentials()
    except CredentialsError as err:
        raise SubmitError(str(err)) from None


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
    # kfp_server_api's urllib3 pool has no connect timeout and ignores $HTTPS_PROXY (kfp.Client
    # takes `proxy=` instead), so probe the host itself, directly.
    try:
        probe("KFP", host, proxy=None)
    except Unreachable as err:
        raise KfpUnreachable("KFP", host, err.reason) from None  # what for: the caller's `doing`
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
            raise KfpUnreachable("KFP", host, _unreachable_reason(err), what) from err
        status = f"HTTP {err.status} {err.reason or ''}".strip()
        if err.status in (401, 403):
            raise SubmitError(f"{what}: KFP at {host} refused the request ({status}: {_api_message(err)}); "
                              f"{_auth_hint()}") from err
        raise SubmitError(f"{what}: KFP at {host} answered {status}: {_api_message(err)}") from err
    except (urllib3.exceptions.HTTPError, ConnectionError) as err:
        raise KfpUnreachable("KFP", host, _unreachable_reason(err), what) from err
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
    return name_filter(name)


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
