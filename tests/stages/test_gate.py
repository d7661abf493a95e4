"""The champion/challenger gate and the registry: the decision's six cases, then real models
(training.train) judged and registered end to end through a real MLflow SQLite store, a real
`mlflow server` on loopback, and the KFP components through kfp.local."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pytest

from gateways.mlflow_api import mlflow_at
from model.artifact import feature_columns
from model.loader import load_model
from specs import EvaluationSpec
from stages.dataset import REFERENCE_CATEGORICAL, REFERENCE_NUMERIC, ReferenceTask, split
from stages.gate import challenge, decide
from stages.metrics import evaluate
from stages.registry import Champion, input_example, load_champion, register_model
from stages.tracking import log_evaluation
from storage.tables import content_hash, write_table

TARGET = "default"
THRESHOLDS = {"roc_auc": 0.60, "pr_auc": 0.15, "f1": 0.0, "brier": 0.16}
MARGIN = 0.002
# What the pipeline passes the ops: the env's dataset section (the ops validate it as a DatasetSpec)
DATASET_SPEC = {"source": "reference", "target": TARGET,
                "features": {"numeric": REFERENCE_NUMERIC, "categorical": REFERENCE_CATEGORICAL}}
# The gate's evaluation section, as the pipeline passes it to gate_op
SPEC = EvaluationSpec(thresholds=THRESHOLDS, decision_threshold=0.3, slice_column="employment", promotion_margin=MARGIN)


# ---------------------------------------------------------------------------------------------
# decide(): the six cases
# ---------------------------------------------------------------------------------------------


def metrics(roc_auc=0.80, pr_auc=0.40, f1=0.45, brier=0.10):
    return {"roc_auc": roc_auc, "pr_auc": pr_auc, "f1": f1, "brier": brier}


def test_no_champion_yet_promotes_a_candidate_that_passes_thresholds():
    decision = decide(metrics(), None, THRESHOLDS, MARGIN)
    assert decision.promote and decision.label == "promote"
    assert decision.reason.startswith("no champion yet") and "roc_auc 0.8000 >= 0.6" in decision.reason
    assert decision.champion is None


def test_challenger_wins_by_more_than_the_margin():
    decision = decide(metrics(roc_auc=0.805), metrics(roc_auc=0.80), THRESHOLDS, MARGIN)
    assert decision.promote and decision.reason.startswith("challenger wins")
    assert "0.8050 vs champion 0.8000" in decision.reason


def test_champion_wins_when_the_candidate_is_worse():
    decision = decide(metrics(roc_auc=0.78), metrics(roc_auc=0.80), THRESHOLDS, MARGIN)
    assert not decision.promote and decision.label == "reject"
    assert decision.reason.startswith("champion wins") and "gain -0.0200" in decision.reason


@pytest.mark.parametrize("candidate", [0.8015, 0.80, 0.7985, 0.802])
def test_tie_within_margin_keeps_the_champion(candidate):
    decision = decide(metrics(roc_auc=candidate), metrics(roc_auc=0.80), THRESHOLDS, MARGIN)
    assert not decision.promote and decision.reason.startswith("tie within margin")


@pytest.mark.parametrize(
    "candidate, named",
    [
        (metrics(roc_auc=0.55), "roc_auc 0.5500 is below the minimum 0.6"),
        (metrics(pr_auc=0.10), "pr_auc 0.1000 is below the minimum 0.15"),
        (metrics(brier=0.20), "brier 0.2000 is above the maximum 0.16"),  # lower is better
        (metrics(f1=float("nan")), "f1 is missing or not a number"),
    ],
)
def test_candidate_below_absolute_thresholds_is_rejected_even_without_champion(candidate, named):
    for champion in (None, metrics(roc_auc=0.5)):
        decision = decide(candidate, champion, THRESHOLDS, MARGIN)
        assert not decision.promote
        assert decision.reason.startswith("candidate below absolute thresholds") and named in decision.reason


def test_champion_unreadable_is_judged_on_thresholds_alone_and_says_so():
    error = "credit-default v3 could not be loaded: OSError: no model.pt"
    decision = decide(metrics(), None, THRESHOLDS, MARGIN, champion_error=error)
    assert decision.promote and "champion unreadable" in decision.reason and error in decision.reason
    rejected = decide(metrics(roc_auc=0.5), None, THRESHOLDS, MARGIN, champion_error=error)
    assert not rejected.promote and "below absolute thresholds" in rejected.reason


def test_lower_is_better_primary_metric():
    assert decide(metrics(brier=0.090), metrics(brier=0.100), THRESHOLDS, MARGIN, primary="brier").promote
    assert not decide(metrics(brier=0.110), metrics(brier=0.100), THRESHOLDS, MARGIN, primary="brier").promote


# ---------------------------------------------------------------------------------------------
# Real models and a real registry
# ---------------------------------------------------------------------------------------------


def train_model_dir(train_file, model_dir, numeric, categorical, data_hash):
    from specs import Hyperparameters
    from training.train import train

    hyperparameters = Hyperparameters(epochs=6, hidden=32, depth=1, learning_rate=0.01, batch_size=128).model_dump()
    spec = {"dataset": {"target": TARGET, "features": {"numeric": numeric, "categorical": categorical}},
            "hyperparameters": hyperparameters, "lineage": {"data_hash": data_hash}}
    train(train_file, model_dir, spec)
    return model_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The reference task split once, and three real models trained on it: all features (strong),
    two strong features (medium) and two useless ones (weak)."""
    root = tmp_path_factory.mktemp("gate")
    train, test = split(ReferenceTask(rows=6000, seed=11).generate(), 0.3, seed=11)
    write_table(train, root / "train.parquet")
    write_table(test, root / "test.parquet")
    data_hash = content_hash(train)
    models = {
        "strong": train_model_dir(str(root / "train.parquet"), str(root / "strong"), REFERENCE_NUMERIC,
                                  REFERENCE_CATEGORICAL, data_hash),
        "medium": train_model_dir(str(root / "train.parquet"), str(root / "medium"),
                                  ["utilization", "late_payments"], [], data_hash),
        "weak": train_model_dir(str(root / "train.parquet"), str(root / "weak"), ["age"], ["region"], data_hash),
    }
    return {"root": root, "train": train, "test": test, "data_hash": data_hash, "models": models}


def judge(world, name, tracking_uri, registered_model):
    """The gate as gate_op runs it: load the registry's champion, then `challenge` evaluates
    candidate and champion on the same data and decides."""
    champion = load_champion(tracking_uri, registered_model)
    outcome = challenge(load_model(world["models"][name]), champion, world["test"], TARGET, SPEC)
    return outcome.candidate, champion, outcome.decision


def register(world, name, tracking_uri, registered_model, experiment="gate-test"):
    candidate = evaluate(load_model(world["models"][name]), world["test"], TARGET, 0.3)
    run_id = log_evaluation(tracking_uri, experiment, f"evaluate-{name}", {"model": name}, candidate.metrics,
                            {"evaluation.json": candidate.to_dict()}, {"data_hash": world["data_hash"]})
    metadata = load_model(world["models"][name]).metadata
    lineage = {"data_hash": world["data_hash"], "kfp.pipeline_job_id": f"job-{name}", "kfp.task_name": "register-op",
               "env": "local", "evaluation_run_id": run_id}
    example = input_example(world["test"], feature_columns(metadata))
    return register_model(tracking_uri, registered_model, world["models"][name], run_id, lineage, example), run_id


def aliases(tracking_uri, registered_model):
    from mlflow import MlflowClient

    return {k: str(v) for k, v in MlflowClient(tracking_uri).get_registered_model(registered_model).aliases.items()}


def test_the_trained_models_order_as_designed(world):
    """Guards the flows below: strong beats medium by far more than the margin; weak fails the thresholds."""
    auc = {n: evaluate(load_model(d), world["test"], TARGET, 0.3).metrics["roc_auc"]
           for n, d in world["models"].items()}
    assert auc["strong"] > auc["medium"] + 10 * MARGIN and auc["medium"] > THRESHOLDS["roc_auc"] > auc["weak"]


@pytest.mark.slow
def test_flow_through_a_real_sqlite_registry(world, tmp_path):
    uri, name = f"sqlite:///{tmp_path / 'mlflow.db'}", "credit-default"
    # Given an empty registry, the medium model is judged against no champion and promoted
    _, champion, decision = judge(world, "medium", uri, name)
    assert champion is None and decision.promote and decision.reason.startswith("no champion yet")
    v1, run1 = register(world, "medium", uri, name)
    assert v1 == "1" and aliases(uri, name) == {"champion": "1"}

    # When the strong model is judged against that champion, Then it wins and takes the alias;
    # the old champion stays reachable as previous-champion
    _, champion, decision = judge(world, "strong", uri, name)
    assert champion.readable and champion.version["version"] == "1"
    assert decision.promote and decision.reason.startswith("challenger wins")
    v2, _ = register(world, "strong", uri, name)
    assert aliases(uri, name) == {"champion": v2, "previous-champion": v1}

    # And the medium model now loses to the champion, the same model ties, the weak one fails thresholds
    assert decide(*_metrics_pair(world, "medium", uri, name)).reason.startswith("champion wins")
    assert judge(world, "strong", uri, name)[2].reason.startswith("tie within margin")
    assert judge(world, "weak", uri, name)[2].reason.startswith("candidate below absolute thresholds: roc_auc")

    # And version 1 carries its lineage, lives in its evaluation run, and its pyfunc predicts
    # exactly what the model directory does
    from mlflow import MlflowClient

    version = MlflowClient(uri).get_model_version(name, v1)
    assert version.run_id == run1
    assert version.tags["data_hash"] == world["data_hash"] and version.tags["kfp.pipeline_job_id"] == "job-medium"
    assert MlflowClient(uri).get_model_version(name, v2).tags["previous_champion"] == v1
    previous = load_champion(uri, name, alias="previous-champion")
    direct = load_model(world["models"]["medium"]).predict_proba(world["test"])
    np.testing.assert_allclose(previous.model.predict_proba(world["test"]), direct, rtol=1e-6)


def _metrics_pair(world, name, uri, registered_model):
    test = world["test"]
    candidate = evaluate(load_model(world["models"][name]), test, TARGET, 0.3).metrics
    champion = evaluate(load_champion(uri, registered_model).model, test, TARGET, 0.3).metrics
    return candidate, champion, THRESHOLDS, MARGIN


@pytest.mark.slow
def test_unreadable_champion_is_reported_and_replaced(world, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    uri, name = f"sqlite:///{tmp_path / 'mlflow.db'}", "credit-default"
    # Given a champion whose stored artifacts have been lost
    v1, _ = register(world, "medium", uri, name)
    source = MlflowClient(uri).get_model_version(name, v1).source  # models:/m-...
    with mlflow_at(uri):
        location = mlflow.get_logged_model(source.removeprefix("models:/")).artifact_location
    shutil.rmtree(location.removeprefix("file://"))
    # When the gate looks for it
    _, champion, decision = judge(world, "strong", uri, name)
    # Then it is found but unreadable, and the candidate is promoted on thresholds with the reason saying so
    assert champion is not None and not champion.readable and champion.model is None
    assert f"{name} v{v1} could not be loaded" in champion.error
    assert decision.promote and decision.reason.startswith("champion unreadable") and champion.error in decision.reason
    # And registering the candidate keeps the broken version under previous-champion
    v2, _ = register(world, "strong", uri, name)
    assert aliases(uri, name) == {"champion": v2, "previous-champion": v1}


def test_challenge_scores_the_champion_on_the_candidates_data_and_names_one_that_cannot(world):
    """gate_op's champion policy as a plain function: the champion is scored on the same rows with
    the same threshold and slices; an unreadable champion, or one that cannot score this data,
    is named in the reason and the candidate is judged on the absolute thresholds alone."""
    test, info = world["test"], {"name": "credit-default", "version": "3"}
    strong, medium, weak = (load_model(world["models"][n]) for n in ("strong", "medium", "weak"))
    # Given no champion, Then the candidate is promoted on the thresholds and no champion is reported
    alone = challenge(strong, None, test, TARGET, SPEC)
    assert alone.decision.promote and alone.decision.reason.startswith("no champion yet")
    assert alone.champion is None and (alone.champion_label, alone.champion_version) == ("", "")
    assert alone.candidate.metrics == pytest.approx(evaluate(strong, test, TARGET, 0.3, "employment").metrics)
    # Given a readable champion, Then it is scored exactly as the candidate is, and the better one wins
    outcome = challenge(strong, Champion(info, medium), test, TARGET, SPEC)
    expected = evaluate(medium, test, TARGET, 0.3, "employment")
    assert outcome.champion.metrics == pytest.approx(expected.metrics)
    assert [s["value"] for s in outcome.champion.slices] == [s["value"] for s in expected.slices]
    assert outcome.decision.reason.startswith("challenger wins")
    assert (outcome.champion_label, outcome.champion_version) == ("credit-default v3", "3")
    assert not challenge(medium, Champion(info, strong), test, TARGET, SPEC).decision.promote
    # Given an unreadable champion, Then its error is the reason's and the candidate is judged on thresholds
    error = "credit-default v3 could not be loaded: OSError: no model.pt"
    broken = challenge(strong, Champion(info, None, error), test, TARGET, SPEC)
    assert broken.champion is None and broken.champion_version == "3"
    assert broken.decision.promote and broken.decision.reason.startswith("champion unreadable")
    assert error in broken.decision.reason
    # Given a champion that needs a column the test data lacks, Then it "could not score" the data:
    # judged as unreadable, so a candidate that passes the thresholds is promoted and one below is not
    without_region = test.drop(columns=["region"])
    cannot = challenge(medium, Champion(info, weak), without_region, TARGET, SPEC)
    assert cannot.champion is None
    assert cannot.decision.promote and cannot.decision.reason.startswith("champion unreadable")
    assert "credit-default v3 could not score the test data: ValueError" in cannot.decision.reason
    assert "region" in cannot.decision.reason
    below = challenge(medium, Champion(info, weak), without_region, TARGET,
                      SPEC.model_copy(update={"thresholds": SPEC.thresholds.model_copy(update={"roc_auc": 0.99})}))
    assert not below.decision.promote and below.decision.reason.startswith("candidate below absolute thresholds")
    # And only the thresholds the spec sets are checked
    unset = SPEC.model_copy(update={"thresholds": SPEC.thresholds.model_copy(
        update={"roc_auc": None, "pr_auc": None, "f1": None, "brier": None})})
    assert "none set" in challenge(weak, None, test, TARGET, unset).decision.reason


@pytest.mark.slow
def test_registered_champion_that_cannot_score_the_test_data_is_reported(world, tmp_path):
    uri, name = f"sqlite:///{tmp_path / 'mlflow.db'}", "credit-default"
    # Given a registered champion (a models-from-code pyfunc) that needs the region column
    v1, _ = register(world, "weak", uri, name)
    champion = load_champion(uri, name)
    assert champion.readable
    # When the gate's test data lacks that column
    outcome = challenge(load_model(world["models"]["medium"]), champion, world["test"].drop(columns=["region"]),
                        TARGET, SPEC)
    # Then the champion is reported as unable to score it, and the candidate is judged on thresholds
    assert outcome.champion is None and outcome.champion_version == v1
    assert outcome.decision.promote and outcome.decision.reason.startswith("champion unreadable")
    assert f"{name} v{v1} could not score the test data" in outcome.decision.reason


def test_unreachable_registry_raises_instead_of_deciding(monkeypatch):
    # Given a tracking URI where nothing listens (and no retries, to fail fast)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow.exceptions import MlflowException

    # When the gate asks for the champion, Then it fails loudly: neither "no champion" nor "unreadable"
    with pytest.raises(MlflowException, match="failed with exception"):
        load_champion(f"http://127.0.0.1:{free_port()}", "credit-default")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback (SQLite + proxied artifacts), stopped after the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # The server writes through its own copy of the descriptor, so ours can close once it has started.
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                   env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}: "
                            f"{(root / 'server.log').read_text()[-800:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy within 60 s: {(root / 'server.log').read_text()[-800:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_flow_through_a_real_mlflow_server(world, mlflow_server):
    uri, name = mlflow_server, "credit-default"
    # Given no champion on the server, the medium model is promoted and registered
    _, champion, decision = judge(world, "medium", uri, name)
    assert champion is None and decision.promote
    v1, _ = register(world, "medium", uri, name)
    # When the strong model is judged against the champion the server serves
    _, champion, decision = judge(world, "strong", uri, name)
    # Then the champion came back through the server's artifact proxy and lost
    assert champion.readable and champion.version["version"] == v1
    assert decision.promote and decision.reason.startswith("challenger wins")
    v2, _ = register(world, "strong", uri, name)
    assert aliases(uri, name) == {"champion": v2, "previous-champion": v1}
    assert load_champion(uri, name).version["tags"]["data_hash"] == world["data_hash"]


# ---------------------------------------------------------------------------------------------
# gate_op and register_op through kfp.local
# ---------------------------------------------------------------------------------------------


def _executor_outputs(root) -> dict[str, dict]:
    found = {}
    for path in glob.glob(os.path.join(str(root), "**", "executor_output.json"), recursive=True):
        with open(path) as handle:
            found[os.path.relpath(os.path.dirname(path), str(root))] = json.load(handle)
    return found


@pytest.mark.slow
def test_evaluate_gate_register_through_kfp_local(world, tmp_path):
    from kfp import dsl, local

    from components.evaluate import evaluate_op, gate_op, register_op
    from components.factory import component

    tracking = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "gate-kfp",
                "registered_model": "credit-default-kfp"}
    evaluation_spec = {"thresholds": THRESHOLDS, "decision_threshold": 0.3, "slice_column": "employment",
                       "promotion_margin": MARGIN}
    evaluate_component, gate, register_component = (component(fn, None) for fn in (evaluate_op, gate_op, register_op))

    @dsl.pipeline(name="gate-and-register")
    def pipeline(model_uri: str, data_uri: str):
        model = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model, reimport=True)
        test_data = dsl.importer(artifact_uri=data_uri, artifact_class=dsl.Dataset, reimport=True)
        evaluated = evaluate_component(model=model.output, test_data=test_data.output, dataset_spec=DATASET_SPEC,
                                       evaluation_spec=evaluation_spec, tracking=tracking)
        decided = gate(model=model.output, test_data=test_data.output, dataset_spec=DATASET_SPEC,
                       evaluation_spec=evaluation_spec, tracking=tracking)
        with dsl.If(decided.outputs["Output"] == "promote"):
            register_component(model=model.output, test_data=test_data.output, tracking=tracking, env="local",
                               evaluation_run_id=evaluated.outputs["run_id"],
                               pipeline_job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                               pipeline_job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                               pipeline_task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
                               pipeline_task_id=dsl.PIPELINE_TASK_ID_PLACEHOLDER)

    def run(model_name, root):
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / root),
                   workspace_root=str(tmp_path / "ws"))
        pipeline(model_uri=world["models"][model_name], data_uri=str(world["root"] / "test.parquet"))
        outputs = _executor_outputs(tmp_path / root)
        return {name: next((v for k, v in outputs.items() if f"{name}-op" in k), None)
                for name in ("evaluate", "gate", "register")}

    # Given an empty registry, When the medium model goes through evaluate -> gate -> register
    first = run("medium", "run1")
    # Then the gate promotes it and it is registered as version 1 inside its evaluation run,
    # with the KFP run's identity (placeholders resolved) in its lineage
    assert first["gate"]["parameterValues"]["Output"] == "promote"
    gate_meta = first["gate"]["artifacts"]["report"]["artifacts"][0]["metadata"]
    assert gate_meta["reason"].startswith("no champion yet") and gate_meta["champion_version"] == ""
    assert first["register"]["parameterValues"]["version"] == "1"
    champion = load_champion(tracking["tracking_uri"], tracking["registered_model"])
    assert champion.version["run_id"] == first["evaluate"]["parameterValues"]["run_id"]
    tags = champion.version["tags"]
    assert tags["env"] == "local" and tags["data_hash"] == world["data_hash"]
    assert tags["evaluation_run_id"] == champion.version["run_id"]
    assert tags["test_data_hash"] == content_hash(world["test"])
    assert tags["kfp.pipeline_job_name"].startswith("gate-and-register") and tags["kfp.task_name"] == "register-op"
    assert tags["kfp.pipeline_job_id"] and tags["kfp.task_id"] and "{{" not in json.dumps(tags)

    # When the same model comes again, Then it ties with the champion: rejected, nothing registered
    second = run("medium", "run2")
    assert second["gate"]["parameterValues"]["Output"] == "reject" and second["register"] is None
    gate_meta = second["gate"]["artifacts"]["report"]["artifacts"][0]["metadata"]
    assert gate_meta["reason"].startswith("tie within margin") and gate_meta["champion_version"] == "1"
    assert gate_meta["champion_roc_auc"] == pytest.approx(gate_meta["candidate_roc_auc"])
    assert aliases(tracking["tracking_uri"], tracking["registered_model"]) == {"champion": "1"}
    report = glob.glob(str(tmp_path / "run2" / "**" / "gate-op" / "report.html"), recursive=True)
    assert report and "Decision: REJECT" in Path(report[0]).read_text()
