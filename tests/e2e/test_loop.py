"""The flywheel turns (`make run`'s loop): served traffic reaches the sink through the real
transformer and monitor service, a shift is detected only after it persists, and the guarded
trigger starts one retraining run, not two."""
import shutil

import pytest
import yaml
from rich.console import Console

import pipelines.loop as loop
import pipelines.retrain as retrain
from pipelines.config import load_settings
from tests.e2e.serving import NAME, train_quickly
from tests.support import CONFIG_DIR


@pytest.fixture
def champion(tmp_path, monkeypatch):
    """One registered champion (with its training profile) in a SQLite MLflow, and the local env
    pointing at it; pipelines write under tmp_path."""
    from stages.dataset import ReferenceTask
    from stages.registry import register_model

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    example = ReferenceTask(rows=20, seed=1).generate()[load_settings("local").dataset.features.columns].head(5)
    register_model(tracking, NAME, str(train_quickly(tmp_path / "v1", seed=3)), None, {}, example,
                   experiment="loop")
    config = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, config)
    local = yaml.safe_load((config / "local.yaml").read_text())
    local["mlflow"] = {"tracking_uri": tracking}
    (config / "local.yaml").write_text(yaml.safe_dump(local))
    monkeypatch.setattr("pipelines.local_runner.PIPELINE_ROOT", tmp_path / "runs")
    return load_settings("local", config)


@pytest.mark.slow
def test_a_persistent_shift_starts_one_guarded_retraining_run(champion, monkeypatch):
    started = []

    def fake_start(settings, lock, execute=None):
        # The run the trigger starts: recorded, not executed (the training pipeline has its own tests).
        return lambda request: started.append((settings, request)) or f"run-{len(started)}"

    monkeypatch.setattr(retrain, "local_start_run", fake_start)
    # When the loop serves the champion and the traffic shifts in windows 2 and 3
    steps = dict(loop.turn(champion, Console(record=True, width=200), rows_per_window=500))
    # Then the steady window holds, the first shifted one waits for the breach to persist (hysteresis)
    assert "drifted: none" in steps["window 1: steady traffic"] and "hold" in steps["window 1: steady traffic"]
    assert "hold: 1 of 2 consecutive" in steps["window 2: the world shifts"]
    assert "income" in steps["window 2: the world shifts"] and "RETRAIN" in steps["window 3: still shifted"]
    # And the trigger started one retraining run, on fresh (shifted) data, with the drift as its reasons
    assert len(started) == 1 and steps["trigger"] == "started a retraining run (run-1)"
    settings, request = started[0]
    assert settings.dataset.shift == loop.SHIFT
    assert any("income" in reason for reason in request["reasons"])
    # And a second drift inside the cool-down starts nothing
    assert steps["second drift"].startswith("refused (cooldown)")
