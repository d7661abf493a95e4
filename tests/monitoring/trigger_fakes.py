"""A fake orchestrator's runs, a clock to move, and a GuardedTrigger over them: what the trigger's
guard, state and audit tests (and the retraining tests on the fake KFP API) share."""
from monitoring.trigger import GuardedTrigger
from specs import RetrainingSpec

REASONS = ["age: PSI 0.412 > 0.2", "prediction drift: score PSI 0.31 > 0.2"]


class Clock:
    """The trigger's clock, moved by hand."""

    def __init__(self, now: float = 1_750_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, minutes: float) -> None:
        self.now += minutes * 60


class Runs:
    """start_run and runs_in_flight of a fake orchestrator: started runs stay in flight until ended."""

    def __init__(self):
        self.started: list[dict] = []
        self.in_flight: list[dict] = []

    def start(self, request: dict) -> str:
        run_id = f"run-{len(self.started) + 1}"
        self.started.append(request)
        self.in_flight.append({"run_id": run_id, "state": "RUNNING"})
        return run_id

    def end_all(self) -> None:
        self.in_flight.clear()


def make_trigger(tmp_path, runs: Runs, clock: Clock, audit=None, **spec) -> GuardedTrigger:
    decisions = [] if audit is None else None
    trigger = GuardedTrigger(RetrainingSpec(**{"cooldown_minutes": 60, **spec}), "staging", start_run=runs.start,
                             runs_in_flight=lambda: list(runs.in_flight),
                             audit=audit or decisions.append, clock=clock,
                             state_path=str(tmp_path / "state" / "retraining-trigger.json"))
    trigger.decisions = decisions
    return trigger
