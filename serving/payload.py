"""Payload events: the request and the response of sampled REST inference calls, sent as the KServe
logger agent sends them, so the same monitoring sink reads both.

The agent's format (kserve pkg/logger): CloudEvents 1.0 in binary mode, `ce-type`
`org.kubeflow.serving.inference.request` / `.response`, `ce-id` the request id, the extensions
`ce-inferenceservicename`, `ce-namespace`, `ce-component`, `ce-endpoint`, and the raw body as the
data; the response is logged only for a 200, as the agent does. Locally there is no agent, so the
server clients call (the one-process server or the transformer) sends them itself: calls are
sampled (`sample_rate`), events go into a bounded queue a background task drains, and a full
queue drops and counts the event. Logging never blocks or fails a request. gRPC calls are not
logged (the agent logs HTTP only).
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass
from datetime import UTC, datetime

from serving.middleware import BODY_KEY, REQUEST_ID, header
from serving.server_metrics import INFERENCE_SUFFIXES, PAYLOAD_EVENTS, PAYLOAD_QUEUE
from specs.evaluation import shadow_id

log = logging.getLogger("flywheel.serving")
REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"


@dataclass(frozen=True)
class Event:
    """One CloudEvent: its type, id (the request id), source and raw JSON body."""

    type: str
    id: str
    source: str
    body: bytes


class PayloadLogger:
    """Sends events to `url` from a bounded queue, in the background.

    Args:
        url: The sink (the KServe `logger.url` equivalent).
        mode: "all", "request" or "response".
        sample_rate: Fraction of calls logged.
        model_name: `ce-inferenceservicename`.
        component: `ce-component`.
        queue_size: Events held before new ones are dropped.
        timeout: Seconds per send.
        shadow: This server is a challenger shadowing the champion: its events' ids get the shadow
            suffix. A mesh mirror (Istio/Envoy) copies the request with the client's x-request-id,
            and the sink pairs request and response by ce-id: unsuffixed, the challenger's halves
            would pair with the champion's.
    """

    def __init__(self, url: str, mode: str = "all", sample_rate: float = 1.0, model_name: str = "",
                 component: str = "transformer", queue_size: int = 1000, timeout: float = 5.0,
                 shadow: bool = False):
        self.url, self.mode, self.sample_rate, self.shadow = url, mode, float(sample_rate), shadow
        self.model_name, self.component, self.timeout = model_name, component, timeout
        self.namespace = os.environ.get("POD_NAMESPACE", "")
        self.queue_size = queue_size
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def sampled(self) -> bool:
        return self.sample_rate >= 1.0 or random.random() < self.sample_rate

    def call(self, request_id: str, source: str, request: bytes, status: int, response: bytes) -> None:
        """Queue the events of one finished call, as the mode says."""
        if self.shadow:
            request_id = shadow_id(request_id)
        if self.mode in ("all", "request"):
            self.put(Event(REQUEST_TYPE, request_id, source, request))
        if self.mode in ("all", "response") and status == 200:
            self.put(Event(RESPONSE_TYPE, request_id, source, response))

    def put(self, event: Event) -> None:
        """Queue an event without waiting; drop and count it when the queue is full."""
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=self.queue_size)
            self._task = asyncio.get_running_loop().create_task(self._drain())
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            PAYLOAD_EVENTS.labels(outcome="dropped").inc()
        PAYLOAD_QUEUE.set(self._queue.qsize())

    def headers(self, event: Event) -> dict:
        """The binary-mode CloudEvent headers of `event`."""
        return {
            "ce-specversion": "1.0", "ce-type": event.type, "ce-id": event.id, "ce-source": event.source,
            "ce-time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "ce-inferenceservicename": self.model_name, "ce-namespace": self.namespace,
            "ce-component": self.component, "ce-endpoint": "default", "content-type": "application/json",
        }

    async def _drain(self) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=self.timeout) as client:
            while True:
                event = await self._queue.get()
                PAYLOAD_QUEUE.set(self._queue.qsize())
                await self._send(client, event)

    async def _send(self, client, event: Event) -> None:
        try:
            answer = await client.post(self.url, content=event.body, headers=self.headers(event))
            outcome = "sent" if answer.status_code < 400 else "failed"
        except Exception as err:
            log.debug("payload event %s not sent: %s", event.id, err)
            outcome = "failed"
        PAYLOAD_EVENTS.labels(outcome=outcome).inc()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class PayloadMiddleware:
    """Pure ASGI middleware that hands sampled REST inference calls to a `PayloadLogger`. It sits
    inside the body limit (which buffers the raw request in the scope) and the request id.

    Args:
        app: The ASGI app it wraps.
        logger: Where the calls go.
    """

    def __init__(self, app, logger: PayloadLogger):
        self.app, self.logger = app, logger

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.endswith(INFERENCE_SUFFIXES) or not self.logger.sampled():
            return await self.app(scope, receive, send)
        status, chunks = [500], []

        async def capture(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, capture)
        request_id = (header(scope, REQUEST_ID.encode()) or b"").decode()
        host = (header(scope, b"host") or b"localhost").decode()
        try:
            self.logger.call(request_id, f"http://{host}{path}", scope.get(BODY_KEY, b""), status[0], b"".join(chunks))
        except Exception as err:
            log.warning("payload logging failed: %s", err)
