"""Payload events as the transformer sends them, and a real monitor service process to send them
to: what the sink tests and the monitor fuzz tests share."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from model.labels import LabelMapping
from model.preprocessing import Preprocessor
from serving.payload import REQUEST_TYPE, RESPONSE_TYPE, Event, PayloadLogger
from serving.tensors import to_output
from serving.transform import FeatureCodec
from stages.dataset import REFERENCE_CATEGORICAL
from tests.support import ROOT, free_port

NAME, VERSION = "credit", "7"
NUMERIC = ["age", "income", "credit_limit", "utilization", "debt_to_income", "late_payments", "months_on_book"]
COLUMNS = NUMERIC + REFERENCE_CATEGORICAL


class Traffic:
    """Payload events exactly as the transformer sends them: `PayloadLogger.headers` for the
    CloudEvent attributes, the raw request as the client sent it, the response as `FeatureCodec`
    (v1) and KServe's `InferResponse` (v2) serialise it."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self.codec = FeatureCodec(Preprocessor.fit(frame, NUMERIC, REFERENCE_CATEGORICAL), LabelMapping(0, 1))
        self.logger = PayloadLogger("http://monitor/events", model_name=NAME)
        self.rng = np.random.default_rng(5)

    def records(self, n: int, start: int = 0) -> list[dict]:
        part = self.frame[COLUMNS].iloc[start:start + n]
        return json.loads(json.dumps(part.astype(object).where(part.notna(), None).to_dict("records")))

    def call(self, request_id: str, rows: list[dict], protocol: str = "v1", version: str = VERSION):
        """The (request, response) events of one call: each (headers, body)."""
        probabilities = self.rng.random(len(rows))
        if protocol == "v1":
            source = f"http://transformer:8080/v1/models/{NAME}:predict"
            request = {"instances": rows}
            response = self.codec.to_v1(probabilities, NAME, version)
        else:
            from kserve import InferResponse

            source = f"http://transformer:8080/v2/models/{NAME}/infer"
            request = {"inputs": [{"name": c, "datatype": "FP64" if c in NUMERIC else "BYTES", "shape": [len(rows)],
                                   "data": [r[c] for r in rows]} for c in COLUMNS]}
            outputs = [to_output(t, False) for t in self.codec.to_v2(probabilities)]
            response = InferResponse(request_id, NAME, outputs, model_version=version).to_rest()[0]
        return (self.event(REQUEST_TYPE, request_id, source, json.dumps(request).encode()),
                self.event(RESPONSE_TYPE, request_id, source, json.dumps(response).encode()))

    def event(self, kind: str, request_id: str, source: str, body: bytes) -> tuple[dict, bytes]:
        return self.logger.headers(Event(kind, request_id, source, body)), body


class Monitor:
    """`python -m monitoring.service` on a free loopback port, its log in a file."""

    def __init__(self, root: Path, log: Path, *args: str):
        self.root, self.log, self.port = root, log, free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "monitoring.service", "--root", str(root), "--port", str(self.port),
                 "--log-level", "warning", *args],  # no --host: the default must be loopback
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        self.wait()

    def wait(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"monitor exited {self.process.returncode}:\n{self.tail()}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"monitor not ready after {timeout} s:\n{self.tail()}")

    def send(self, event: tuple[dict, bytes]) -> httpx.Response:
        headers, body = event
        return self.client.post("/events", content=body, headers=headers)

    def metric(self, name: str, **labels) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                found = dict(part.split("=", 1) for part in line[line.find("{") + 1:line.find("}")].split(",")
                             if "=" in part) if "{" in line else {}
                if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.client.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.client.close()

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]
