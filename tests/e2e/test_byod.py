"""Bring your own data, end to end: `flywheel run` on a CSV of another schema, configured in one env
file, trains, gates, registers, deploys and turns the loop, with names that fit it."""
import os
import subprocess
import sys

import pytest

from storage.tables import write_table
from tests.byod import byod_env, churn_frame


@pytest.mark.slow
def test_your_own_csv_runs_end_to_end_from_config_alone_loop_included(config_dir, tmp_path):
    """As a user runs it: `flywheel run --env churn`, a real process, on a CSV that shares no column
    with the reference task, configured only by config/churn.yaml."""
    from gateways.mlflow_api import client as _client

    data = write_table(churn_frame(3000), tmp_path / "churn.csv")
    env = byod_env(config_dir, data, tmp_path)
    environ = {**os.environ, "FLYWHEEL_CONFIG_DIR": str(config_dir), "FLYWHEEL_RUNS_DIR": str(tmp_path / "runs")}
    # When the whole lifecycle runs, loop included
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--env", env], env=environ, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    # Then it exits 0 without a traceback
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    out = " ".join(done.stdout.split())
    # And the model is registered and served under the file's name, not the reference task's
    assert "churn v1 served by local" in out
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.name for m in client.search_registered_models()] == ["churn"]
    # And the loop served held-out rows, detected the shift on the user's own features and retrained
    assert "tenure_months" in out and "monthly_spend" in out
    assert "started a retraining run" in out
    assert {e.name for e in client.search_experiments()} >= {"churn"}
