"""Every decision of the guarded retraining trigger is audited as an MLflow run, and an audit that
fails does not undo the decision."""
from monitoring.audit import STAGE, mlflow_audit
from tests.monitoring.trigger_fakes import REASONS, Clock, Runs, make_trigger
from tests.support import mlflow_store


def test_every_decision_is_an_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    uri = mlflow_store(tmp_path / "mlflow.db")
    tracking = {"tracking_uri": uri, "experiment": "credit-default-staging", "registered_model": "credit-default"}
    runs, clock = Runs(), Clock()
    trigger = make_trigger(tmp_path, runs, clock, audit=mlflow_audit(tracking))
    decisions = [trigger.fire(REASONS, "drift", "w1")]  # started
    clock.advance(61)
    decisions.append(trigger.fire(REASONS, "drift", "w2"))  # in flight
    runs.end_all()
    decisions.append(trigger.fire(REASONS, "drift", "w3"))  # started
    clock.advance(1)
    decisions.append(trigger.fire(["alert FlywheelFeatureDrift: age"], "alert", "a1"))  # cool-down
    assert [d["guard"] for d in decisions] == [None, "in_flight", None, "cooldown"]
    assert [d.get("audit_error") for d in decisions] == [None] * 4

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("credit-default-staging")
    found = client.search_runs([experiment.experiment_id], f"tags.`flywheel.stage` = '{STAGE}'",
                               order_by=["attributes.start_time ASC"])
    assert len(found) == 4
    by_key = {r.data.params["dedup_key"]: r for r in found}
    started = by_key["w1"]
    assert started.data.tags["flywheel.trigger.started"] == "true"
    assert started.data.tags["flywheel.trigger.run_id"] == "run-1"
    assert started.data.tags["flywheel.trigger.reasons"] == "; ".join(REASONS)
    assert [started.data.params[f"reason_{i}"] for i in range(2)] == REASONS
    assert started.data.params["source"] == "drift" and started.data.metrics["started"] == 1.0
    assert started.data.tags["flywheel.env"] == "staging" and started.info.status == "FINISHED"
    in_flight = by_key["w2"]
    assert in_flight.data.tags["flywheel.trigger.guard"] == "in_flight" and in_flight.data.metrics["started"] == 0
    assert in_flight.data.metrics["runs_in_flight"] == 1
    cooled = by_key["a1"]
    assert cooled.data.tags["flywheel.trigger.guard"] == "cooldown"
    assert cooled.data.params["reason_0"] == "alert FlywheelFeatureDrift: age"
    assert "cool-down" in cooled.data.tags["flywheel.trigger.why"]


def test_an_audit_that_fails_does_not_undo_the_decision(tmp_path):
    def broken(decision):
        raise ConnectionError("mlflow down")

    runs = Runs()
    decision = make_trigger(tmp_path, runs, Clock(), audit=broken).fire(REASONS, "drift", "k")
    assert decision["started"] and "mlflow down" in decision["audit_error"]
