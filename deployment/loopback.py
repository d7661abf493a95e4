"""The local deployer: the champion served on loopback by the same processes a cluster runs, on
free ports, ready-checked, smoke-tested and stopped cleanly. `serving.topology` says which:

    single       python -m serving.single      (REST + gRPC, raw records in, labels out, the model's
                 forward pass in the same process)
    collocated,  python -m serving.predictor   (REST + gRPC, the model's forward pass)
    separate     python -m serving.transformer (REST + gRPC, raw records in, labels out;
                 calls the predictor over the hop protocol, as the collocated pod does)

`ports["entry_http"]`/`["entry_grpc"]` are the process clients call (the one server, or the
transformer); `predictor_http`/`predictor_grpc` the process that runs the model (the same one for
`single`).
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
    """The serving processes for one model directory on loopback (`spec.topology`: one process, or
    predictor + transformer). Use as a context manager, or `start()` / `stop()`; ports are picked
    free unless given (`http_port`: the entry's REST port)."""

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
    def single(self) -> bool:
        return self.spec.topology == "single"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['entry_http']}"

    @property
    def predictor_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['predictor_http']}"

    def start(self) -> LocalServing:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.http_port:  # the one port a user picks: one line when it is taken, no server started
            problem = port_in_use(HOST, self.http_port)
            if problem:
                raise ServingFailed(problem)
        self.ports = {"entry_http": self.http_port or free_port(), "entry_grpc": free_port()}
        if self.single:
            self.ports.update(predictor_http=self.ports["entry_http"], predictor_grpc=self.ports["entry_grpc"])
        else:
            self.ports.update(predictor_http=free_port(), predictor_grpc=free_port())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.processes = [self._single()] if self.single else [self._predictor(), self._transformer()]
        try:
            for process in self.processes:
                process.start(env)
            urls = [self.url] if self.single else [self.predictor_url, self.url]  # the predictor first
            for process, url in zip(self.processes, urls):
                self._wait_ready(url, process)
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self, module: str, http: str, grpc: str) -> list[str]:
        """`python -m module` for this model, its limits and version, on loopback at the named ports."""
        return [sys.executable, "-m", module, "--model_name", self.model_name, "--model_dir", self.model_dir,
                *(["--model_version", self.model_version] if self.model_version else []),
                "--host", HOST, "--max_batch_rows", str(self.spec.max_batch_rows),
                "--max_body_bytes", str(self.spec.max_body_bytes),
                "--http_port", str(self.ports[http]), "--grpc_port", str(self.ports[grpc])]

    def _records_args(self) -> list[str]:
        """What a server that answers raw records adds: the decision threshold and the payload sink."""
        logging = self.spec.payload_logging
        return ["--decision_threshold", f"{self.decision_threshold:g}",
                *(["--payload_url", logging.url, "--payload_sample_rate", str(logging.sample_rate),
                   "--payload_log_mode", logging.mode] if logging.url else [])]

    def _single(self) -> Process:
        return Process("server", [*self._command("serving.single", "entry_http", "entry_grpc"),
                                  *self._records_args()], self.log_dir / "server.log")

    def _predictor(self) -> Process:
        return Process("predictor", self._command("serving.predictor", "predictor_http", "predictor_grpc"),
                       self.log_dir / "predictor.log")

    def _transformer(self) -> Process:
        hop = self.spec.hop_protocol
        predictor_host = f"127.0.0.1:{self.ports['predictor_grpc' if hop == 'grpc-v2' else 'predictor_http']}"
        return Process("transformer", [
            *self._command("serving.transformer", "entry_http", "entry_grpc"),
            "--predictor_host", predictor_host, "--predictor_protocol", hop, *self._records_args()],
            self.log_dir / "transformer.log")

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
        for process in reversed(self.processes):  # a transformer first: it calls the predictor
            process.stop()

    def __enter__(self) -> LocalServing:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def predict_v1(self, records: list[dict], request_id: str | None = None) -> dict:
        """POST /v1/models/NAME:predict to the entry (the one server, or the transformer)."""
        return post_json(f"{self.url}/v1/models/{self.model_name}:predict", {"instances": records}, request_id)

    def predict_v2(self, records: list[dict], request_id: str | None = None) -> dict:
        """POST /v2/models/NAME/infer to the entry, one tensor per column."""
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
    """A real prediction over v1 and v2 through the entry: both answer, and agree."""
    v1, v2 = serving.predict_v1(records), serving.predict_v2(records)
    if not v1.get("predictions") or not v2.get("outputs"):
        raise ServingFailed(f"smoke test: empty answer (v1 {str(v1)[:200]}, v2 {str(v2)[:200]})")
    return {"v1": v1, "v2": v2}
