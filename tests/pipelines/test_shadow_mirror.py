"""The front's shadow mirror on real servers on loopback: clients only ever get the champion's
answer, and a dead or slow shadow changes neither their errors nor their latency."""
import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pipelines.front import Front


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """An HTTP/1.1 server on loopback answering POSTs with `answer(body, headers)` after `delay` s."""

    def __init__(self, name: str, delay: float = 0.0):
        self.name, self.delay, self.port = name, delay, _free_port()
        self.seen: list[dict] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.seen.append({"headers": headers, "body": body})
                if self.delay:
                    await asyncio.sleep(self.delay)
                out = json.dumps({"model": self.name, "echo": json.loads(body or b"{}")}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(out)).encode() + b"\r\n\r\n" + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()  # killed: its connections reset

    def start(self) -> "Server":
        self._thread.start()
        opening = asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._server = asyncio.run_coroutine_threadsafe(opening, self._loop).result(5)
        return self

    def kill(self) -> None:
        async def close():
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)


@pytest.fixture
def pair():
    champion = Server("champion").start()
    front = Front("127.0.0.1", {"transformer_http": _free_port()}, http=("transformer_http",))
    front.start({"transformer_http": champion.port})
    yield champion, front
    front.stop()
    champion.kill()


def _load(url: str, requests: int, clients: int = 8, during=None) -> tuple[list, list[float]]:
    """`requests` POSTs from `clients` keep-alive clients; (answers or exceptions, latencies)."""
    answers, latencies = [None] * requests, [0.0] * requests

    def one(client: httpx.Client, i: int):
        started = time.perf_counter()
        try:
            answer = client.post(f"{url}/v1/models/m:predict", json={"instances": [{"i": i}]})
            answers[i] = (answer.status_code, answer.json())
        except Exception as err:  # counted as a client error below
            answers[i] = err
        latencies[i] = time.perf_counter() - started

    def worker(k: int):
        with httpx.Client(timeout=10) as client:
            for i in range(k, requests, clients):
                one(client, i)
                if during is not None and i == requests // 2:
                    during()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return answers, latencies


def _p99(latencies: list[float]) -> float:
    return sorted(latencies)[int(len(latencies) * 0.99) - 1]


@pytest.mark.slow
def test_a_shadow_killed_under_load_costs_the_clients_nothing(pair):
    champion, front = pair
    shadow = Server("shadow").start()
    front.mirror_to(shadow.port)
    url = f"http://127.0.0.1:{front.ports['transformer_http']}"
    # When the shadow is killed halfway through the load
    answers, _ = _load(url, 400, during=shadow.kill)
    # Then no client saw an error, and every answer is the champion's, for its own request
    errors = [a for a in answers if not isinstance(a, tuple) or a[0] != 200]
    assert errors == []
    assert all(a[1]["model"] == "champion" and a[1]["echo"] == {"instances": [{"i": i}]} for i, a in enumerate(answers))
    # And the shadow saw a copy of (some of) them, with the request id marked as a shadow's
    time.sleep(0.5)
    counts = front.mirror_to(None)
    assert counts["offered"] == 400 and 0 < counts["sent"] < 400
    assert counts["sent"] + counts["failed"] + counts["timeouts"] + counts["dropped"] == 400
    ids = [seen["headers"]["x-request-id"] for seen in shadow.seen]
    assert ids and all(i.endswith("-shadow") for i in ids)
    champion_ids = {seen["headers"]["x-request-id"] for seen in champion.seen}
    assert {i.removesuffix("-shadow") for i in ids} <= champion_ids


@pytest.mark.slow
def test_a_slow_shadow_drops_copies_and_does_not_move_the_clients_p99(pair):
    champion, front = pair
    url = f"http://127.0.0.1:{front.ports['transformer_http']}"
    _, alone = _load(url, 300)
    slow = Server("slow shadow", delay=2.0).start()
    try:
        front.mirror_to(slow.port, queue_size=16, workers=2, timeout=5.0)
        started = time.perf_counter()
        answers, shadowed = _load(url, 300)
        took = time.perf_counter() - started
        counts = front.mirror_stats()
    finally:
        front.mirror_to(None)
        slow.kill()
    assert all(isinstance(a, tuple) and a[0] == 200 and a[1]["model"] == "champion" for a in answers)
    # A shadow that takes 2 s per request is never waited for: the copies beyond its queue are dropped
    assert took < 2.0, f"300 requests took {took:.2f} s behind a 2 s shadow"
    assert counts["dropped"] >= 300 - 16 - 2 * 2
    assert _p99(shadowed) < max(5 * _p99(alone), _p99(alone) + 0.05), (_p99(alone), _p99(shadowed))


def test_only_inference_posts_are_mirrored_and_a_missing_request_id_is_added(pair):
    champion, front = pair
    shadow = Server("shadow").start()
    front.mirror_to(shadow.port, workers=1)  # one sender: the shadow sees the copies in the order they came
    url = f"http://127.0.0.1:{front.ports['transformer_http']}"
    with httpx.Client() as client:
        answer = client.post(f"{url}/v1/models/m:predict", json={"instances": [{"a": 1}]})
        client.post(f"{url}/v2/health/ready", json={})
        client.post(f"{url}/v2/models/m/infer", json={"inputs": []},
                    headers={"x-request-id": "mine", "connection": "close"})  # as urllib sends them
    # Wait for what is asserted: a copy counts as sent once the shadow has answered it, which is after
    # the shadow has seen it (stopping the mirror in between cancels that send and counts it dropped)
    deadline = time.monotonic() + 5
    while front.mirror_stats().get("sent", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    counts = front.mirror_to(None)
    shadow.kill()
    assert counts["offered"] == 2 and counts["sent"] == 2
    given = answer.headers.get("x-request-id") or champion.seen[0]["headers"]["x-request-id"]
    assert [s["headers"]["x-request-id"] for s in shadow.seen] == [f"{given}-shadow", "mine-shadow"]
    assert shadow.seen[0]["body"] == champion.seen[0]["body"]
