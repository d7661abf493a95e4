"""The local deployer: the champion served on loopback by the same predictor and transformer
processes a cluster runs, on free ports, ready-checked, smoke-tested and stopped cleanly.

    predictor    python -m serving.predictor   (REST + gRPC, the model's forward pass)
    transformer  python -m serving.transformer (REST + gRPC, raw records in, labels out;
                 calls the predictor over gRPC v2, as the collocated pod does)
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from model.artifact import read_metadata
from serving.ports import port_in_use
from specs import ServingSpec

READY_PATH = "/v2/health/ready"
HOST = "127.0.0.1"  # loopback only, whatever $FLYWHEEL_SERVING_HOST says (the image sets it for pods)


class ServingFailed(RuntimeError):
    """A server did not start, did not become ready, or failed its smoke test."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    name: str
    command: list[str]
    log_path: Path
    popen: subprocess.Popen | None = None

    def start(self, env: dict) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it until it exits
        # Its own session: Ctrl-C in a terminal reaches us, and we stop the children in order.
        self.popen = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)  # ModelServer drains and exits on SIGTERM
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalServing:
    """Predictor + transformer for one model directory on loopback. Use as a context manager, or
    `start()` / `stop()`; ports are picked free unless given."""

    model_dir: str
    model_name: str
    spec: ServingSpec
    log_dir: Path
    http_port: int | None = None
    decision_threshold: float = 0.5
    model_version: str | None = None  # what the servers report; the registry's version number
    processes: list[Process] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['transformer_http']}"

    @property
    def predictor_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['predictor_http']}"

    def start(self) -> LocalServing:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.http_port:  # the one port a user picks: one line when it is taken, no server started
            problem = port_in_use(HOST, self.http_port)
            if problem:
                raise ServingFailed(problem)
        self.ports = {"predictor_http": free_port(), "predictor_grpc": free_port(),
                      "transformer_http": self.http_port or free_port(), "transformer_grpc": free_port()}
        common = ["--model_version", self.model_version] if self.model_version else []
        common += ["--host", HOST, "--max_batch_rows", str(self.spec.max_batch_rows),
                   "--max_body_bytes", str(self.spec.max_body_bytes)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        hop = self.spec.hop_protocol
        predictor_host = (f"127.0.0.1:{self.ports['predictor_grpc']}" if hop == "grpc-v2"
                          else f"127.0.0.1:{self.ports['predictor_http']}")
        predictor = Process("predictor", [
            sys.executable, "-m", "serving.predictor", "--model_name", self.model_name, "--model_dir", self.model_dir,
            *common,
            "--http_port", str(self.ports["predictor_http"]), "--grpc_port", str(self.ports["predictor_grpc"])],
            self.log_dir / "predictor.log")
        transformer = Process("transformer", [
            sys.executable, "-m", "serving.transformer", "--model_name", self.model_name, "--model_dir", self.model_dir,
            *common,
            "--predictor_host", predictor_host, "--predictor_protocol", hop,
            "--decision_threshold", f"{self.decision_threshold:g}",
            "--http_port", str(self.ports["transformer_http"]), "--grpc_port", str(self.ports["transformer_grpc"]),
            *(["--payload_url", self.spec.payload_logging.url, "--payload_sample_rate",
                str(self.spec.payload_logging.sample_rate), "--payload_log_mode", self.spec.payload_logging.mode]
              if self.spec.payload_logging.url else [])],
            self.log_dir / "transformer.log")
        self.processes = [predictor, transformer]
        try:
            for process in self.processes:
                process.start(env)
            self._wait_ready(self.predictor_url, predictor)
            self._wait_ready(self.url, transformer)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, url: str, process: Process) -> None:
        deadline = time.monotonic() + self.spec.ready_timeout_seconds
        while time.monotonic() < deadline:
            if not process.alive():
                raise ServingFailed(f"{process.name} exited with {process.popen.returncode} before it was ready:\n"
                                    f"{process.log_tail()}")
            try:
                with urllib.request.urlopen(url + READY_PATH, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ServingFailed(f"{process.name} not ready after {self.spec.ready_timeout_seconds}s at {url}:\n"
                            f"{process.log_tail()}")

    def stop(self) -> None:
        for process in reversed(self.processes):  # the transformer first: it calls the predictor
            process.stop()

    def __enter__(self) -> LocalServing:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def predict_v1(self, records: list[dict], request_id: str | None = None) -> dict:
        """POST /v1/models/NAME:predict through the transformer."""
        return post_json(f"{self.url}/v1/models/{self.model_name}:predict", {"instances": records}, request_id)

    def predict_v2(self, records: list[dict], request_id: str | None = None) -> dict:
        """POST /v2/models/NAME/infer through the transformer, one tensor per column."""
        categorical = read_metadata(self.model_dir).get("features", {}).get("categorical", [])
        return post_json(f"{self.url}/v2/models/{self.model_name}/infer", v2_request(records, categorical), request_id)


def v2_request(records: list[dict], categorical: list[str]) -> dict:
    """Open Inference Protocol v2 request with one tensor per feature column: BYTES for the
    model's categorical columns (int-coded categories too), FP64 for the numeric ones."""
    columns = list(dict.fromkeys(k for record in records for k in record))
    return {"inputs": [{"name": column, "shape": [len(records)],
                        "datatype": "BYTES" if column in categorical else "FP64",
                        "data": [record.get(column) for record in records]} for column in columns]}


def post_json(url: str, body: dict, request_id: str | None = None, timeout: float = 10.0) -> dict:
    headers = {"content-type": "application/json", **({"x-request-id": request_id} if request_id else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise ServingFailed(f"POST {url} -> {err.code}: {err.read().decode(errors='replace')[:500]}") from None


def smoke_test(serving: LocalServing, records: list[dict]) -> dict:
    """A real prediction over v1 and v2 through the transformer: both answer, and agree."""
    v1, v2 = serving.predict_v1(records), serving.predict_v2(records)
    if not v1.get("predictions") or not v2.get("outputs"):
        raise ServingFailed(f"smoke test: empty answer (v1 {str(v1)[:200]}, v2 {str(v2)[:200]})")
    return {"v1": v1, "v2": v2}
