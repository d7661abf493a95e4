"""Reaching the servers Flywheel talks to (MLflow, KFP, the Kubernetes API) or saying at once that
it cannot: one exception, `Unreachable`, whose message is the one line a user reads, and a fast
TCP probe that the places creating each client run before the first request.

Why a probe: the clients' own retry policies are built for servers that are there but busy.
MLflow retries a refused or unresolvable connection 7 times with exponential backoff (about 4
minutes: `MLFLOW_HTTP_REQUEST_MAX_RETRIES`, mlflow/environment_variables.py) and the Kubernetes
client has no connect timeout at all, so a command against a server that is not there stays
silent for minutes. A TCP connect (name resolution included) answers that question in
milliseconds, or in `PROBE_TIMEOUT_S` for an address that drops packets, and leaves the clients'
retries to the failures they are meant for.

Who fails fast: a person waiting at the `flywheel` CLI, which sets `FLYWHEEL_FAIL_FAST=1`. A
pipeline task or a serving pod leaves it unset and keeps the clients' retries: there a registry
that restarts for a minute is worth waiting for, and nobody reads a prompt.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

FAIL_FAST_ENV = "FLYWHEEL_FAIL_FAST"
# The whole probe (resolve + connect), overridable for slow links; a CLI command has to answer within
# 15 s including its imports, so this stays well below that.
PROBE_TIMEOUT_S = float(os.environ.get("FLYWHEEL_PROBE_TIMEOUT_S", "4"))
DEFAULT_PORTS = {"http": 80, "https": 443}


class Unreachable(RuntimeError):
    """SERVICE at URL did not answer a connection; `str()` is the one line to print:
    `cannot reach MLflow at http://host:5000 (reading the champion): <reason>`. The URL never
    carries credentials (`redact`). A RuntimeError, as the CLI's other one-line failures are."""

    def __init__(self, service: str, url: str, reason: str, doing: str | None = None):
        super().__init__(f"cannot reach {service} at {redact(url)}")
        self.service, self.url, self.reason, self.doing = service, redact(url), one_line(reason), doing

    def __str__(self) -> str:
        doing = f" ({self.doing})" if self.doing else ""
        return f"cannot reach {self.service} at {self.url}{doing}: {self.reason}"


def one_line(text: object, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def redact(url: str) -> str:
    """`url` without userinfo, query or fragment (where tokens hide): scheme://host[:port]/path."""
    parts = urlsplit(url)
    if not parts.netloc:
        return url.split("?", 1)[0]
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: keep what was written after the last ':'
        port = parts.netloc.rsplit(":", 1)[-1]
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@contextlib.contextmanager
def doing(what: str) -> Iterator[None]:
    """Name what the block does in any `Unreachable` raised inside it that does not say yet
    (the innermost, most precise description wins)."""
    try:
        yield
    except Unreachable as err:
        if err.doing is None:
            err.doing = what
        raise


def _proxy_for(url: str) -> str | None:
    """The proxy the HTTP clients (requests, urllib) would connect to for `url`, from the
    environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), or None when they go direct."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def _connect(host: str, port: int, timeout: float, outcome: list) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        outcome.append(None)
    except OSError as err:
        outcome.append(err)


def probe(service: str, url: str, *, timeout: float | None = None, proxy: str | None = "env") -> None:
    """Raise `Unreachable` unless a TCP connection to `url`'s host and port (or to the proxy the
    client would use: `proxy="env"` reads the environment like requests does, None goes direct)
    opens within `timeout` seconds. Name resolution runs inside the same deadline: getaddrinfo
    has no timeout of its own, so the attempt runs in a daemon thread that is abandoned at the
    deadline. URLs that are not http(s) (sqlite:, file paths) are not probed, and nothing is
    unless $FLYWHEEL_FAIL_FAST is 1 (see the module's docstring)."""
    parts = urlsplit(url)
    if os.environ.get(FAIL_FAST_ENV) != "1" or parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    via = _proxy_for(url) if proxy == "env" else proxy
    target = urlsplit(via) if via else parts
    try:
        port = target.port or DEFAULT_PORTS.get(target.scheme, 80)
    except ValueError as err:
        raise Unreachable(service, url, f"bad port: {err}") from None
    outcome: list = []
    worker = threading.Thread(target=_connect, args=(target.hostname, port, timeout, outcome), daemon=True,
                              name=f"probe-{service}")
    worker.start()
    worker.join(timeout + 0.5)
    through = f" (through proxy {redact(via)})" if via else ""
    if not outcome:
        raise Unreachable(service, url, f"no answer within {timeout:g} s{through}")
    if outcome[0] is not None:
        raise Unreachable(service, url, f"{_describe(outcome[0])}{through}")


def _describe(err: OSError) -> str:
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the host name ({err.strerror or err})"
    if isinstance(err, TimeoutError):
        return "connection timed out"
    return err.strerror or str(err) or type(err).__name__
