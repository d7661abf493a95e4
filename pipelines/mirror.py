"""Shadow traffic for `flywheel serve`'s front: a fire-and-forget copy of each REST inference
request to a shadow transformer, never on the client's path.

The front hands each inference request it has answered (method, target, headers, body) to
`Mirror.offer`, which only puts it on a bounded asyncio queue (`put_nowait`, on the front's own
loop) and returns: a full queue drops the copy and counts it. A few worker tasks send the copies
to the shadow's REST port with a short timeout; a slow, failing or dead shadow fills the queue,
times out or refuses connections, and every such copy is counted (`timeouts`, `failed`,
`dropped`), never retried, never awaited by a client. Answers are read and thrown away.

Each copy carries the client's request id with `-shadow` appended (`monitoring.shadow`): the
payload sink pairs events by request id, and the shadow's rows must not pair with the champion's.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass

INFERENCE_ENDINGS = (":predict", "/infer")
# Headers the copy does not carry over: hop-by-hop, and those httpx sets itself.
SKIPPED = {b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive", b"upgrade",
           b"expect", b"x-request-id"}
MAX_BODY_BYTES = 4 << 20  # a larger request is answered but not mirrored (counted as `skipped`)


def mirrored(method: bytes, target: bytes) -> bool:
    """Whether a request is an inference call the shadow should see (POST .../:predict or .../infer)."""
    return method == b"POST" and target.split(b"?", 1)[0].decode("latin-1").endswith(INFERENCE_ENDINGS)


@dataclass(frozen=True)
class Copy:
    target: str
    headers: dict[str, str]
    body: bytes


class Mirror:
    """Copies of requests to 127.0.0.1:`port` from a queue of `queue_size`, `workers` at a time,
    each send given `timeout` seconds. Runs on the loop it is started on (the front's)."""

    def __init__(self, port: int, queue_size: int = 256, workers: int = 4, timeout: float = 2.0):
        self.port, self.queue_size, self.workers, self.timeout = port, queue_size, workers, timeout
        from monitoring.shadow import shadow_request_id  # here: the front's import stays light

        self._rename = shadow_request_id
        self.counts: Counter[str] = Counter()  # offered, sent, failed, timeouts, dropped, skipped
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> Mirror:
        import httpx

        self._queue = asyncio.Queue(maxsize=self.queue_size)
        limits = httpx.Limits(max_connections=self.workers, max_keepalive_connections=self.workers)
        self._client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=self.timeout,
                                         limits=limits)
        self._tasks = [asyncio.ensure_future(self._work()) for _ in range(self.workers)]
        return self

    def offer(self, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None, request_id: str) -> None:
        """Queue a copy without waiting (on the loop); drop and count it when the queue is full."""
        self.counts["offered"] += 1
        if body is None or self._queue is None:
            self.counts["skipped"] += 1
            return
        kept = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k.lower() not in SKIPPED}
        kept["x-request-id"] = self._rename(request_id)
        try:
            self._queue.put_nowait(Copy(target.decode("latin-1"), kept, body))
        except asyncio.QueueFull:
            self.counts["dropped"] += 1

    async def _work(self) -> None:
        import httpx

        while True:
            copy = await self._queue.get()
            try:
                answer = await self._client.post(copy.target, content=copy.body, headers=copy.headers)
                self.counts["sent" if answer.status_code < 500 else "failed"] += 1
            except asyncio.CancelledError:  # stopped mid-send: unanswered (it may have arrived)
                self.counts["dropped"] += 1
                raise
            except httpx.TimeoutException:
                self.counts["timeouts"] += 1
            except (httpx.HTTPError, OSError):
                self.counts["failed"] += 1

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue is not None:
            self.counts["dropped"] += self._queue.qsize()  # never sent
        await self._client.aclose()

    def stats(self) -> dict[str, int]:
        return {key: int(self.counts[key]) for key in ("offered", "sent", "failed", "timeouts", "dropped", "skipped")}
