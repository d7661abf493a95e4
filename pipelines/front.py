"""The listening front of `flywheel serve`: ports that stay put while the servers behind them are
replaced. Each new connection is piped byte for byte (TCP: HTTP/1.1 REST and gRPC's HTTP/2
alike, `x-request-id` and all) to whichever transformer is current; a connection already open
finishes on the servers it started on, which drain on SIGTERM before they exit (uvicorn's
graceful shutdown), so a swap loses no request.

It runs its own asyncio loop in a thread, so the caller's thread can download models and start
servers while it forwards."""
from __future__ import annotations

import asyncio
import functools
import threading

CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):  # the other side reset or is closing: this connection is over
        pass


class Front:
    """Listeners on `host`:`ports` (name -> port) forwarding to 127.0.0.1:`targets[name]`."""

    def __init__(self, host: str, ports: dict[str, int]):
        self.host, self.ports = host, dict(ports)
        self.targets: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="serve-front", daemon=True)
        self._servers: list[asyncio.AbstractServer] = []
        # asyncio drops its own reference to a connection's task when the client's side closes
        # (StreamReaderProtocol.connection_lost), and the upstream stream is only weakly held:
        # without this set, a task still piping the server's answer would be garbage-collected.
        self._connections: set[asyncio.Task] = set()

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
        """New connections go to `targets` from now on (one reference swap: the loop reads it per connection)."""
        self.targets = {name: targets[name] for name in self.ports}

    async def _connect(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._forward(name, reader, writer)
        finally:
            self._connections.discard(task)

    async def _forward(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.targets[name])
        except OSError:
            writer.close()
            return
        # The client's half ends when it stops sending; the connection ends when the server's does.
        sending = asyncio.ensure_future(_pipe(reader, upstream_writer))
        await _pipe(upstream_reader, writer)
        sending.cancel()
        for end in (writer, upstream_writer):
            end.close()

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
