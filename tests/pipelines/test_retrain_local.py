"""Retraining on this machine: a local run holds a lock that counts as the run in flight, and the
trigger is refused while it is held."""
from pipelines import retrain
from tests.monitoring.trigger_fakes import REASONS


def test_local_runs_hold_a_lock_that_counts_as_in_flight(tmp_path, small_settings):
    lock = tmp_path / "retraining.lock"
    in_flight = retrain.local_runs_in_flight(lock)
    seen = []

    class Run:
        directory = tmp_path / "local" / "run-1"

    def execute(settings):
        seen.append(in_flight())
        return Run()

    start = retrain.local_start_run(small_settings, lock, execute=execute)
    assert in_flight() == []
    assert start({"reasons": REASONS, "source": "drift", "dedup_key": "k"}) == str(Run.directory)
    # during the run the lock was held (and named this process), afterwards it is free
    (held,) = seen[0]
    assert held["state"] == "RUNNING" and held["lock"] == str(lock) and isinstance(held["pid"], int)
    assert in_flight() == []


def test_a_trigger_is_refused_while_a_local_run_holds_the_lock(tmp_path, small_settings):
    lock = tmp_path / "retraining.lock"
    trigger = retrain.guarded_trigger(small_settings, audit=lambda d: None, lock_path=lock,
                                      state_path=str(tmp_path / "state.json"))
    with retrain.holding(lock):  # `flywheel monitor --trigger` running the pipeline elsewhere
        decision = trigger.fire(REASONS, "drift", "k")
    assert decision["guard"] == "in_flight" and "local pid" in decision["why"]
