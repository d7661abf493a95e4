"""The predictor, the transformer and the one-process server as real processes on loopback, and the
requests the serving tests send them: what test_serving.py, the contract, surface and fuzz tests share."""
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.loader import load_model
from stages.dataset import REFERENCE_CATEGORICAL
from tests.support import ROOT, NotReady, free_port, wait_for_url

NAME = "credit"
NUMERIC = ["age", "income", "credit_limit", "utilization", "debt_to_income", "late_payments", "months_on_book"]
COLUMNS = NUMERIC + REFERENCE_CATEGORICAL
# the v2 protocol's tensor datatypes (KServe's v2 protocol buffer), for the fuzz tests
DATATYPES = ["FP64", "FP32", "FP16", "INT64", "INT32", "INT8", "UINT64", "BOOL", "BYTES"]


class Server:
    """One server process with its ports and log file."""

    def __init__(self, module: str, log: Path, *args: str, http_port=None, grpc_port=None):
        self.http_port, self.grpc_port, self.log = http_port or free_port(), grpc_port or free_port(), log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, "--model_name", NAME, "--http_port", str(self.http_port),
                 "--grpc_port", str(self.grpc_port), *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait(self, path: str = "/v2/health/ready", timeout: float = 120) -> "Server":
        try:
            wait_for_url(self.url + path, self.process, timeout=timeout, what=self.log.name, tail=self.tail)
        except NotReady as err:
            pytest.fail(str(err))
        return self

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


TOPOLOGIES = ["chain", "single"]  # what clients call: transformer -> predictor, or the one-process server


def start_entry(topology: str, model_dir, logs: Path, entry_args=(), predictor_args=(), single_args=()):
    """The servers clients call on `model_dir`, started and ready, as (predictor, entry, every server):
    chain: our predictor and a transformer (gRPC hop) in front of it; single: the one-process server,
    which is both. `entry_args` go to the entry, `predictor_args` to the chain's predictor,
    `single_args` to the one-process server."""
    if topology == "single":
        server = Server("serving.single", logs / "single.log", "--model_dir", str(model_dir), *entry_args,
                        *single_args)
        servers = [server]
        predictor = entry = server
    else:
        predictor = Server("serving.predictor", logs / "predictor.log", "--model_dir", str(model_dir),
                           *predictor_args)
        entry = Server("serving.transformer", logs / "transformer.log", "--model_dir", str(model_dir),
                       "--predictor_host", f"127.0.0.1:{predictor.grpc_port}", "--predictor_protocol", "grpc-v2",
                       *entry_args)
        servers = [entry, predictor]
    try:
        for server in reversed(servers):
            server.wait()
    except BaseException:
        stop_all(servers)
        raise
    return predictor, entry, servers


def stop_all(servers) -> None:
    for server in servers:  # the entry first: a transformer calls its predictor
        server.stop()


class Receiver:
    """An HTTP sink on loopback that keeps what it receives (the monitor's payload endpoint)."""

    def __init__(self):
        self.events: list[tuple[dict, bytes]] = []
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                events.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, request_id: str, timeout: float = 10) -> list[tuple[dict, bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in list(self.events) if e[0].get("ce-id") == request_id]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        pytest.fail(f"{count} events for {request_id} not received; got {len(self.events)} events")


def records(frame: pd.DataFrame, n: int = 4, start: int = 0) -> list[dict]:
    part = frame[COLUMNS].iloc[start:start + n]
    return json.loads(json.dumps(part.astype(object).where(part.notna(), None).to_dict("records")))


def v2_body(rows: list[dict]) -> dict:
    return {"inputs": [{"name": c, "datatype": "FP64" if c in NUMERIC else "BYTES", "shape": [len(rows)],
                        "data": [r[c] for r in rows]} for c in COLUMNS]}


def expected(trained, rows: list[dict]) -> np.ndarray:
    return load_model(str(trained[0])).predict_proba(pd.DataFrame(rows))


def kserve_inputs(rows: list[dict], binary: bool):
    from kserve import InferInput

    inputs = []
    for column in COLUMNS:
        values = [r[column] for r in rows]
        if column in NUMERIC:
            tensor = InferInput(column, [len(rows)], "FP64")
            tensor.set_data_from_numpy(np.asarray(values, dtype=np.float64), binary_data=binary)
        else:
            tensor = InferInput(column, [len(rows)], "BYTES")
            tensor.set_data_from_numpy(np.asarray(values, dtype=object), binary_data=binary)
        inputs.append(tensor)
    return inputs
