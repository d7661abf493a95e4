"""The listening front of `flywheel serve`: ports that stay put while the servers behind them are
replaced.

- REST (HTTP/1.1) is forwarded request by request: each request goes to whichever transformer is
  current when it arrives, so a keep-alive client's connection to the front outlives a swap. A
  TCP forwarder would pin the connection to the old pair, which closes it on SIGTERM (uvicorn's
  graceful shutdown closes idle keep-alive connections), and the client's next request on it
  would fail (http.client's RemoteDisconnected; httpx retries only connection failures, not a
  request on a connection the server closed: encode/httpx#2139). `drain` waits for the requests
  already sent to the old pair before it is stopped.
- gRPC (HTTP/2) is piped byte for byte, a connection to the pair it was accepted for; on SIGTERM
  KServe's gRPC server finishes the calls in flight and sends GOAWAY, upon which a gRPC client
  opens a new connection (to the front: the new pair) for its next call (grpc/grpc
  doc/PROTOCOL-HTTP2.md, GOAWAY).

- Shadow traffic (`mirror_to`): each REST inference request the current pair answered is also
  offered to a `pipelines.mirror.Mirror`, a bounded queue drained by its own tasks toward the
  shadow pair; the client's answer never waits for it (a request without `x-request-id` gets one,
  so both versions' payload events can be matched; the copy's id ends in `-shadow`).

It runs its own asyncio loop in a thread, so the caller's thread can download models and start
servers while it forwards."""
from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from collections import Counter

import h11

from pipelines.mirror import MAX_BODY_BYTES, Mirror, mirrored

CHUNK = 1 << 16
REUSE_SECONDS = 1.0  # an upstream connection idle longer is not reused: uvicorn closes it after 5 s


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):  # the other side reset or is closing: this connection is over
        pass


async def _next_event(connection: h11.Connection, reader: asyncio.StreamReader):
    """The next h11 event of `connection`, reading from `reader` as needed (EOF: ConnectionClosed)."""
    while (event := connection.next_event()) is h11.NEED_DATA:
        connection.receive_data(await reader.read(CHUNK))
    return event


class _Upstream:
    """One HTTP/1.1 connection from the front to a transformer's REST port."""

    def __init__(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.port, self.reader, self.writer = port, reader, writer
        self.connection, self.idle_since = h11.Connection(h11.CLIENT), time.monotonic()

    def reusable(self, port: int) -> bool:
        return (self.port == port and self.connection.our_state is h11.IDLE and not self.reader.at_eof()
                and time.monotonic() - self.idle_since < REUSE_SECONDS)

    async def send(self, event) -> None:
        self.writer.write(self.connection.send(event))
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


def _with_request_id(request: h11.Request) -> tuple[h11.Request, str]:
    """`request` carrying an `x-request-id` (a new one when the client sent none), and that id."""
    for name, value in request.headers:
        if name == b"x-request-id" and value:
            return request, value.decode("latin-1")
    request_id = uuid.uuid4().hex
    headers = [*request.headers, (b"x-request-id", request_id.encode())]
    return h11.Request(method=request.method, target=request.target, headers=headers), request_id


def _error_response(status: int, message: str) -> tuple[h11.Response, bytes]:
    """The servers' error shape ({"error": {status, field, message}}), for what the front itself answers."""
    body = json.dumps({"error": {"status": status, "field": None, "message": message}}).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close")]
    return h11.Response(status_code=status, headers=headers), body


class Front:
    """Listeners on `host`:`ports` (name -> port) forwarding to 127.0.0.1:`targets[name]`; the
    names in `http` request by request (HTTP/1.1), the others as TCP."""

    def __init__(self, host: str, ports: dict[str, int], http: tuple[str, ...] = ()):
        self.host, self.ports, self.http = host, dict(ports), set(http)
        self.targets: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="serve-front", daemon=True)
        self._servers: list[asyncio.AbstractServer] = []
        # asyncio drops its own reference to a connection's task when the client's side closes
        # (StreamReaderProtocol.connection_lost), and the upstream stream is only weakly held:
        # without this set, a task still piping the server's answer would be garbage-collected.
        self._connections: set[asyncio.Task] = set()
        self._in_flight: Counter[int] = Counter()  # HTTP requests sent to each target port, not yet answered
        self.mirror: Mirror | None = None  # where copies of inference requests go (shadow traffic)

    def start(self, targets: dict[str, int]) -> Front:
        """Listen on every port (OSError when one is taken) and forward to `targets`."""
        self.point(targets)
        self._thread.start()
        try:
            for name, port in self.ports.items():
                opening = asyncio.start_server(functools.partial(self._connect, name), self.host, port)
                self._servers.append(asyncio.run_coroutine_threadsafe(opening, self._loop).result(10))
        except BaseException:
            self.stop()
            raise
        return self

    def point(self, targets: dict[str, int]) -> None:
        """New connections and HTTP requests go to `targets` from now on (one reference swap: the
        loop reads it per connection, and per request on HTTP ports)."""
        self.targets = {name: targets[name] for name in self.ports}

    def drain(self, targets: dict[str, int], timeout: float) -> bool:
        """Wait until no HTTP request sent to a port of `targets` (a pair the front no longer
        points at) is unanswered; False when some still were after `timeout` seconds."""
        ports = {targets[name] for name in self.http if name in targets}

        async def drained() -> bool:  # on the loop: no request can pick a target between checks
            deadline = time.monotonic() + timeout
            while any(self._in_flight[port] for port in ports):
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.01)
            return True

        return asyncio.run_coroutine_threadsafe(drained(), self._loop).result(timeout + 5)

    def mirror_to(self, port: int | None, **options) -> dict[str, int]:
        """Copy REST inference requests to the transformer on `port` from now on (None: stop
        copying); `options` go to `Mirror`. Returns the counts of the mirror it replaced ({} if none)."""

        async def swap() -> dict[str, int]:  # on the loop: a request sees one mirror or the other
            old, self.mirror = self.mirror, (await Mirror(port, **options).start() if port else None)
            if old is None:
                return {}
            await old.stop()
            return old.stats()

        return asyncio.run_coroutine_threadsafe(swap(), self._loop).result(10)

    def mirror_stats(self) -> dict[str, int]:
        """The current mirror's counts (offered, sent, failed, timeouts, dropped, skipped); {} without one."""
        mirror = self.mirror
        return mirror.stats() if mirror is not None else {}

    async def _connect(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            if name in self.http:
                await self._serve_http(name, reader, writer)
            else:
                await self._forward(name, reader, writer)
        except (OSError, RuntimeError, h11.ProtocolError):  # either side reset or broke the protocol
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _forward(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.targets[name])
        except OSError:
            return
        # The client's half ends when it stops sending; the connection ends when the server's does.
        sending = asyncio.ensure_future(_pipe(reader, upstream_writer))
        await _pipe(upstream_reader, writer)
        sending.cancel()
        upstream_writer.close()

    async def _serve_http(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests on one client connection, each to the target current when it arrives."""
        client, upstream = h11.Connection(h11.SERVER), None
        try:
            while isinstance(request := await _next_event(client, reader), h11.Request):
                port = self.targets[name]  # read and counted in one step of the loop (see drain)
                mirror = self.mirror if self.mirror is not None and mirrored(request.method, request.target) else None
                if mirror is not None:
                    request, request_id = _with_request_id(request)
                body: list[bytes] | None = [] if mirror is not None else None
                self._in_flight[port] += 1
                try:
                    upstream = await self._exchange(client, request, reader, writer, port, upstream, body)
                finally:
                    self._in_flight[port] -= 1
                answered = (h11.DONE, h11.MUST_CLOSE)  # MUST_CLOSE: answered whole on a `Connection: close` request
                if mirror is not None and client.our_state in answered and client.their_state in answered:
                    whole = b"".join(body)
                    mirror.offer(request.target, request.headers, whole if len(whole) <= MAX_BODY_BYTES else None,
                                 request_id)
                if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                    break  # one side asked to close, or the server answered before reading the whole body
                client.start_next_cycle()
        except h11.RemoteProtocolError as err:  # not HTTP/1.1: answer as a server would, then close
            if client.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                response, body = _error_response(err.error_status_hint, f"malformed HTTP request: {err}")
                writer.write(client.send(response) + client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage()))
        finally:
            if upstream is not None:
                upstream.close()

    async def _exchange(self, client: h11.Connection, request: h11.Request, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, port: int, upstream: _Upstream | None,
                        body: list[bytes] | None = None) -> _Upstream | None:
        """One request to the transformer on `port` and its response back; the upstream connection
        to reuse for the next request, or None. The request's body chunks are appended to `body`."""
        if upstream is None or not upstream.reusable(port):
            if upstream is not None:
                upstream.close()
            try:
                upstream = _Upstream(port, *await asyncio.open_connection("127.0.0.1", port))
            except OSError:
                response, body = _error_response(503, "the model server behind this port is not running")
                writer.write(client.send(response) + client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage()))
                return None
        headers = request.headers if any(k == b"host" for k, _ in request.headers) else \
            [*request.headers, (b"host", f"127.0.0.1:{port}".encode())]  # HTTP/1.0 needs none; h11 sends 1.1
        await upstream.send(h11.Request(method=request.method, target=request.target, headers=headers))
        sending = asyncio.ensure_future(self._send_body(client, reader, upstream, body))
        try:
            while not isinstance(event := await _next_event(upstream.connection, upstream.reader), h11.EndOfMessage):
                if isinstance(event, h11.ConnectionClosed):
                    raise h11.LocalProtocolError("the model server closed the connection mid-answer")
                writer.write(client.send(event))  # a (1xx) response, body data: h11 frames it for the client
                await writer.drain()
            writer.write(client.send(h11.EndOfMessage(headers=event.headers)))
            await writer.drain()
        finally:
            if not sending.done():
                sending.cancel()
            elif not sending.cancelled() and sending.exception() is not None:
                upstream.close()
                raise sending.exception()
        if upstream.connection.our_state is not h11.DONE or upstream.connection.their_state is not h11.DONE:
            upstream.close()
            return None
        upstream.connection.start_next_cycle()
        upstream.idle_since = time.monotonic()
        return upstream

    @staticmethod
    async def _send_body(client: h11.Connection, reader: asyncio.StreamReader, upstream: _Upstream,
                         body: list[bytes] | None = None) -> None:
        """The request's body to the server, while its answer comes back (it may answer early: 413)."""
        try:
            while isinstance(event := await _next_event(client, reader), h11.Data):
                if body is not None:
                    body.append(bytes(event.data))
                await upstream.send(event)
            if not isinstance(event, h11.EndOfMessage):  # the client left mid-body
                raise h11.RemoteProtocolError("the client closed the connection mid-request")
            await upstream.send(event)
        except BaseException:
            upstream.close()  # the server's answer cannot complete: end the exchange
            raise

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            if self.mirror is not None:
                await self.mirror.stop()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
