"""The training entry point: preprocessing that serving reuses, and DDP on 2 CPU processes."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from components.dataset import ReferenceTask, write_table
from pipelines.config import load_settings
from training.artifact import load_model
from training.launchers import TrainingFailed, train_model
from training.preprocessing import UNKNOWN, Preprocessor

NUMERIC = ["age", "income"]
CATEGORICAL = ["housing"]


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
    metadata = train_model(settings.training.model_dump(), settings.dataset.model_dump(), str(data),
                           str(tmp / "model"), "job-test", lineage={"data_hash": "sha256:abc"}, log=lines.append)
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
    with pytest.raises(TrainingFailed, match="must hold both classes"):
        train_model(settings.training.model_dump(), settings.dataset.model_dump(), str(data),
                    str(tmp_path / "model"), "job-bad", log=lambda _: None)
