"""What the payload sink tests share: the transformer's events for a reference table (`traffic`),
a real monitor service process on loopback (`monitor`, one per test module), waiting for rows to
reach the windows, and a slow or stuck object store (`slow_writer`)."""
import threading
import time

import pandas as pd
import pytest

from monitoring.windows import read_window
from stages.dataset import ReferenceTask
from tests.monitoring.payloads import Monitor, Traffic


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return ReferenceTask(rows=600, seed=11).generate()


@pytest.fixture(scope="module")
def traffic(frame):
    return Traffic(frame)


@pytest.fixture(scope="module")
def monitor(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor")
    server = Monitor(tmp / "windows", tmp / "monitor.log", "--flush-seconds", "0.2", "--flush-events", "1000")
    yield server
    server.stop()


def wait_for_rows(root, count: int, timeout: float = 15, **options) -> pd.DataFrame:
    deadline = time.monotonic() + timeout
    while True:
        window = read_window(str(root), **options)
        if len(window) >= count or time.monotonic() > deadline:
            return window
        time.sleep(0.1)


def window_of(window: pd.DataFrame, request_id: str) -> pd.DataFrame:
    return window[window["request_id"] == request_id].sort_values("instance").reset_index(drop=True)


def slow_writer(delay: float = 0.0, gate: threading.Event | None = None):
    """A `write` for the sink that waits `delay` seconds (or until `gate` is set) before writing:
    a slow or stuck object store. It records when writes are in progress."""
    from storage import write_atomic

    state = {"writing": threading.Event(), "in_progress": 0, "files": 0}

    def write(uri, data):
        state["in_progress"] += 1
        state["writing"].set()
        try:
            if gate is not None:
                assert gate.wait(30)
            time.sleep(delay)
            write_atomic(uri, data)
            state["files"] += 1
        finally:
            state["in_progress"] -= 1

    return write, state

