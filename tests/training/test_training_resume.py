"""Checkpoints and elastic restarts: a run that dies after a checkpoint resumes to the same model.

The fast tests crash a single in-process run right after a checkpoint; the slow one SIGKILLs a
worker of a real 2-process torchrun group (`--max-restarts 1`) and watches it restart and resume.
"""
import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data.distributed import DistributedSampler

from model.loader import load_model
from pipelines.arguments import train_spec
from pipelines.config import load_settings
from stages.dataset import ReferenceTask
from storage.tables import write_table
from training import train as entry
from training.backends.jobs import entry_args, entry_spec
from training.backends.torchrun import torchrun_command
from training.checkpoint import CHECKPOINT
from training.pods import TORCHRUN_ENV

CHECKPOINT_LINE = re.compile(r"rank0 checkpoint written after epoch (\d+) ")
RESUMED_LINE = re.compile(r"rank0 resumed from checkpoint after epoch (\d+) ")


def make_spec(**hyperparameters) -> dict:
    settings = load_settings("local", overrides={"training": {"hyperparameters": hyperparameters}})
    return entry_spec(train_spec(settings), settings.dataset, None)


class Killed(RuntimeError):
    """Stands in for the process dying right after a checkpoint reached storage."""


def crash_after_checkpoint(monkeypatch, epoch: int) -> None:
    original = entry.save_checkpoint

    def save_then_die(uri, checkpoint):
        original(uri, checkpoint)
        if checkpoint["state"]["epoch"] == epoch:
            raise Killed(f"killed after the checkpoint of epoch {epoch}")

    monkeypatch.setattr(entry, "save_checkpoint", save_then_die)


def test_roc_auc_agrees_with_sklearn_including_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    scores = np.round(rng.normal(size=2000) + labels, 1)  # rounded: many ties
    assert entry.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(entry.roc_auc(np.zeros(5), np.arange(5.0)))


def test_epoch_order_is_the_samplers_and_continues_across_epochs():
    rows = np.arange(103)
    samplers = [DistributedSampler(rows, num_replicas=2, rank=r, shuffle=True, seed=7) for r in (0, 1)]
    orders = {}
    for epoch in (0, 1, 5):
        for rank, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            expected = list(sampler)
            orders[epoch, rank] = entry.epoch_order(sampler, epoch)
            assert orders[epoch, rank].tolist() == expected
        assert set(orders[epoch, 0].tolist()) | set(orders[epoch, 1].tolist()) == set(range(103))
    assert not torch.equal(orders[0, 0], orders[1, 0]), "each epoch draws a new order"
    fresh = DistributedSampler(rows, num_replicas=2, rank=0, shuffle=True, seed=7)
    assert torch.equal(entry.epoch_order(fresh, 5), orders[5, 0]), "a restarted sampler continues at epoch 5"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return str(write_table(ReferenceTask(rows=3000, seed=3).generate(), tmp_path_factory.mktemp("d") / "t.parquet"))


# lr 0.01 on this data: validation loss improves to epoch 3, then epochs 4 and 5 bring no gain,
# so patience 2 stops the run after epoch 5 (asserted below, so the test keeps its teeth).
EARLY_STOP = dict(epochs=10, patience=2, learning_rate=0.01, batch_size=64)


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("ref") / "model")
    metadata = entry.train(small_data, model_dir, make_spec(**EARLY_STOP))
    assert metadata["metrics"]["epochs_run"] == 5
    assert metadata["history"][3]["val_loss"] > metadata["history"][2]["val_loss"]
    return model_dir, metadata


@pytest.mark.parametrize("crash_epoch", [4, 5], ids=["mid-patience", "after-early-stop"])
def test_crash_after_a_checkpoint_resumes_to_the_same_model(crash_epoch, small_data, uninterrupted, tmp_path,
                                                             monkeypatch, caplog):
    reference_dir, reference = uninterrupted
    model_dir = str(tmp_path / "model")
    spec = make_spec(**EARLY_STOP)
    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, crash_epoch)
        with pytest.raises(Killed):
            entry.train(small_data, model_dir, spec)
    assert os.path.exists(os.path.join(model_dir, CHECKPOINT))
    assert not os.path.exists(os.path.join(model_dir, "metadata.json"))

    caplog.set_level(logging.INFO, logger="flywheel.train")
    caplog.clear()  # only the resumed run's records (an earlier test may have set the root to INFO)
    resumed = entry.train(small_data, model_dir, spec)
    assert f"resumed from checkpoint after epoch {crash_epoch} " in caplog.text
    epochs_trained_now = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs_trained_now) == 5 - crash_epoch, "early-stopping state (epochs without gain, stopped) restored"
    assert resumed["resumed_from_epoch"] == crash_epoch
    assert resumed["metrics"]["epochs_run"] == reference["metrics"]["epochs_run"]
    assert resumed["metrics"]["best_epoch"] == reference["metrics"]["best_epoch"]
    # Same data order, dropout masks and optimizer moments: the same losses, epoch by epoch.
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx(
        [h["val_loss"] for h in reference["history"]], abs=1e-6)
    holdout = ReferenceTask(rows=500, seed=11).generate()
    np.testing.assert_allclose(load_model(model_dir).predict_proba(holdout),
                               load_model(reference_dir).predict_proba(holdout), atol=1e-6)
    assert not os.path.exists(os.path.join(model_dir, "checkpoints"))


def test_a_checkpoint_from_another_run_is_not_resumed(small_data, tmp_path, caplog):
    model_dir = str(tmp_path / "model")
    entry.train(small_data, model_dir, {**make_spec(epochs=2), "keep_checkpoints": True})
    assert os.path.exists(os.path.join(model_dir, CHECKPOINT))
    caplog.set_level(logging.INFO, logger="flywheel.train")
    other = entry.train(small_data, model_dir, make_spec(epochs=2, seed=8))
    assert "belongs to another run" in caplog.text and "resumed from" not in caplog.text
    assert other["resumed_from_epoch"] is None and len(other["history"]) == 2


# --- a real worker group under torchrun -------------------------------------------------------

KILL_AFTER = 2  # SIGKILL a worker once the checkpoint after this epoch is in the log
EPOCHS = 8


def run_torchrun(args: list[str], kill_after: int | None, timeout: float = 90) -> tuple[int, list[str], int | None]:
    """Run the entry point on 2 processes with --max-restarts 1, in the launcher's environment;
    optionally SIGKILL rank 0's worker right after the log shows the checkpoint of epoch
    `kill_after`. Returns (exit status, log lines, killed pid)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **TORCHRUN_ENV}
    proc = subprocess.Popen(torchrun_command(2, 1, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    watchdog = threading.Timer(timeout, kill_tree, [proc.pid])
    watchdog.start()
    lines, killed = [], None
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            match = CHECKPOINT_LINE.search(line)
            if kill_after is not None and killed is None and match and int(match.group(1)) >= kill_after:
                killed = kill_worker(proc.pid, rank="0")
                lines.append(f"TEST: SIGKILL sent to rank 0 worker pid {killed}")
        proc.wait()
    finally:
        watchdog.cancel()
        kill_tree(proc.pid)
        proc.wait()
    return proc.returncode, lines, killed


def kill_tree(pid: int) -> None:
    """torchrun starts its workers in sessions of their own: kill them by pid, then the agent."""
    try:
        agent = psutil.Process(pid)
        processes = agent.children(recursive=True) + [agent]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def kill_worker(agent_pid: int, rank: str) -> int:
    """SIGKILL the worker process of `rank` among torchrun's children (found by its RANK variable)."""
    for _ in range(50):
        for child in psutil.Process(agent_pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == rank and child.environ().get("LOCAL_RANK") is not None:
                    os.kill(child.pid, signal.SIGKILL)
                    return child.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.01)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {agent_pid}")


@pytest.fixture(scope="module")
def torchrun_data(tmp_path_factory):
    return str(write_table(ReferenceTask(rows=6000, seed=5).generate(), tmp_path_factory.mktemp("tr") / "t.parquet"))


@pytest.mark.slow
def test_killed_worker_restarts_the_group_which_resumes_from_the_checkpoint(torchrun_data, tmp_path):
    spec = make_spec(epochs=EPOCHS, patience=EPOCHS, batch_size=64)
    code, reference_log, _ = run_torchrun(entry_args(torchrun_data, str(tmp_path / "ref"), spec), None)
    assert code == 0, "\n".join(reference_log[-30:])
    code, lines, killed = run_torchrun(entry_args(torchrun_data, str(tmp_path / "model"), spec), KILL_AFTER)
    log = "\n".join(lines)
    # No retry on `connectFullMesh: Connection refused`: that was torchrun's shared store handing the
    # restarted group stale addresses, fixed by TORCHRUN_ENV; if it comes back, this test says so.
    assert killed is not None and code == 0, log[-4000:]

    restart_at = next(i for i, line in enumerate(lines) if "rank0 start: world_size=2" in line and "restart=1" in line)
    before, after = lines[:restart_at], lines[restart_at:]
    last_checkpoint = max(int(m.group(1)) for m in map(CHECKPOINT_LINE.search, before) if m)
    resumed = [int(m.group(1)) for m in map(RESUMED_LINE.search, after) if m]
    assert len(resumed) == 1, log[-4000:]
    # The resumed epoch is the last checkpoint the killed group logged (or the one after it, if the
    # kill landed between rename and log line): at or after KILL_AFTER, never a fresh start.
    assert resumed[0] >= KILL_AFTER and resumed[0] in (last_checkpoint, last_checkpoint + 1), log[-4000:]
    epochs_after = [int(m.group(1)) for m in (re.search(r"rank0 epoch (\d+)/", line) for line in after) if m]
    assert epochs_after == list(range(resumed[0] + 1, EPOCHS + 1)), "training continues where it stopped"

    model = load_model(str(tmp_path / "model"))
    reference = load_model(str(tmp_path / "ref"))
    assert model.metadata["resumed_from_epoch"] == resumed[0] and model.metadata["metrics"]["epochs_run"] == EPOCHS
    assert model.metadata["metrics"]["val_roc_auc"] == pytest.approx(
        reference.metadata["metrics"]["val_roc_auc"], abs=2e-3)
    assert [h["val_loss"] for h in model.metadata["history"]] == pytest.approx(
        [h["val_loss"] for h in reference.metadata["history"]], abs=1e-4)
    assert not (tmp_path / "model" / "checkpoints").exists()
