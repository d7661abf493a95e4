"""The guarded retraining trigger's guards: the storm guard (cool-down), one run in flight, dedup,
who may trigger what, and a start that fails or runs that cannot be listed starting nothing."""
import threading

from monitoring.trigger import GuardedTrigger
from specs import RetrainingSpec
from tests.monitoring.trigger_fakes import REASONS, Clock, Runs, make_trigger


def test_a_second_drift_inside_the_cooldown_starts_no_second_run(tmp_path):
    runs, clock = Runs(), Clock()
    trigger = make_trigger(tmp_path, runs, clock)
    # Given a drift decision that started a run, which then finished
    first = trigger.fire(REASONS, "drift", "drift/staging/v3/window-1")
    assert first["started"] and first["run_id"] == "run-1" and first["guard"] is None
    runs.end_all()
    # When the next window drifts too, 10 minutes later (cool-down 60 min)
    second = trigger.fire(REASONS, "drift", "drift/staging/v3/window-2")
    # Then no second run starts, and the decision says why
    assert not second["started"] and second["guard"] == "cooldown" and second["run_id"] is None
    assert "60 min cool-down" in second["why"] and "run-1" in second["why"]
    # ... and an alert storm inside the cool-down is refused the same way
    clock.advance(30)
    assert trigger.fire(["alert FlywheelFeatureDrift"], "alert", "alert/abc@t")["guard"] == "cooldown"
    assert len(runs.started) == 1
    # Once the cool-down has passed, a new drift starts a run again
    clock.advance(31)
    third = trigger.fire(REASONS, "drift", "drift/staging/v3/window-3")
    assert third["started"] and third["run_id"] == "run-2"


def test_at_most_one_retraining_run_in_flight(tmp_path):
    runs, clock = Runs(), Clock()
    trigger = make_trigger(tmp_path, runs, clock, cooldown_minutes=0)
    assert trigger.fire(REASONS, "drift", "k1")["started"]
    # While run-1 is in flight, no cool-down at all: still refused
    clock.advance(5)
    refused = trigger.fire(REASONS, "alert", "k2")
    assert (refused["started"], refused["guard"]) == (False, "in_flight")
    assert refused["in_flight"] == [{"run_id": "run-1", "state": "RUNNING"}] and "run-1" in refused["why"]
    runs.end_all()
    assert trigger.fire(REASONS, "alert", "k2")["started"]
    assert [r["dedup_key"] for r in runs.started] == ["k1", "k2"]


def test_two_triggers_at_once_start_one_run(tmp_path):
    # Given a start_run that takes a while (a KFP call, or the local runner), and two triggers on one state
    runs, clock = Runs(), Clock()
    entered, release = threading.Event(), threading.Event()
    slow = Runs()

    def start(request):
        entered.set()
        release.wait(5)
        return slow.start(request)

    a = GuardedTrigger(RetrainingSpec(cooldown_minutes=0), "staging", start_run=start,
                       runs_in_flight=lambda: [], audit=lambda d: None, clock=clock,
                       state_path=str(tmp_path / "state.json"))
    b = GuardedTrigger(RetrainingSpec(cooldown_minutes=0), "staging", start_run=runs.start,
                       runs_in_flight=lambda: [], audit=lambda d: None, clock=clock,
                       state_path=str(tmp_path / "state.json"))
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault("a", a.fire(REASONS, "drift", "k-a")))
    thread.start()
    assert entered.wait(5)
    # When the second fires while the first is still starting its run
    results["b"] = b.fire(REASONS, "alert", "k-b")
    release.set()
    thread.join(5)
    # Then the second is refused: the first one's claim counts as a run in flight
    assert results["a"]["started"] and not results["b"]["started"]
    assert results["b"]["guard"] == "in_flight" and "another trigger is starting a run" in results["b"]["why"]
    assert len(slow.started) == 1 and runs.started == []


def test_a_handled_dedup_key_starts_nothing(tmp_path):
    runs, clock = Runs(), Clock()
    trigger = make_trigger(tmp_path, runs, clock, cooldown_minutes=0)
    assert trigger.fire(REASONS, "alert", "alert/fp1@2025-06-15T10:00:00Z")["started"]
    runs.end_all()
    # When Alertmanager repeats the same notification hours later
    clock.advance(240)
    again = trigger.fire(REASONS, "alert", "alert/fp1@2025-06-15T10:00:00Z")
    assert (again["started"], again["guard"]) == (False, "duplicate") and "run-1" in again["why"]
    assert len(runs.started) == 1


def test_trigger_on_drift_off_refuses_drift_and_alerts_not_a_person(tmp_path):
    runs, clock = Runs(), Clock()
    trigger = make_trigger(tmp_path, runs, clock, trigger_on_drift=False)
    for source in ("drift", "alert"):
        refused = trigger.fire(REASONS, source, f"{source}-1")
        assert (refused["started"], refused["guard"]) == (False, "disabled")
        assert "trigger_on_drift is false" in refused["why"]
    assert runs.started == []
    assert trigger.fire(["asked for by hand"], "manual", "manual-1")["started"]


def test_a_failed_start_is_no_start(tmp_path):
    clock = Clock()
    calls = []

    def broken(request):
        calls.append(request)
        if len(calls) == 1:
            raise ConnectionError("KFP at https://kfp is unreachable")
        return "run-ok"

    decisions = []
    trigger = GuardedTrigger(RetrainingSpec(cooldown_minutes=60), "staging", start_run=broken,
                             runs_in_flight=lambda: [], audit=decisions.append, clock=clock,
                             state_path=str(tmp_path / "s.json"))
    failed = trigger.fire(REASONS, "drift", "k1")
    assert (failed["started"], failed["guard"]) == (False, "error") and "unreachable" in failed["why"]
    # No cool-down, no handled key, no leftover claim: the same decision may try again at once
    retried = trigger.fire(REASONS, "drift", "k1")
    assert retried["started"] and retried["run_id"] == "run-ok"
    assert [d["guard"] for d in decisions] == ["error", None]


def test_runs_that_cannot_be_listed_start_nothing(tmp_path):
    runs = Runs()

    def unlistable():
        raise TimeoutError("list_runs timed out")

    trigger = GuardedTrigger(RetrainingSpec(), "staging", start_run=runs.start, runs_in_flight=unlistable,
                             audit=lambda d: None, state_path=str(tmp_path / "s.json"))
    decision = trigger.fire(REASONS, "drift", "k1")
    assert decision["guard"] == "error" and "cannot list the runs in flight" in decision["why"]
    assert runs.started == []
