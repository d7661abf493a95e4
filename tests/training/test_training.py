"""The training entry point: preprocessing that serving reuses, and DDP on 2 CPU processes."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from model.loader import load_model
from model.preprocessing import UNKNOWN, Preprocessor
from pipelines.arguments import train_spec
from pipelines.config import load_settings
from stages.dataset import ReferenceTask
from storage.tables import write_table
from training.backends import TrainingFailed, TrainingJob, backend_for, build_job, entry_spec, job_name

NUMERIC = ["age", "income"]
CATEGORICAL = ["housing"]


def train_model(settings, data, model_dir, name, lineage=None, labels=None, log=print) -> dict:
    """Train through the configured backend (torchrun here); the job name is part of the lineage.
    `labels` is the mapping split saves (None: the entry point infers it from the table)."""
    spec = train_spec(settings)
    job = TrainingJob(name, str(data), str(data),
                      entry_spec(spec, settings.dataset, labels, {**(lineage or {}), "job_name": name}),
                      model_dir=str(model_dir))
    return backend_for(spec, log=log).train(job)


def test_one_builder_describes_the_train_op_trial_and_cli_jobs():
    # Given the local env's train spec and a split's Dataset artifact metadata
    settings = load_settings("local")
    spec = train_spec(settings)
    labels = {"negative": 0, "positive": 1}
    split_meta = {"labels": labels, "content_hash": "sha256:data", "source_hash": "sha256:snapshot", "rows": 10}
    # When a tuning trial's job is built (scratch model: no model_dir)
    trial = build_job(spec, settings.dataset, kind="trial", run_id="run-1", data_path="/d/train", data_uri="s3://b/train",
                      data_metadata=split_meta, parts=(3, "r2"))
    # Then its name keeps trial and rung apart, and lineage, annotations and labels reach the entry point
    assert trial.name.startswith("flywheel-trial-") and "-3-r2-" in trial.name and trial.model_dir is None
    assert (trial.data_path, trial.data_uri) == ("/d/train", "s3://b/train")
    assert trial.annotations == {"flywheel/pipeline-run": "run-1"}
    assert trial.entry_spec == entry_spec(spec, settings.dataset, labels, {
        "data_hash": "sha256:data", "source_hash": "sha256:snapshot", "pipeline_run": "run-1", "job_name": trial.name})
    # And a table the CLI wrote (labels only, no hashes) records no hashes; its name hashes name_seed
    cli = build_job(spec, settings.dataset, kind="train", run_id="cli-20240101", data_path="runs/d.parquet",
                    data_uri="runs/d.parquet", data_metadata={"labels": labels}, model_dir="runs/model",
                    name_seed="cli-local-20240101")
    assert cli.entry_spec["lineage"] == {"pipeline_run": "cli-20240101", "job_name": cli.name}
    assert cli.model_dir == "runs/model" and cli.name[:-6] == job_name("train", "cli-local-20240101")[:-6]


def test_preprocessor_handles_missing_and_unseen_values():
    train = pd.DataFrame({"age": [20, 30, 40], "income": [1.0, None, 3.0], "housing": ["own", "rent", None]})
    pre = Preprocessor.fit(train, NUMERIC, CATEGORICAL)
    live = pd.DataFrame({"age": [30], "income": [None], "housing": ["castle"]})
    numeric, categorical = pre.transform(live)
    assert numeric.shape == (1, 4) and categorical.shape == (1, 1)
    assert numeric[0, 0] == pytest.approx(0.0)  # age 30 is the mean
    assert numeric[0, 3] == 1.0  # income missing indicator
    assert numeric[0, 2] == pytest.approx((2.0 - pre.means["income"]) / pre.stds["income"])  # median-filled
    assert categorical[0, 0] == UNKNOWN
    assert pre.cardinalities == [3]  # own, rent + the unknown bucket
    assert Preprocessor.from_json(pre.to_json()) == pre


def test_transform_is_the_column_by_column_definition_for_frames_and_request_columns():
    # Given a preprocessor fit on the reference task, and rows with nulls, infinities and unseen categories
    frame = ReferenceTask(rows=600, seed=11).generate()
    numeric_columns = ["age", "income", "credit_limit", "utilization", "debt_to_income"]
    pre = Preprocessor.fit(frame, numeric_columns, ["employment", "housing", "region"])
    live = frame.head(50).copy()
    live["utilization"] = live["utilization"].astype("float64")
    live.loc[live.index[:3], "utilization"] = [np.inf, -np.inf, np.nan]
    live.loc[live.index[3:5], "housing"] = ["castle", None]
    # When transformed as a frame and as the mapping of columns a serving request is
    for given in (live, {c: live[c].tolist() for c in live.columns}):
        numeric, categorical = pre.transform(given)
        # Then each numeric column is imputed with its median and scaled as fit says, column by column
        for i, column in enumerate(numeric_columns):
            values = live[column].to_numpy(dtype="float64", na_value=np.nan)
            missing = ~np.isfinite(values)
            scaled = (np.where(missing, pre.medians[column], values) - pre.means[column]) / pre.stds[column]
            assert numeric[:, 2 * i].tobytes() == scaled.astype(np.float32).tobytes(), column
            assert numeric[:, 2 * i + 1].tolist() == missing.astype(np.float32).tolist(), column
        # ... and each category is its vocabulary position + 1 (0: unknown or null)
        for j, column in enumerate(pre.categorical):
            codes = [pre.vocabularies[column].index(v) + 1 if isinstance(v, str) and v in pre.vocabularies[column]
                     else UNKNOWN for v in live[column]]
            assert categorical[:, j].tolist() == codes, column


def test_int_coded_categories_keep_their_index_when_a_null_makes_the_batch_float():
    # Given a preprocessor fit on int-coded categories (an int64 column)
    train = pd.DataFrame({"age": [20, 30, 40], "income": [1.0, 2.0, 3.0], "housing": [1, 2, 3]})
    pre = Preprocessor.fit(train, NUMERIC, CATEGORICAL)
    assert pre.vocabularies["housing"] == ["1", "2", "3"]
    # When a serving batch holds the same codes plus a null (pandas makes the column float64)
    live = pd.DataFrame({"age": [20, 30, 40, 30], "income": [1.0, 2.0, 3.0, 2.0], "housing": [3, 1, 2, None]})
    assert live["housing"].dtype == np.float64
    _, categorical = pre.transform(live)
    # Then 3.0, 1.0, 2.0 find the vocabulary entries of 3, 1, 2; only the null is unknown
    assert categorical[:, 0].tolist() == [3, 1, 2, UNKNOWN]
    # And fitting on the float-coded column gives the same vocabulary as on the int one
    assert Preprocessor.fit(live, NUMERIC, CATEGORICAL).vocabularies == pre.vocabularies


def test_preprocessor_names_what_is_wrong():
    pre = Preprocessor.fit(pd.DataFrame({"age": [1, 2], "income": [1, 2], "housing": ["a", "b"]}), NUMERIC, CATEGORICAL)
    with pytest.raises(ValueError, match=r"missing feature columns: \['income'\]"):
        pre.transform(pd.DataFrame({"age": [1], "housing": ["a"]}))
    with pytest.raises(ValueError, match="column 'age' must be numeric"):
        pre.transform(pd.DataFrame({"age": ["old"], "income": [1], "housing": ["a"]}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real 2-process DDP run (gloo) through the torchrun launcher."""
    tmp = tmp_path_factory.mktemp("ddp")
    settings = load_settings("local", overrides={"training": {"hyperparameters": {"epochs": 4}}})
    data = write_table(ReferenceTask(rows=6000, seed=5).generate(), tmp / "train.parquet")
    lines = []
    metadata = train_model(settings, data, tmp / "model", "job-test", lineage={"data_hash": "sha256:abc"},
                           log=lines.append)
    return tmp / "model", metadata, lines


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_converges(trained):
    model_dir, metadata, lines = trained
    assert metadata["world_size"] == 2 and metadata["backend"] == "gloo"
    assert metadata["metrics"]["val_roc_auc"] > 0.70
    history = metadata["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert any("epoch 1/4" in line and "samples/s=" in line for line in lines), "progress is readable in the log"
    assert metadata["data_hash"] == "sha256:abc" and metadata["job_name"] == "job-test"
    assert not (model_dir / "checkpoints").exists(), "checkpoints are cleaned up after success"


@pytest.mark.slow
def test_artifact_alone_serves_predictions_that_beat_chance(trained):
    model_dir, metadata, _ = trained
    model = load_model(str(model_dir))
    holdout = ReferenceTask(rows=3000, seed=99).generate()
    scores = model.predict_proba(holdout.drop(columns=["default"]))
    assert scores.shape == (3000,) and np.all((scores >= 0) & (scores <= 1))
    assert roc_auc_score(holdout["default"], scores) > 0.70
    saved = json.loads((model_dir / "metadata.json").read_text())
    assert saved["features"]["categorical"] == ["employment", "housing", "region"]
    assert saved["hyperparameters"]["epochs"] == 4


def test_training_failure_surfaces_the_reason(tmp_path):
    settings = load_settings("local", overrides={"training": {"workers": 1, "elastic": {"max_restarts": 0}}})
    frame = ReferenceTask(rows=300).generate().assign(default=0)
    data = write_table(frame, tmp_path / "one_class.parquet")
    # The mapping split saved for this dataset (0/1): the entry point, not inference, meets one class.
    with pytest.raises(TrainingFailed, match="must hold both classes"):
        train_model(settings, data, tmp_path / "model", "job-bad", labels={"negative": 0, "positive": 1},
                    log=lambda _: None)


# --- devices: GPUs asked for must be there, one process per GPU (CUDA faked: no GPU here) -----


@pytest.fixture
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def fake_cuda(monkeypatch, gpus: int) -> list:
    import torch

    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    return selected


def test_a_job_that_expects_gpus_fails_when_torch_sees_none(single_process):
    from training import train as entry

    # Given a pod with one process per requested GPU (2) whose torch sees no CUDA device
    fake_cuda(single_process, gpus=0)
    single_process.setenv("LOCAL_WORLD_SIZE", "2")
    # Then a spec that expects GPUs fails, naming the cause, instead of training on CPU
    with pytest.raises(RuntimeError,
                       match=r"requested 2 GPU\(s\).*torch sees none \(CPU-only torch build or no device plugin\)"):
        entry.setup_distributed(expect_gpu=True)
    # ... also when it comes in through the entry point's spec (before any data is read)
    with pytest.raises(RuntimeError, match="torch sees none"):
        entry.train("s3://never/read.parquet", "s3://never/written", {"expect_gpu": True})
    # And a CPU job still falls back to gloo on the CPU
    single_process.setenv("LOCAL_WORLD_SIZE", "1")
    ctx = entry.setup_distributed(expect_gpu=False)
    assert ctx.device.type == "cpu" and ctx.backend is None


def test_more_processes_than_gpus_fail_instead_of_sharing_a_gpu(single_process):
    from training import train as entry

    # Given a CUDA host with 1 GPU and 2 processes on the node (NCCL: "Duplicate GPU detected")
    selected = fake_cuda(single_process, gpus=1)
    single_process.setenv("LOCAL_WORLD_SIZE", "2")
    single_process.setenv("LOCAL_RANK", "1")
    # Then setup fails naming both numbers, before any device is picked
    with pytest.raises(RuntimeError, match=r"2 processes on this node .* only 1 GPU"):
        entry.setup_distributed(expect_gpu=True)
    assert selected == []
    # And with a GPU per process, local rank 1 gets GPU 1
    import torch

    single_process.setattr(torch.cuda, "device_count", lambda: 2)
    ctx = entry.setup_distributed(expect_gpu=True)
    assert ctx.device == torch.device("cuda", 1) and selected == [torch.device("cuda", 1)]
