"""Experiment tracking as people expect to find it in MLflow: the training run with its learning
curves, hyperparameters and datasets; tuning trials with theirs; the evaluate run as the training
run's child; the registered version pointing back at both; experiments that open on runs.

Everything is read back through `MlflowClient` from a SQLite store in a temporary directory. The model comes
from a small real training run (in-process, world size 1)."""
import json
import shutil

import pytest

from model.artifact import read_metadata
from pipelines.arguments import as_parameter, train_spec
from pipelines.config import load_settings
from specs import TrackingSpec
from stages.dataset import materialise, split_snapshot
from stages.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    DatasetRef,
    experiment_id,
    log_training_run,
    record_run,
)
from tests.support import mlflow_store
from training.backends import entry_spec

CURVES = ("train_loss", "val_loss", "val_roc_auc")


def _settings():
    return load_settings("local", overrides={"dataset": {"rows": 1200},
                                             "training": {"hyperparameters": {"epochs": 3, "patience": 5}}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Ingest -> split -> train as the pipeline does it, in this process: the model directory,
    the metadata training returned, and both splits with split's metadata."""
    from training import train as entry

    root = tmp_path_factory.mktemp("trained")
    settings = _settings()
    snapshot = root / "snapshot"
    source_hash = materialise(settings.dataset, str(snapshot))["content_hash"]
    (train, train_meta), (test, test_meta) = split_snapshot(str(snapshot), settings.dataset)
    files = {}
    for role, frame, meta in (("train", train, train_meta), ("test", test, test_meta)):
        files[role] = root / f"{role}.parquet"
        frame.to_parquet(files[role], index=False)
        meta["source_hash"] = source_hash
    lineage = {"data_hash": train_meta["content_hash"], "source_hash": source_hash, "pipeline_run": "run-42",
               "job_name": "flywheel-train-abc-xyz12"}
    spec = entry_spec(train_spec(settings), settings.dataset, train_meta["labels"], lineage)
    metadata = entry.train(str(files["train"]), str(root / "model"), spec)
    return {"settings": settings, "model_dir": root / "model", "metadata": metadata, "files": files,
            "meta": {"train": train_meta, "test": test_meta}, "frames": {"train": train, "test": test}}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes seconds); each test has its own
    experiment and registered model in it."""
    return mlflow_store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.fixture
def tracking(tracking_uri, request) -> TrackingSpec:
    name = request.node.name.removeprefix("test_")
    return TrackingSpec(tracking_uri=tracking_uri, experiment=f"exp-{name}", registered_model=f"model-{name}")


def client_for(tracking: TrackingSpec):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.tracking_uri, registry_uri=tracking.tracking_uri)


def refs(trained, roles=("train", "test")) -> list[DatasetRef]:
    return [DatasetRef(str(trained["files"][role]), trained["meta"][role]["content_hash"],
                       "training" if role == "train" else "testing", role, str(trained["files"][role]),
                       trained["meta"][role]["rows"], trained["meta"][role]["source_hash"]) for role in roles]


def test_training_run_has_learning_curves_params_final_metrics_and_lineage(trained, tracking):
    # Given a finished training (its metadata carries one history point per epoch)
    metadata = trained["metadata"]
    epochs = metadata["metrics"]["epochs_run"]
    assert len(metadata["history"]) == epochs >= 2

    # When the training run is logged
    run_id = log_training_run(tracking, "local", metadata, refs(trained), str(trained["model_dir"]),
                              backend="torchrun")

    # Then every curve has one point per epoch, step = epoch, with the epoch's value
    client = client_for(tracking)
    for key in CURVES:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, epochs + 1)), key
        assert [m.value for m in history] == pytest.approx([p[key] for p in metadata["history"]]), key
    # ... the hyperparameters are params (as MLflow keeps them: text), with the data sizes
    run = client.get_run(run_id)
    for name, value in metadata["hyperparameters"].items():
        assert run.data.params[name] == str(value)
    assert run.data.params["world_size"] == "1"
    assert run.data.params["train_rows"] == str(metadata["train_rows"])
    # ... the final metrics are the best epoch's, under names that add no point to the curves
    best = metadata["metrics"]
    assert run.data.metrics["best_val_roc_auc"] == pytest.approx(best["val_roc_auc"])
    assert run.data.metrics["best_val_loss"] == pytest.approx(best["val_loss"])
    assert run.data.metrics["best_epoch"] == best["best_epoch"]
    assert run.data.metrics["epochs_run"] == epochs
    # ... lineage tags name the stage, env, pipeline run, job and backend
    tags = run.data.tags
    assert {k: tags[k] for k in ("flywheel.stage", "flywheel.env", "flywheel.pipeline_run", "flywheel.job_name",
                                 "flywheel.backend", "flywheel.ddp_backend")} == {
        "flywheel.stage": "training", "flywheel.env": "local", "flywheel.pipeline_run": "run-42",
        "flywheel.job_name": "flywheel-train-abc-xyz12", "flywheel.backend": "torchrun",
        "flywheel.ddp_backend": "single-process"}
    assert tags["model_uri"] == str(trained["model_dir"])
    assert tags["data_hash"] == trained["meta"]["train"]["content_hash"]
    assert run.info.run_name == "train" and run.info.status == "FINISHED"
    # ... and the model's metadata is an artifact of the run
    assert "model_metadata.json" in [a.path for a in client.list_artifacts(run_id)]


def test_train_and_test_data_are_dataset_inputs_by_reference(trained, tracking):
    # Given the train and test splits, with split's content hashes
    train_hash, test_hash = (trained["meta"][r]["content_hash"] for r in ("train", "test"))

    # When the training run is logged with both
    run_id = log_training_run(tracking, "local", trained["metadata"], refs(trained), "model-uri")

    # Then each is a dataset input: its URI as the source, our content hash as the digest (as much
    # of it as MLflow keeps; the whole hash is an input tag), its context, schema and row count
    inputs = {d.dataset.name: d for d in client_for(tracking).get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"train", "test"}
    for role, full_hash, context in (("train", train_hash, "training"), ("test", test_hash, "testing")):
        dataset, tags = inputs[role].dataset, {t.key: t.value for t in inputs[role].tags}
        assert json.loads(dataset.source) == {"uri": str(trained["files"][role])}
        assert dataset.source_type == "local"
        assert full_hash.startswith("sha256:") and dataset.digest == full_hash.removeprefix("sha256:")[:36]
        assert tags == {"mlflow.data.context": context, "flywheel.content_hash": full_hash,
                        "flywheel.source_hash": trained["meta"][role]["source_hash"]}
        columns = [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]]
        assert columns == list(trained["frames"][role].columns)
        assert json.loads(dataset.profile) == {"num_rows": trained["meta"][role]["rows"]}


def test_a_dataset_mlflow_cannot_resolve_is_still_recorded_by_its_uri(tracking):
    # Given a KFP artifact on the in-cluster object store (minio://, no MLflow artifact repository),
    # not readable here: the metadata is synthetic, since only the dataset input is under test
    ref = DatasetRef("minio://mlpipeline/v2/artifacts/run/split/train_data", "sha256:" + "ab" * 32)
    metadata = {"hyperparameters": {"epochs": 1}, "history": [{"epoch": 1, "train_loss": 0.5}], "metrics": {}}

    # When the training run is logged with it
    run_id = log_training_run(tracking, "dev", metadata, [ref], "minio://mlpipeline/v2/artifacts/run/train/model")

    # Then the input holds the URI and digest, without schema or profile
    (only,) = client_for(tracking).get_run(run_id).inputs.dataset_inputs
    assert json.loads(only.dataset.source) == {"uri": ref.uri} and only.dataset.source_type == "uri"
    assert only.dataset.digest == "ab" * 18 and only.dataset.name == "training"
    assert not only.dataset.schema and not only.dataset.profile


def test_the_dataset_source_flywheel_implements_is_the_one_mlflow_declares():
    # gateways/mlflow_api.py records a URI MLflow has no source for (minio://) with a DatasetSource
    # of its own, implementing the methods MLflow declares abstract (mlflow/data/dataset_source.py),
    # some named with an underscore: when MLflow changes that list, this fails first.
    from mlflow.data.dataset_source import DatasetSource

    abstract = sorted(name for name in dir(DatasetSource)
                      if getattr(getattr(DatasetSource, name), "__isabstractmethod__", False))
    assert abstract == ["_can_resolve", "_get_source_type", "_resolve", "from_dict", "load", "to_dict"]


def test_every_experiment_flywheel_makes_opens_on_runs(tracking):
    # Given an experiment Flywheel creates, one made before it tagged them, one whose kind a person set
    from stages.tuning import log_trials

    client = client_for(tracking)
    created = experiment_id(tracking.tracking_uri, tracking.experiment)
    untagged = client.create_experiment("made-by-hand")
    chosen = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})

    # When Flywheel uses them (directly, and through tuning, which creates its experiment itself)
    experiment_id(tracking.tracking_uri, "made-by-hand")
    experiment_id(tracking.tracking_uri, "genai")
    log_trials(tracking.tracking_uri, "tuning-only", "local", "run-1",
               [[{"trial": 0, "params": {"hidden": 32}, "epochs": 1, "val_roc_auc": 0.7, "val_loss": 0.5}]],
               {"trial": 0, "params": {"hidden": 32}, "val_roc_auc": 0.7})

    # Then the MLflow UI opens each of Flywheel's on runs (custom model development), not traces
    kind = {e: client.get_experiment(e).tags.get(EXPERIMENT_KIND_TAG)
            for e in (created, untagged, chosen, client.get_experiment_by_name("tuning-only").experiment_id)}
    assert EXPERIMENT_KIND == "custom_model_development"
    assert list(kind.values()) == [EXPERIMENT_KIND, EXPERIMENT_KIND, "genai_development", EXPERIMENT_KIND]


def test_tuning_trials_log_params_and_learning_curves(trained, tracking):
    # Given two trials of a search, one with the real history of a training run
    history = trained["metadata"]["history"]
    trials = [{"trial": 0, "params": {"hidden": 32, "learning_rate": 0.01}, "epochs": len(history),
               "val_roc_auc": 0.71, "val_loss": 0.52, "history": history},
              {"trial": 1, "params": {"hidden": 64, "learning_rate": 0.003}, "epochs": 2, "val_roc_auc": 0.69,
               "val_loss": 0.55, "history": [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_roc_auc": 0.6},
                                             {"epoch": 2, "train_loss": 0.6, "val_loss": 0.55, "val_roc_auc": 0.69}]}]
    from stages.tuning import log_trials

    # When the search is logged
    parent = log_trials(tracking.tracking_uri, tracking.experiment, "local", "run-7", [trials], trials[0])

    # Then every trial is a child run with its params and one curve point per epoch
    client = client_for(tracking)
    children = client.search_runs([experiment_id(tracking.tracking_uri, tracking.experiment)],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"trial-0-rung1", "trial-1-rung1"}
    for trial in trials:
        run = by_name[f"trial-{trial['trial']}-rung1"]
        assert run.data.params["hidden"] == str(trial["params"]["hidden"])
        assert run.data.params["epochs"] == str(trial["epochs"])
        for key in CURVES:
            curve = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            assert [m.step for m in curve] == list(range(1, len(trial["history"]) + 1)), key
            assert [m.value for m in curve] == pytest.approx([p[key] for p in trial["history"]]), key
        # ... and its result (what the search ranks it by) under names that add no point to them
        assert run.data.metrics["best_val_roc_auc"] == pytest.approx(trial["val_roc_auc"])
        assert run.data.metrics["best_val_loss"] == pytest.approx(trial["val_loss"])
    assert client.get_run(parent).data.params["best.hidden"] == "32"


def test_logging_trials_leaves_no_active_experiment_behind(trained, tracking):
    # Given a process where nothing set an MLflow experiment
    import os

    from mlflow.tracking import fluent

    from stages.registry import register_model
    from stages.tuning import log_trials

    assert fluent._active_experiment_id is None and "MLFLOW_EXPERIMENT_ID" not in os.environ

    # When tuning logs its trials, then a model goes into a run of another experiment (MLflow's fluent
    # start_run(run_id=...) refuses a run outside an experiment set earlier: mlflow/tracking/fluent.py)
    log_trials(tracking.tracking_uri, tracking.experiment, "local", "run-3",
               [[{"trial": 0, "params": {}, "epochs": 1, "val_roc_auc": 0.7, "val_loss": 0.5}]],
               {"trial": 0, "params": {}, "val_roc_auc": 0.7})
    elsewhere = client_for(tracking).create_run(experiment_id(tracking.tracking_uri, "elsewhere")).info.run_id
    test = trained["frames"]["test"]
    features = trained["metadata"]["features"]["numeric"] + trained["metadata"]["features"]["categorical"]

    # Then the process is as it was, and resuming that run works (a leftover experiment made it fail)
    assert fluent._active_experiment_id is None and "MLFLOW_EXPERIMENT_ID" not in os.environ
    register_model(tracking.tracking_uri, tracking.registered_model, str(trained["model_dir"]), elsewhere, {},
                   test[features].head(3), make_champion=False)


def test_evaluate_run_is_the_training_runs_child_and_the_version_links_both(trained, tracking, tmp_path):
    # Given a trained model whose metadata names its training run
    from model.loader import load_model
    from stages.evaluation import evaluate_and_log
    from stages.registry import register_candidate

    model_dir = tmp_path / "model"
    shutil.copytree(trained["model_dir"], model_dir)
    training_run = log_training_run(tracking, "local", trained["metadata"], refs(trained, ("train",)), str(model_dir))
    record_run(str(model_dir), training_run)
    assert read_metadata(str(model_dir))["mlflow_run_id"] == training_run

    # When it is evaluated on the test split and registered
    settings, test = trained["settings"], trained["frames"]["test"]
    outcome = evaluate_and_log(load_model(str(model_dir)), test, settings.dataset, settings.evaluation, tracking,
                               {"model_uri": str(model_dir)})
    version = register_candidate(str(model_dir), test, tracking, outcome.run_id, {"env": "local"})

    # Then the evaluate run is the training run's child
    client = client_for(tracking)
    evaluation = client.get_run(outcome.run_id)
    assert evaluation.data.tags["mlflow.parentRunId"] == training_run
    children = client.search_runs([evaluation.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{training_run}'")
    assert [r.info.run_id for r in children] == [outcome.run_id]
    # ... and the registered version is logged in the evaluate run and tagged with the training run
    mv = client.get_model_version(tracking.registered_model, version)
    assert mv.run_id == outcome.run_id
    assert mv.tags["training_run_id"] == training_run and mv.tags["evaluation_run_id"] == outcome.run_id


def test_train_op_logs_the_training_run_and_records_it_in_the_model(trained, tracking, tmp_path, monkeypatch):
    # Given the train op's inputs as the pipeline passes them, and a backend that runs the entry
    # point in this process (the backends themselves are tested in test_training*.py)
    from kfp.dsl import Dataset, Model

    import training.backends
    from components.train import train_op
    from training import train as entry

    class InProcess:
        def __init__(self, spec, log=print, **options):
            self.spec = spec

        def train(self, job):
            return entry.train(job.data_uri, job.model_dir, job.entry_spec)

    monkeypatch.setattr(training.backends, "backend_for", InProcess)
    settings, meta = trained["settings"], trained["meta"]["train"]
    train_data = Dataset(uri=str(trained["files"]["train"]), metadata=dict(meta))
    model = Model(uri=str(tmp_path / "model"))

    # When train runs with the pipeline's tracking section
    auc = train_op(train_data=train_data, train_spec=as_parameter(train_spec(settings)),
                   dataset_spec=as_parameter(settings.dataset), run_id="pipeline-run-9", model=model,
                   tracking=as_parameter(tracking))

    # Then the run id is in the model's metadata.json and in the Model artifact's metadata
    run_id = read_metadata(model.path)["mlflow_run_id"]
    assert model.metadata["mlflow_run_id"] == run_id
    # ... and that run is the training run: curves, the train split as its input, the op's lineage
    client = client_for(tracking)
    run = client.get_run(run_id)
    epochs = int(run.data.metrics["epochs_run"])
    assert len(client.get_metric_history(run_id, "val_roc_auc")) == epochs
    assert run.data.metrics["best_val_roc_auc"] == pytest.approx(auc)
    assert run.data.tags["flywheel.pipeline_run"] == "pipeline-run-9"
    assert run.data.tags["flywheel.job_name"] == model.metadata["job_name"]
    assert run.data.tags["flywheel.backend"] == "torchrun" and run.data.tags["flywheel.env"] == "local"
    (data,) = run.inputs.dataset_inputs
    assert json.loads(data.dataset.source) == {"uri": train_data.uri}
    assert {t.key: t.value for t in data.tags}["flywheel.content_hash"] == meta["content_hash"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == tracking.experiment and experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_train_op_without_tracking_logs_nothing(trained, tmp_path, monkeypatch):
    # Given another team's pipeline that calls the train op without a tracking section
    from kfp.dsl import Dataset, Model

    import training.backends
    from components.train import train_op

    class Copying:
        def __init__(self, spec, log=print, **options):
            pass

        def train(self, job):
            shutil.copytree(trained["model_dir"], job.model_dir)
            return read_metadata(job.model_dir)

    monkeypatch.setattr(training.backends, "backend_for", Copying)
    settings = trained["settings"]
    model = Model(uri=str(tmp_path / "model"))

    # When it trains
    train_op(train_data=Dataset(uri=str(trained["files"]["train"]), metadata=dict(trained["meta"]["train"])),
             train_spec=as_parameter(train_spec(settings)), dataset_spec=as_parameter(settings.dataset),
             run_id="r", model=model)

    # Then the model names no MLflow run
    assert "mlflow_run_id" not in read_metadata(model.path) and "mlflow_run_id" not in model.metadata
