"""The guarded retraining trigger's state (cool-down, handled dedup keys) survives a restart."""
from tests.monitoring.trigger_fakes import REASONS, Clock, Runs, make_trigger


def test_the_state_survives_a_restart(tmp_path):
    runs, clock = Runs(), Clock()
    make_trigger(tmp_path, runs, clock).fire(REASONS, "drift", "k1")
    runs.end_all()
    # A new trigger (a restarted service, the next monitoring pod) on the same state file
    clock.advance(1)
    restarted = make_trigger(tmp_path, runs, clock)
    assert restarted.fire(REASONS, "drift", "k2")["guard"] == "cooldown"
    assert restarted.fire(REASONS, "drift", "k1")["guard"] == "duplicate"
    state = restarted.state()
    assert state["last_run_id"] == "run-1" and set(state["handled"]) == {"k1"} and "claim" not in state
