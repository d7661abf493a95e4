"""The core of the fake KFP API server: HTTP on a loopback port, the record of every request, the
test controls (credentials required, injected failures), routing, and the answers in the real
error shapes: `google.rpc.Status` ({"code", "message", "details"}) from the gRPC-gateway endpoints,
{"error_message", "error_details"} from the upload endpoints.

The resource fakes (kfp_pipelines.py, kfp_runs.py, kfp_recurring_runs.py) are mixins of
`FakeKfpCore`: each keeps its own objects and adds its routes through `routes()`;
kfp_api_server.py puts them together.
"""
from __future__ import annotations

import itertools
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

from kfp_server_api import models

from tests.fakes.kfp_contract import API, GRPC, ApiError, filter_predicates, matches, parse_model, to_json


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict
    body: object = None
    form: dict = field(default_factory=dict)
    status: int = 0


class Route(NamedTuple):
    """Requests whose path under /apis/v2beta1 fully matches `pattern`, with method `method`, go to
    `handle(rec, match, raw_body, content_type) -> (status, payload)`."""

    pattern: str
    method: str
    handle: Callable


class FakeKfpCore:
    """State and behaviour every resource shares; `start()` serves it on 127.0.0.1 at a free port."""

    def __init__(self, multi_user: bool = False):
        self.multi_user = multi_user
        self.bearer_token: str | None = None  # when set, requests must carry it
        self.cookie: str | None = None  # when set, requests must carry this cookie (name=value)
        self.requests: list[Recorded] = []
        self._failures: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._ids = itertools.count(1)

    # -- test controls
    def fail_next(self, status: int, message: str = "injected failure", path_contains: str = "", times: int = 1):
        self._failures += [(status, message, path_contains)] * times

    def find(self, method: str, path_suffix: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        server = self

        class Handler(_Handler):
            fake = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    # -- dispatch
    def handle(self, rec: Recorded, raw_body: bytes, content_type: str) -> tuple[int, dict]:
        with self._lock:
            for i, (status, message, part) in enumerate(self._failures):
                if part in rec.path:
                    del self._failures[i]
                    raise ApiError(status, message)
            self._authenticate(rec)
            return self._route(rec, raw_body, content_type)

    def routes(self) -> list[Route]:
        """Each resource fake adds its routes to these (and calls super())."""
        return [Route(r"/healthz", "GET", self._healthz)]

    def _authenticate(self, rec: Recorded) -> None:
        if self.bearer_token is not None and rec.headers.get("authorization") != f"Bearer {self.bearer_token}":
            raise ApiError(401, "Unauthenticated: request has no valid bearer token")
        if self.cookie is not None:
            cookies = [c.strip() for c in rec.headers.get("cookie", "").split(";")]
            if self.cookie not in cookies:
                raise ApiError(401, "Unauthenticated: no valid session cookie")

    def _route(self, rec: Recorded, raw: bytes, content_type: str) -> tuple[int, dict]:
        if not rec.path.startswith(API):
            raise ApiError(404, "Not Found")
        p = rec.path[len(API):]
        for route in self.routes():
            if route.method == rec.method and (match := re.fullmatch(route.pattern, p)):
                return route.handle(rec, match, raw, content_type)
        raise ApiError(404, f"Not Found: {rec.method} {API}{p} is not served by the fake")

    def _healthz(self, rec: Recorded, match, raw: bytes, content_type: str) -> tuple[int, dict]:
        return 200, to_json(models.V2beta1GetHealthzResponse(multi_user=self.multi_user, pipeline_store="database"))

    # -- helpers
    def _json(self, rec: Recorded, raw: bytes, type_name: str):
        try:
            data = json.loads(raw or b"null")
        except ValueError as err:
            raise ApiError(400, f"invalid JSON body: {err}") from None
        rec.body = data
        if not isinstance(data, dict):
            raise ApiError(400, f"body must be a JSON object ({type_name})")
        return parse_model(data, type_name)

    @staticmethod
    def _get(table: dict, key: str, kind: str):
        if key not in table:
            raise ApiError(404, f"{kind} {key} not found")
        return table[key]

    def _list(self, items: list, q: dict, attr: str, response_class) -> tuple[int, dict]:
        predicates = filter_predicates(q.get("filter"))
        items = [i for i in items if matches(i, predicates)]
        if q.get("sort_by"):  # "created_at desc", "display_name": the backend's sort (stable here)
            key, _, order = q["sort_by"].partition(" ")
            items = sorted(items, key=lambda i: (getattr(i, key, None) is None, getattr(i, key, None) or 0),
                           reverse=order.strip().lower() == "desc")
        size = int(q.get("page_size") or 10)
        start = int(q.get("page_token") or 0)
        page = items[start:start + size]
        token = str(start + size) if start + size < len(items) else None
        return 200, to_json(response_class(**{attr: page or None, "total_size": len(items), "next_page_token": token}))

    def _new_id(self) -> str:
        return str(uuid.UUID(int=next(self._ids)))


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKfpCore

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        rec = Recorded(method, parts.path, query, {k.lower(): v for k, v in self.headers.items()})
        self.fake.requests.append(rec)
        try:
            status, payload = self.fake.handle(rec, raw, self.headers.get("Content-Type", ""))
        except ApiError as err:
            status = err.status
            if "/pipelines/upload" in parts.path:  # the upload handlers write their own error shape
                payload = {"error_message": err.message, "error_details": err.message}
            else:
                payload = {"code": GRPC.get(err.status, 2), "message": err.message, "details": []}
        rec.status = status
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_DELETE(self):
        self._serve("DELETE")
