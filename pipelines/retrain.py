"""What a retraining trigger starts, per environment: the layer-5 half of `monitoring.trigger`.

- On a cluster, `start_run` compiles the env's training pipeline, uses the stored version with the
  same content hash (uploading one when there is none, as `flywheel schedule` does) and starts a
  run of it in the env's experiment with the env's arguments. KFP v2 runs have no labels, and
  `kfp.Client.run_pipeline` takes no description: the run's name says it was triggered
  (`flywheel-<env>-training retrain <source> <UTC stamp>`) and its description carries the
  reasons and dedup key (`components.kfp_api.start_run`). The training pipeline gets no new
  parameter for them: its signature stays what `flywheel check` compares config with.
  `runs_in_flight` lists the experiment's runs whose names start with `flywheel-<env>-training`
  (submitted, scheduled and triggered ones alike) in state PENDING, RUNNING or PAUSED.
- On this machine, `start_run` runs the training pipeline in-process through the local runner
  (`pipelines.local.execute`) holding a lock file, and returns the run directory;
  `runs_in_flight` says whether that lock is held, by this process or another.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from components import kfp_api
from monitoring import trigger
from monitoring.trigger import GuardedTrigger
from pipelines.config import Settings
from pipelines.kfp_client import (
    _compile,
    _ensure_experiment,
    _ensure_pipeline_id,
    _find_experiment,
    _find_pipeline_id,
    _find_version,
    _quiet,
    _require_host,
    _step,
    content_hash,
    default_registry,
    default_version_name,
    kfp_pipeline_name,
    make_client,
)
from pipelines.local import PIPELINE_ROOT

TRAINING = "training"
LOCK_FILE = "retraining.lock"


def state_uri(settings: Settings) -> str:
    """The trigger's state beside the sink's windows (an object store on a cluster: survives pods)."""
    return trigger.state_uri(settings.monitoring.sink.root)


def kfp_target(settings: Settings) -> dict:
    """What the monitoring pipeline's trigger op needs to start a training run (no nulls: a KFP struct)."""
    target = {"host": settings.kfp.host, "experiment": settings.kfp.experiment,
              "pipeline": kfp_pipeline_name(settings, TRAINING), "namespace": settings.kfp.namespace,
              "pipeline_root": settings.kfp.pipeline_root, "service_account": settings.kfp.service_account}
    return {k: v for k, v in target.items() if v is not None}


# --- on a cluster ------------------------------------------------------------------------------

def cluster_start_run(settings: Settings, client=None, *, registry=None) -> Callable[[dict], str]:
    def start_run(request: dict) -> str:
        host = _require_host(settings)
        kfp = client or make_client(settings)
        reg = registry or default_registry()
        display_name = kfp_pipeline_name(settings, TRAINING)
        with tempfile.TemporaryDirectory(prefix="flywheel-retrain-") as tmp:
            package, arguments = _compile(reg, settings, TRAINING, Path(tmp))
            package_bytes = package.read_bytes()
            with _quiet():
                with _step(f"looking up versions of {display_name!r}", host):
                    pipeline_id = _find_pipeline_id(kfp, settings, display_name)
                    version = _find_version(kfp, pipeline_id, content_hash(package_bytes)) if pipeline_id else None
                if version is None:
                    with _step(f"uploading a version of {display_name!r}", host):
                        pipeline_id = pipeline_id or _ensure_pipeline_id(kfp, settings, TRAINING)
                        version = kfp.upload_pipeline_version(
                            str(package), default_version_name(package_bytes), pipeline_id=pipeline_id,
                            description=f"uploaded by flywheel's retraining trigger for {settings.env}")
        stamp = f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
        with _quiet():
            with _step(f"finding or creating experiment {settings.kfp.experiment!r}", host):
                experiment = _ensure_experiment(kfp, settings)
            with _step(f"starting a retraining run of {display_name!r}", host):
                run = kfp_api.start_run(
                    kfp, experiment_id=experiment.experiment_id, pipeline_id=pipeline_id,
                    version_id=version.pipeline_version_id, name=kfp_api.run_name(display_name, request, stamp),
                    description=kfp_api.run_description(request), params=arguments,
                    pipeline_root=settings.kfp.pipeline_root, service_account=settings.kfp.service_account)
        return run.run_id

    return start_run


def cluster_runs_in_flight(settings: Settings, client=None) -> Callable[[], list]:
    def runs_in_flight() -> list:
        host = _require_host(settings)
        kfp = client or make_client(settings)
        with _quiet(), _step("listing retraining runs in flight", host):
            experiment = _find_experiment(kfp, settings)
            if experiment is None:
                return []
            return kfp_api.runs_in_flight(kfp, experiment.experiment_id, kfp_pipeline_name(settings, TRAINING))

    return runs_in_flight


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
        from pipelines import local

        with holding(lock_path):
            run = (execute or local.execute)(settings)
        return str(run.directory)

    return start_run


# --- the trigger -------------------------------------------------------------------------------

def guarded_trigger(settings: Settings, *, client=None, registry=None, audit=None,
                    clock: Callable[[], float] = time.time, state_path: str | None = None,
                    lock_path: Path | None = None, interactive: bool = False) -> GuardedTrigger:
    """The env's GuardedTrigger: KFP runs on a cluster, the local runner here (with `flywheel run`'s
    progress and summary when `interactive`); every decision audited in the env's MLflow experiment."""
    from monitoring.audit import mlflow_audit

    if settings.embedded:
        from pipelines.local import run_local

        lock = lock_path or PIPELINE_ROOT / LOCK_FILE
        # Interactive: the run's progress and summary as `flywheel run` shows them (its champion is
        # already smoke-tested by the run's deploy task: no second round of predictions).
        execute = (lambda s: run_local(s, predictions=False)) if interactive else None
        start = local_start_run(settings, lock, execute=execute)
        in_flight = local_runs_in_flight(lock)
    else:
        start, in_flight = cluster_start_run(settings, client, registry=registry), cluster_runs_in_flight(settings,
                                                                                                            client)
    return GuardedTrigger(settings.retraining, settings.env, start_run=start, runs_in_flight=in_flight,
                          audit=audit or mlflow_audit(settings.mlflow), clock=clock,
                          state_path=state_path or state_uri(settings))



# --- the monitor service's Alertmanager hook ----------------------------------------------------

ENV_VARIABLE = "FLYWHEEL_ENV"
_TRIGGERS: dict[str, GuardedTrigger] = {}


def alerts(payload: dict) -> dict:
    """The monitor service's retraining-alert trigger for the env named by $FLYWHEEL_ENV:

        python -m monitoring.service --config ENV --trigger pipelines.retrain:alerts

    The alerts' names and summaries become the reasons, their fingerprints and start times the
    dedup key (`monitoring.service.alert_trigger`), and the env's GuardedTrigger decides.
    """
    from monitoring.service import alert_trigger
    from pipelines.config import load_settings

    env = os.environ.get(ENV_VARIABLE)
    if not env:  # never guess: a prod alert must not retrain "local" in-process inside the monitor pod
        raise RuntimeError(f"${ENV_VARIABLE} names no environment; the monitor service sets it from --config ENV")
    if env not in _TRIGGERS:
        _TRIGGERS[env] = guarded_trigger(load_settings(env))
    return alert_trigger(_TRIGGERS[env].fire)(payload)
