"""What the end-to-end serving tests share: a model trained in seconds, the registry's aliases, a
`flywheel serve --env local` process, and a client predicting through it back to back."""
import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from pipelines.arguments import train_spec
from pipelines.config import load_settings
from stages.dataset import ReferenceTask
from storage.tables import write_table

NAME = "credit-default"
COLUMNS = ["age", "income", "credit_limit", "utilization", "debt_to_income", "late_payments", "months_on_book",
           "employment", "housing", "region"]


def train_quickly(directory: Path, seed: int) -> Path:
    """A model trained in-process in seconds (1.5k rows, 1 epoch) into `directory`/model."""
    from training import train as entry
    from training.backends.jobs import entry_spec

    settings = load_settings("local", overrides={"training": {"hyperparameters": {"epochs": 1}}})
    data = write_table(ReferenceTask(rows=1500, seed=seed).generate(), directory / "train.parquet")
    with pytest.MonkeyPatch.context() as env:
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
            env.delenv(name, raising=False)
        entry.train(str(data), str(directory / "model"), entry_spec(train_spec(settings), settings.dataset, None))
    return directory / "model"


def aliases(tracking: str) -> dict:
    """The registered model's aliases and the versions they name."""
    from gateways.mlflow_api import client

    return {alias: str(version) for alias, version in client(tracking).get_registered_model(NAME).aliases.items()}


class Client(threading.Thread):
    """Predictions through the front, back to back, until stopped: every answer's version, every failure."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        frame = ReferenceTask(rows=20, seed=7).generate()[COLUMNS]
        self.body = json.dumps({"instances": json.loads(frame.to_json(orient="records"))}).encode()
        self.url = f"http://127.0.0.1:{port}/v1/models/{NAME}:predict"
        self.versions, self.failures, self.done = [], [], threading.Event()

    def predict(self) -> str:
        request = urllib.request.Request(self.url, data=self.body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["model_version"]

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.versions.append(self.predict())
            except Exception as err:
                self.failures.append(repr(err))


def start_serve(config, cwd, port: int):
    """`flywheel serve --env local` on `port`, once it says it serves; its output keeps being collected."""
    env = {**os.environ, "FLYWHEEL_CONFIG_DIR": str(config), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--env", "local", "--port", str(port),
                             "--poll-seconds", "1"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C stops serving" in line:
            break
    else:
        raise AssertionError("".join(lines))
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    return proc, lines
