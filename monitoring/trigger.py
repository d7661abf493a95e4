"""The guarded retraining trigger: a drift decision, an alert or a person asks for a retraining run;
the guard says whether one starts.

KFP has no experiment-level concurrency limit, and drift alerts come in storms (every window of a
shifted population breaches, Alertmanager repeats itself), so the guard refuses to start a run

1. when `retraining.trigger_on_drift` is false (for drift and alert requests; a manual one is a
   person's decision and passes this guard, not the others),
2. for a dedup key that already started a run (the same alert or window seen again),
3. within `retraining.cooldown_minutes` of the last run it started,
4. while a retraining run is in flight (`runs_in_flight()` lists the ones not ended), or while
   another trigger is starting one (a claim in the state file, which expires after
   `CLAIM_SECONDS` should that trigger die).

What it does not know it injects: `start_run(request) -> run id` starts the run (on a cluster the
env's published training pipeline, `gateways.kfp_api.start_published_run`; on this machine the
local runner, `pipelines/retrain.py`), `runs_in_flight()` lists the runs not ended,
`audit(decision)` records every decision, started or not (`monitoring.audit`: an MLflow run).
Its state (last start, handled keys, a claim) is a small JSON file at any storage URI
(`storage.write_atomic`), so it survives restarts and, on an object store, pod moves. A local
state file is also locked (flock) while it is read and written, so triggers in two processes on
one machine do not both start a run.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator

import storage
from specs import RetrainingSpec, TrackingSpec

SOURCES = ("drift", "alert", "manual")
STATE_FILE = "retraining-trigger.json"
DEFAULT_STATE = f"runs/monitoring/{STATE_FILE}"
CLAIM_SECONDS = 600.0  # a claim older than this belongs to a trigger that died while starting its run
KEEP_KEYS = 500  # handled dedup keys remembered (the oldest are forgotten first)


def state_uri(root: str) -> str:
    """Where a trigger keeps its state: beside the sink's windows under `root` (an object store on a
    cluster, so the monitoring pipeline's pods and the monitor service share it)."""
    return storage.join(root, STATE_FILE)


class GuardedTrigger:
    """Starts at most one retraining run at a time, never twice for one key, never in a storm.

    Args:
        spec: The env's retraining section (trigger_on_drift, cooldown_minutes).
        env: The environment's name, recorded with each decision.
        start_run: Starts a retraining run for a request dict (reasons, source, dedup_key, env)
            and returns its id; an exception means no run started.
        runs_in_flight: The retraining runs that have not ended (an empty list: none).
        audit: Records a decision dict; a failure to record is noted in the decision, not raised.
        clock: Seconds since the epoch.
        state_path: Storage URI of the trigger's JSON state.
    """

    def __init__(self, spec: RetrainingSpec, env: str, start_run: Callable[[dict], str],
                 runs_in_flight: Callable[[], list], audit: Callable[[dict], None],
                 clock: Callable[[], float] = time.time, state_path: str = DEFAULT_STATE):
        self.spec, self.env = spec, env
        self.start_run, self.runs_in_flight, self.audit = start_run, runs_in_flight, audit
        self.clock, self.state_path = clock, state_path
        self._lock = threading.Lock()

    # -- state ----------------------------------------------------------------------------------

    def state(self) -> dict:
        """The persisted state: last_started_at, last_run_id, handled {key: {at, run_id}}, claim."""
        if not storage.exists(self.state_path):
            return {"handled": {}}
        with storage.open_uri(self.state_path, "rb") as handle:
            data = json.loads(handle.read() or b"{}")
        data.setdefault("handled", {})
        return data

    def _save(self, state: dict) -> None:
        handled = state.get("handled", {})
        if len(handled) > KEEP_KEYS:
            newest = sorted(handled.items(), key=lambda kv: kv[1].get("at", 0))[-KEEP_KEYS:]
            state["handled"] = dict(newest)
        storage.write_atomic(self.state_path, json.dumps(state, indent=1, sort_keys=True).encode())

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """This process's lock, and for a local state file an flock beside it."""
        with self._lock:
            fs, path = storage.filesystem(self.state_path)
            if not storage.is_local(fs):
                yield
                return
            import fcntl

            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(f"{path}.lock", "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    # -- the guard ------------------------------------------------------------------------------

    def _refusal(self, state: dict, source: str, dedup_key: str, now: float) -> tuple[str, str] | None:
        """(guard, why) for the first guard that refuses, None when a run may start."""
        if source != "manual" and not self.spec.trigger_on_drift:
            return "disabled", f"retraining.trigger_on_drift is false for {self.env}: {source} does not retrain"
        handled = state["handled"].get(dedup_key)
        if handled:
            return "duplicate", (f"dedup key {dedup_key!r} already started run {handled.get('run_id')} "
                                 f"at {_when(handled.get('at'))}")
        claim = state.get("claim")
        if claim and now - float(claim.get("at", 0)) < CLAIM_SECONDS:
            return "in_flight", (f"another trigger is starting a run (key {claim.get('dedup_key')!r}, "
                                 f"since {_when(claim.get('at'))})")
        last = state.get("last_started_at")
        cooldown = self.spec.cooldown_minutes * 60
        if last is not None and now - float(last) < cooldown:
            left = (cooldown - (now - float(last))) / 60
            return "cooldown", (f"cool-down: run {state.get('last_run_id')} started at {_when(last)}, "
                                f"{self.spec.cooldown_minutes} min cool-down, {left:.0f} min left")
        return None

    def fire(self, reasons: list[str], source: str, dedup_key: str) -> dict:
        """Start a retraining run unless a guard refuses; the decision, audited either way.

        Returns:
            {started, run_id, why, guard (None when started: disabled, duplicate, cooldown,
            in_flight, error), source, reasons, dedup_key, env, at, in_flight}; `audit_error`
            when the audit could not be written.
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if not dedup_key:
            raise ValueError("a dedup key is required (the alert's fingerprint, the window's end, ...)")
        reasons = [str(r) for r in reasons]
        now = self.clock()
        decision = {"started": False, "run_id": None, "why": "", "guard": None, "source": source,
                    "reasons": reasons, "dedup_key": dedup_key, "env": self.env, "at": now, "in_flight": []}
        with self._guarded():
            state = self.state()
            refusal = self._refusal(state, source, dedup_key, now)
            if refusal is None:
                try:
                    decision["in_flight"] = list(self.runs_in_flight())
                except Exception as err:  # fail closed: no listing, no new run
                    refusal = "error", f"cannot list the runs in flight: {_one_line(err)}"
                else:
                    if decision["in_flight"]:
                        names = ", ".join(str(r.get("run_id", r) if isinstance(r, dict) else r)
                                          for r in decision["in_flight"][:3])
                        refusal = "in_flight", f"{len(decision['in_flight'])} retraining run(s) in flight: {names}"
            if refusal is None:
                # Claimed before starting, so the lock is not held while a (local) run goes on.
                state["claim"] = {"at": now, "dedup_key": dedup_key, "pid": os.getpid()}
                self._save(state)
        if refusal is None:
            request = {"reasons": reasons, "source": source, "dedup_key": dedup_key, "env": self.env}
            try:
                run_id = str(self.start_run(request))
            except Exception as err:
                refusal = "error", f"starting the run failed: {_one_line(err)}"
                run_id = None
            with self._guarded():
                state = self.state()
                state.pop("claim", None)
                if run_id is not None:
                    state.update(last_started_at=now, last_run_id=run_id, last_source=source)
                    state["handled"][dedup_key] = {"at": now, "run_id": run_id, "source": source}
                self._save(state)
            if run_id is not None:
                decision.update(started=True, run_id=run_id, why=f"started run {run_id}: " + "; ".join(reasons))
        if refusal is not None:
            decision["guard"], decision["why"] = refusal
        try:
            self.audit(dict(decision))
        except Exception as err:  # the decision stands; say that its record is missing
            decision["audit_error"] = _one_line(err)
        return decision


def _when(at) -> str:
    if at is None:
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(at)))


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:400]


# --- a trigger from a rendered file (the monitor service's) ----------------------------------------

def trigger_from_file(path: str) -> GuardedTrigger | None:
    """The GuardedTrigger a rendered monitor config describes, or None when it names no KFP host.

    The file is what `flywheel monitor-config --env ENV` writes (YAML or JSON, no secrets):
    `env`, `retraining` (the env's retraining section), `kfp` (the `gateways.kfp_api.KfpTarget` of
    the env's training pipeline), `sink_root` (where the trigger keeps its state, beside the
    windows) and `tracking` (the MLflow experiment every decision is audited in). The trigger
    starts the env's published training pipeline, as every other retraining entry point does.
    An environment without a KFP host runs on one machine, where retraining is `flywheel monitor
    --trigger`'s: a monitor service never runs a pipeline in-process, so there is no trigger.
    """
    import yaml

    from gateways import kfp_api
    from monitoring.audit import mlflow_audit

    try:
        with storage.open_uri(path, "rb") as handle:
            data = yaml.safe_load(handle.read()) or {}  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"monitor config {path}: {_one_line(err)}") from None
    missing = [key for key in ("env", "retraining", "sink_root", "tracking") if key not in data]
    if missing:
        raise ValueError(f"monitor config {path}: missing {', '.join(missing)}; "
                         "render it with `flywheel monitor-config --env ENV`")
    if not (data.get("kfp") or {}).get("host"):
        return None
    target = kfp_api.KfpTarget.from_dict(data["kfp"])
    return GuardedTrigger(RetrainingSpec.model_validate(data["retraining"]), data["env"],
                          start_run=lambda request: kfp_api.start_published_run(target, request),
                          runs_in_flight=lambda: kfp_api.published_runs_in_flight(target),
                          audit=mlflow_audit(TrackingSpec.model_validate(data["tracking"])),
                          state_path=state_uri(data["sink_root"]))
