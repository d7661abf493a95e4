"""The whole lifecycle on the embedded local environment, end to end, as `make run` runs it."""
import json
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_settings
from pipelines.local_runner import execute, summary_rows
from stages.dataset import ReferenceTask
from storage.tables import write_table

FAST = {
    "dataset": {"rows": 3000},
    "training": {"hyperparameters": {"epochs": 3}},
    "tuning": {"trials": 2, "parallelism": 2, "epochs_per_trial": 1},
    "evaluation": {"thresholds": {"roc_auc": 0.6}},  # 3k rows: the gate's bar, not the model's, is under test
}


def assert_outputs_exist(run):
    for task in run.tasks.values():
        for name, artifact in task.artifacts.items():
            path = Path(artifact["uri"])
            if name in ("metrics", "classification"):  # kfp.local keeps these as metadata only
                continue
            assert path.exists() and (path.is_file() and path.stat().st_size > 0 or any(path.iterdir())), \
                f"{task.name}.{name} was not written"


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    """Two runs in a row against one MLflow store: the second candidate meets the first champion."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    settings = load_settings("local", overrides=FAST | {"mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}})
    first = execute(settings, pipeline_root=tmp / "root")
    second = execute(settings, pipeline_root=tmp / "root")
    return settings, first, second


@pytest.mark.slow
def test_every_stage_runs_and_leaves_its_outputs(lifecycle):
    _, first, _ = lifecycle
    assert {"ingest-op", "validate-op", "split-op", "propose-op", "select-op", "train-op", "evaluate-op",
            "gate-op", "register-op"} <= set(first.tasks)
    assert sum("/trial-op" in name for name in first.tasks) == 2, "one task per tuning trial"
    assert_outputs_exist(first)
    model = first.artifact("train-op", "model")["metadata"]
    assert model["data_hash"] == first.artifact("split-op", "train_data")["metadata"]["content_hash"]
    assert model["world_size"] == 2 and model["backend"] == "torchrun"


@pytest.mark.slow
def test_model_beats_the_trivial_baseline(lifecycle):
    _, first, _ = lifecycle
    metrics = first.artifact("evaluate-op", "metrics")["metadata"]
    assert metrics["roc_auc"] > 0.65  # a constant predictor scores 0.5
    positive_rate = first.artifact("split-op", "test_data")["metadata"]["positive_rate"]
    assert metrics["brier"] < positive_rate * (1 - positive_rate), "better calibrated than the prior"


@pytest.mark.slow
def test_first_run_promotes_and_second_is_judged_against_the_champion(lifecycle):
    settings, first, second = lifecycle
    assert first.tasks["gate-op"].parameters["Output"] == "promote"
    assert "no champion" in first.artifact("gate-op", "report")["metadata"]["reason"]
    assert first.tasks["register-op"].parameters["version"] == "1"
    # The promoted champion is deployed: served on loopback and smoke-tested; the summary says so
    live = first.tasks["deploy-op"].parameters["Output"]
    assert live["deployer"] == "local" and live["live"] == f"{settings.mlflow.registered_model} v1"
    assert "smoke test passed" in live["detail"]
    assert any(label == "deployed" and "v1 served" in value for label, value in summary_rows(first))
    gate = second.artifact("gate-op", "report")["metadata"]
    assert gate["champion_version"] == "1"
    assert isinstance(gate["champion_roc_auc"], float)
    if second.tasks["gate-op"].parameters["Output"] == "reject":  # nothing new to deploy
        assert "deploy-op" not in second.tasks


@pytest.mark.slow
def test_the_summary_shows_the_deploy_steps_answers_without_serving_again(lifecycle, monkeypatch):
    from rich.console import Console

    from pipelines.local_runner import show_predictions

    settings, first, _ = lifecycle
    monkeypatch.setattr("deployment.loopback.LocalServing.start",
                        lambda *a, **k: pytest.fail("the deploy step's smoke test is shown, nothing is served again"))
    console = Console(record=True, width=200)
    show_predictions(settings, console, first)
    text = console.export_text()
    smoke = first.tasks["deploy-op"].parameters["Output"]["smoke"]
    assert f"v1: the deploy step's smoke test at {first.tasks['deploy-op'].parameters['Output']['url']}" in text
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == len(smoke["records"]) >= 3
    for row, p1 in zip(rows, smoke["v1"]["probabilities"]):
        v1_label, v1_p, v2_label, v2_p = row[-4:]
        assert v1_label == v2_label and v1_label in ("0", "1") and v1_p == v2_p == f"{p1:.3f}"


@pytest.mark.slow
def test_a_user_csv_named_in_config_trains_and_evaluates_with_no_code_change(config_dir, tmp_path):
    frame = ReferenceTask(rows=5000, seed=21).generate()
    frame = frame.rename(columns={"default": "defaulted", "customer_id": "account"}).drop(columns=["region"])
    source = write_table(frame, tmp_path / "accounts.csv")
    local = yaml.safe_load((config_dir / "local.yaml").read_text())
    local["dataset"] = {
        "source": "file", "uri": str(source), "target": "defaulted", "id_column": "account",
        "expectation_suite": None,
        "features": {"numeric": ["age", "income", "utilization", "late_payments", "debt_to_income"],
                     "categorical": ["employment", "housing"]},
    }
    local["evaluation"] = {"slice_column": "housing"}
    local["tuning"] = {"strategy": "successive_halving", "trials": 3, "parallelism": 2, "epochs_per_trial": 1,
                       "search_space": {"hidden": [16, 32, 64]}}
    local["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model": "accounts"}
    local["training"]["hyperparameters"] = {"epochs": 5}
    (config_dir / "local.yaml").write_text(yaml.safe_dump(local))

    run = execute(load_settings("local", config_dir), pipeline_root=tmp_path / "root")
    rung1 = [t for name, t in run.tasks.items() if name.startswith("for-loop-1") and "/trial-op" in name]
    rung2 = [t for name, t in run.tasks.items() if name.startswith("for-loop-2") and "/trial-op" in name]
    assert len(rung1) == 3 and len(rung2) == 1, "successive halving keeps the best third for rung 2"
    assert rung2[0].parameters["Output"]["epochs"] == 3 and rung1[0].parameters["Output"]["epochs"] == 1
    best = run.tasks["select-op"].parameters["best"]
    assert best["trial"] == rung2[0].parameters["Output"]["trial"]
    best_of_rung1 = max(rung1, key=lambda t: t.parameters["Output"]["val_roc_auc"])
    assert best["trial"] == best_of_rung1.parameters["Output"]["trial"]
    assert run.artifact("ingest-op", "dataset")["metadata"]["format"] == "csv"
    assert run.artifact("evaluate-op", "metrics")["metadata"]["roc_auc"] > 0.65
    model_meta = run.artifact("train-op", "model")["metadata"]
    assert model_meta["hyperparameters"]["epochs"] == 5
    assert_outputs_exist(run)


@pytest.mark.slow
def test_bad_data_stops_the_pipeline_before_training_with_the_reason_on_record(tmp_path):
    frame = ReferenceTask(rows=2000, seed=8).generate()
    frame.loc[frame.index[:400], "employment"] = "astronaut"  # unknown category, far above any tolerance
    source = write_table(frame, tmp_path / "customers.csv")
    # the reference task's own suite (a file dataset gets a schema-only suite unless it names one)
    settings = load_settings("local", overrides=FAST | {"dataset": {"source": "file", "uri": str(source),
                                                                    "expectation_suite": "credit_default"}})
    root = tmp_path / "root"
    with pytest.raises(RuntimeError, match="validate-op"):
        execute(settings, pipeline_root=root)
    (run_dir,) = root.iterdir()
    ran = {p.name for p in run_dir.iterdir()}
    assert not {"split-op", "train-op", "evaluate-op"} & ran, "nothing after validate ran"
    result = json.loads((run_dir / "validate-op" / "result.json").read_text())
    failed = json.dumps(result)
    assert "employment" in failed and "astronaut" in failed
    assert "expect_column_values_to_be_in_set" in failed
    assert "astronaut" in (run_dir / "validate-op" / "report.html").read_text(), "a report a browser opens"
