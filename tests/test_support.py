"""The shared test helpers hold what they promise: the reference probability is the generator's,
and waiting for a server fails loudly instead of running out silently."""
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from stages.dataset import REFERENCE_TARGET, ReferenceTask
from tests.support import NotReady, free_port, reference_probability, wait_for_url


def test_reference_probability_is_calibrated_on_the_generated_labels():
    # Given a large sample of the reference task (labels drawn from its own probability)
    frame = ReferenceTask(rows=60_000, seed=11).generate()
    p, y = reference_probability(frame), frame[REFERENCE_TARGET].to_numpy()
    # Then overall and per decile of p the default rate is what p says (a copied coefficient off is not)
    assert abs(p.mean() - y.mean()) < 0.006
    deciles = np.quantile(p, np.linspace(0, 1, 11))
    for low, high in zip(deciles[:-1], deciles[1:]):
        inside = (p >= low) & (p <= high)
        assert abs(p[inside].mean() - y[inside].mean()) < 0.03, (low, high)


def test_wait_for_url_returns_once_the_server_answers():
    class Ok(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_for_url(f"http://127.0.0.1:{server.server_port}/ready", timeout=10)
    finally:
        server.shutdown()


def test_wait_for_url_fails_when_the_process_exits_or_time_runs_out():
    # A server process that dies: reported at once with its exit code and log, not after the timeout
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(NotReady, match=r"(?s)mlflow exited with 3:\nport taken"):
        wait_for_url(f"http://127.0.0.1:{free_port()}/health", process, timeout=60, what="mlflow",
                     tail=lambda: "port taken")
    assert time.monotonic() - started < 30
    # Nothing listening and no process to watch: NotReady at the timeout, naming the URL
    url = f"http://127.0.0.1:{free_port()}/health"
    with pytest.raises(NotReady, match=f"server not ready at {url} after 0.5 s"):
        wait_for_url(url, timeout=0.5)


def test_the_kfp_caller_name_shim_is_on_and_raises_kfps_own_error(kfp_caller_name_without_the_whole_stack):
    # conftest swaps KFP's stack walk for the caller's frame (a speed-up): while KFP is the pinned one, it is on
    original = kfp_caller_name_without_the_whole_stack
    assert original, "KFP's _ensure_container_spec_exists changed: review the shim in tests/conftest.py"
    from types import SimpleNamespace

    from kfp.dsl.pipeline_task import PipelineTask

    def set_cpu_limit(check, task):  # as KFP's setters call it
        with pytest.raises(ValueError) as err:
            check(task)
        return str(err.value)

    not_a_container = SimpleNamespace(container_spec=None)
    assert set_cpu_limit(PipelineTask._ensure_container_spec_exists, not_a_container) \
        == set_cpu_limit(original, not_a_container)
    assert set_cpu_limit(original, not_a_container).startswith("set_cpu_limit can only be used on single-step")
    PipelineTask._ensure_container_spec_exists(SimpleNamespace(container_spec=object()))  # a container: no error
