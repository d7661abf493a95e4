"""A running `flywheel serve` whose tracking server (a real `mlflow server` on loopback) goes away
keeps serving: each poll of the champion alias warns in one line, and the answers keep coming."""
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_settings
from stages.dataset import ReferenceTask
from stages.registry import register_model
from tests.e2e.serving import NAME, Client, start_serve, train_quickly
from tests.support import CONFIG_DIR, free_port


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` (SQLite, proxied artifacts) on loopback, as tests/stages/test_gate.py's fixture starts it."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
               str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                   env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-800:]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_serve_keeps_serving_when_the_tracking_server_goes_away(tmp_path):
    root = tmp_path / "mlflow"
    root.mkdir()
    server, url = start_mlflow_server(root)
    proc = client = None
    try:
        # Given a champion registered in a real tracking server, and `flywheel serve` following it
        example = ReferenceTask(rows=20, seed=1).generate()[load_settings("local").dataset.features.columns].head(5)
        assert register_model(url, NAME, str(train_quickly(tmp_path / "v1", seed=3)), None, {}, example,
                              experiment="serve-outage") == "1"
        config = tmp_path / "config"
        shutil.copytree(CONFIG_DIR, config)
        local = yaml.safe_load((config / "local.yaml").read_text())
        local["mlflow"] = {**local.get("mlflow", {}), "tracking_uri": url}
        (config / "local.yaml").write_text(yaml.safe_dump(local))
        port = free_port()
        proc, lines = start_serve(config, tmp_path, port)
        client = Client(port)
        client.start()
        time.sleep(1.5)
        # When the tracking server goes away
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        answered = len(client.versions)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(line.startswith("warning:") for line in lines):
            time.sleep(0.25)
        time.sleep(2)  # a few more polls of the alias, all failing
        # Then each poll warned in one line, the serve is up, and the answers kept coming, all from v1
        warnings = [line for line in lines if "cannot read the champion alias" in line]
        assert warnings and all(line.startswith("warning: ") and line.rstrip().endswith("still serving v1")
                                for line in warnings), "".join(lines)
        assert proc.poll() is None, "".join(lines)
        assert len(client.versions) > answered + 5 and set(client.versions) == {"1"}, len(client.versions)
        assert client.failures == [], client.failures[:3]
        assert client.predict() == "1"
    finally:
        if client is not None:
            client.done.set()
            client.join(60)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=90)
        if server.poll() is None:
            server.kill()
            server.wait()
    assert proc.returncode == 0, "".join(lines)
