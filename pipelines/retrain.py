"""What a retraining trigger starts, per environment: the layer-5 half of `monitoring.trigger`.

Retraining means one thing wherever it is asked for (the monitoring pipeline's trigger task, the
monitor service's alert hook, `flywheel monitor --trigger`, `flywheel run`'s loop): the env's
GuardedTrigger decides, and its start function runs the env's PUBLISHED training pipeline.

- On a cluster: `gateways.kfp_api.start_published_run` starts the newest version of
  `flywheel-<env>-training` (what `flywheel schedule`/`submit` published, `pipelines.publish`)
  with the arguments compiled into it, in the env's experiment. Nothing is compiled or uploaded
  here: a trigger never runs config that was not published. The run's name says it was
  triggered (`flywheel-<env>-training retrain <source> <UTC stamp>`) and its description
  carries the reasons and dedup key. `published_runs_in_flight` lists the experiment's runs
  whose names start with `flywheel-<env>-training` (submitted, scheduled and triggered ones
  alike) in state PENDING, RUNNING or PAUSED.
- On this machine (no kfp.host): the training pipeline runs in-process through the local runner
  (`pipelines.local_runner.execute`) holding a lock file, and the run directory is the run id; the runs
  in flight are whether that lock is held, by this process or another.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gateways import kfp_api
from monitoring import trigger
from monitoring.trigger import GuardedTrigger
from pipelines.arguments import kfp_target
from pipelines.config import Settings
from pipelines.local_runner import PIPELINE_ROOT

LOCK_FILE = "retraining.lock"


def state_uri(settings: Settings) -> str:
    """The trigger's state beside the sink's windows (an object store on a cluster: survives pods)."""
    return trigger.state_uri(settings.monitoring.sink.root)


# --- on this machine ---------------------------------------------------------------------------

class LocalRunInFlight(RuntimeError):
    """A local retraining run holds the lock."""


@contextlib.contextmanager
def holding(lock_path: Path) -> Iterator[None]:
    """Hold the local retraining lock (flock: released by the kernel if the process dies)."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LocalRunInFlight(f"a local retraining run holds {lock_path}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "since": time.time()}))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _held(lock_path: Path) -> bool:
    """Whether someone holds the lock (probed without taking it for longer than the probe)."""
    import fcntl

    if not lock_path.exists():
        return False
    with open(lock_path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def local_runs_in_flight(lock_path: Path = PIPELINE_ROOT / LOCK_FILE) -> Callable[[], list]:
    def runs_in_flight() -> list:
        if not _held(lock_path):
            return []
        try:
            holder = json.loads(lock_path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        return [{"run_id": f"local pid {holder.get('pid', '?')}", "state": "RUNNING", "lock": str(lock_path),
                 **holder}]

    return runs_in_flight


def local_start_run(settings: Settings, lock_path: Path = PIPELINE_ROOT / LOCK_FILE,
                    execute: Callable | None = None) -> Callable[[dict], str]:
    """Run the training pipeline here, in-process, under the lock; the run directory is the id."""

    def start_run(request: dict) -> str:
        from pipelines import local_runner

        with holding(lock_path):
            run = (execute or local_runner.execute)(settings)
        return str(run.directory)

    return start_run


# --- the trigger -------------------------------------------------------------------------------

def guarded_trigger(settings: Settings, *, client=None, audit=None, clock: Callable[[], float] = time.time,
                    state_path: str | None = None, lock_path: Path | None = None,
                    interactive: bool = False) -> GuardedTrigger:
    """The env's GuardedTrigger: the published training pipeline on a cluster, the local runner
    here (with `flywheel run`'s progress and summary when `interactive`); every decision audited
    in the env's MLflow experiment."""
    from monitoring.audit import mlflow_audit

    target = kfp_target(settings)
    if target is None:
        from pipelines.local_runner import run_local

        lock = lock_path or PIPELINE_ROOT / LOCK_FILE
        # Interactive: the run's progress and summary as `flywheel run` shows them (its champion is
        # already smoke-tested by the run's deploy task: no second round of predictions).
        execute = (lambda s: run_local(s, predictions=False)) if interactive else None
        start, in_flight = local_start_run(settings, lock, execute=execute), local_runs_in_flight(lock)
    else:
        start = lambda request: kfp_api.start_published_run(target, request, client=client)
        in_flight = lambda: kfp_api.published_runs_in_flight(target, client=client)
    return GuardedTrigger(settings.retraining, settings.env, start_run=start, runs_in_flight=in_flight,
                          audit=audit or mlflow_audit(settings.mlflow), clock=clock,
                          state_path=state_path or state_uri(settings))
