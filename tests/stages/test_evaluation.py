"""Evaluation: metrics against direct scikit-learn computations on real fitted models, slices,
the trivial baseline, the HTML report (rendered in headless Chromium) and evaluate_op through
kfp.local with a real MLflow SQLite store."""

import glob
import json
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from model.loader import load_model
from stages.dataset import REFERENCE_CATEGORICAL, REFERENCE_NUMERIC, ReferenceTask, split
from stages.evaluation_report import render_report
from stages.gate import decide
from stages.metrics import MAX_CURVE_POINTS, MISSING_SLICE, evaluate
from storage.tables import content_hash, write_table
from tests.support import chromium_screenshot, find_chromium

TARGET = "default"
# What the pipeline passes the ops: the env's dataset section (the ops validate it as a DatasetSpec)
DATASET_SPEC = {"source": "reference", "target": TARGET,
                "features": {"numeric": REFERENCE_NUMERIC, "categorical": REFERENCE_CATEGORICAL}}


class SklearnModel:
    """A real logistic regression on the reference task, behind the TrainedModel contract."""

    def __init__(self, train: pd.DataFrame, numeric: list[str], categorical: list[str]):
        self.columns = numeric + categorical
        prep = ColumnTransformer([
            ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
            ("cat", make_pipeline(SimpleImputer(strategy="constant", fill_value="missing"),
                                  OneHotEncoder(handle_unknown="ignore")), categorical),
        ])
        self.pipeline = make_pipeline(prep, LogisticRegression(max_iter=1000)).fit(train[self.columns], train[TARGET])
        self.metadata = {"hyperparameters": {"C": 1.0}, "features": {"numeric": numeric, "categorical": categorical}}

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return self.pipeline.predict_proba(frame[self.columns])[:, 1]


class Constant:
    """The trivial model: the same probability for everyone."""

    def __init__(self, p: float):
        self.p = p

    def predict_proba(self, frame):
        return np.full(len(frame), self.p)


@pytest.fixture(scope="module")
def data():
    train, test = split(ReferenceTask(rows=6000, seed=11).generate(), 0.3, seed=11)
    return train, test


@pytest.fixture(scope="module")
def model(data):
    return SklearnModel(data[0], REFERENCE_NUMERIC, REFERENCE_CATEGORICAL)


@pytest.fixture(scope="module")
def result(model, data):
    return evaluate(model, data[1], TARGET, decision_threshold=0.3, slice_column="employment")


def test_metrics_agree_with_direct_sklearn_computation(model, data, result):
    # Given a fitted logistic regression and the held-out split
    test = data[1]
    y, p = test[TARGET].to_numpy(), model.predict_proba(test)
    # When it is evaluated at threshold 0.3 (result fixture)
    # Then every metric equals scikit-learn's on the raw scores, and the confusion matrix counts match
    predicted = p >= 0.3
    assert result.metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert result.metrics["pr_auc"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
    assert result.metrics["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-12)
    tp, fp = int((predicted & (y == 1)).sum()), int((predicted & (y == 0)).sum())
    fn, tn = int((~predicted & (y == 1)).sum()), int((~predicted & (y == 0)).sum())
    assert result.confusion_matrix == [[tn, fp], [fn, tp]]
    assert result.metrics["precision"] == pytest.approx(tp / (tp + fp))
    assert result.metrics["recall"] == pytest.approx(tp / (tp + fn))
    assert result.metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert result.metrics["accuracy"] == pytest.approx((tp + tn) / len(y))
    assert (result.rows, result.positives) == (len(y), int(y.sum()))
    assert result.base_rate == pytest.approx(y.mean())


def test_curves_are_downsampled_for_kfp_and_keep_their_ends(model, data, result):
    # Given a test set whose full ROC curve has more points than KFP metadata should carry
    test = data[1]
    full_fpr, _, _ = skm.roc_curve(test[TARGET], model.predict_proba(test))
    assert len(full_fpr) > MAX_CURVE_POINTS
    # Then the stored curves have at most 200 points, start at (0, 0), end at (1, 1), are monotone,
    # and every threshold is a finite number (sklearn's first is +inf)
    roc = result.roc
    assert len(roc["fpr"]) <= MAX_CURVE_POINTS and len(result.pr["recall"]) <= MAX_CURVE_POINTS
    assert (roc["fpr"][0], roc["tpr"][0]) == (0.0, 0.0) and (roc["fpr"][-1], roc["tpr"][-1]) == (1.0, 1.0)
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    assert all(np.isfinite(roc["thresholds"])) and max(roc["thresholds"]) <= 1.0
    json.dumps(result.to_dict(), allow_nan=False)  # KFP metadata and MLflow artifacts are JSON
    # And the calibration curve has the observed rates of the non-empty bins
    assert 0 < len(result.calibration["prob_true"]) <= 10
    assert sum(result.score_histogram["counts"]) == result.rows


def test_slices_match_per_group_computation(model, data):
    # Given test data where one employment group holds no positives and some employment is missing
    test = data[1].copy()
    test.loc[test["employment"] == "retired", TARGET] = 0
    assert test["employment"].isna().any()
    # When evaluated with slice_column=employment
    result = evaluate(model, test, TARGET, 0.3, slice_column="employment")
    p = model.predict_proba(test)
    slices = {s["value"]: s for s in result.slices}
    # Then every group (missing as its own) has its rows, positives and sklearn's ROC AUC
    assert set(slices) == set(test["employment"].dropna()) | {MISSING_SLICE}
    assert sum(s["rows"] for s in result.slices) == len(test)
    for value, group in test.groupby(test["employment"].fillna(MISSING_SLICE)):
        s = slices[value]
        assert (s["rows"], s["positives"]) == (len(group), int(group[TARGET].sum()))
        if group[TARGET].nunique() == 2:
            assert s["roc_auc"] == pytest.approx(skm.roc_auc_score(group[TARGET], p[group.index]))
    # And ROC AUC is None where a slice has one class only
    assert slices["retired"]["positives"] == 0 and slices["retired"]["roc_auc"] is None


def test_model_beats_trivial_baseline_and_constant_model_does_not(model, data, result):
    # Given the base rate of the test set
    test = data[1]
    prior = test[TARGET].mean()
    # Then the baseline is the constant prior: AUC 0.5 and Brier p(1 - p)
    assert result.baseline["roc_auc"] == 0.5
    assert result.baseline["brier"] == pytest.approx(prior * (1 - prior))
    # And the fitted model beats it, while the constant model itself and a random scorer do not
    assert result.beats_baseline()
    assert result.metrics["roc_auc"] > 0.7 and result.metrics["brier"] < result.baseline["brier"]
    assert not evaluate(Constant(prior), test, TARGET, 0.3).beats_baseline()

    class Noise:
        def predict_proba(self, frame):
            return np.random.default_rng(0).uniform(0, 1, len(frame))

    assert not evaluate(Noise(), test, TARGET, 0.3).beats_baseline()


def test_broken_predictions_and_single_class_data_fail_loudly(data):
    test = data[1]

    class Bad:
        def __init__(self, fn):
            self.predict_proba = fn

    with pytest.raises(ValueError, match="not probabilities"):
        evaluate(Bad(lambda f: np.full(len(f), 1.5)), test, TARGET, 0.5)
    with pytest.raises(ValueError, match="shape"):
        evaluate(Bad(lambda f: np.zeros(len(f) - 1)), test, TARGET, 0.5)
    with pytest.raises(ValueError, match="only class 0"):
        evaluate(Constant(0.1), test[test[TARGET] == 0], TARGET, 0.5)
    with pytest.raises(ValueError, match="not in the test data"):
        evaluate(Constant(0.1), test, "nope", 0.5)


def test_report_is_self_contained_html_with_plots_and_tables(model, data, result):
    # Given a candidate, a (weaker) champion and a decision
    weak = SklearnModel(data[0], ["age"], ["region"])
    champion = evaluate(weak, data[1], TARGET, 0.3, slice_column="employment")
    decision = decide(result.metrics, champion.metrics, {"roc_auc": 0.6}, 0.002)
    # When the report is rendered
    page = render_report(result, "Gate <test>", champion=champion, decision=decision)
    # Then it inlines four PNGs, names the decision and shows both models' numbers and the slices
    assert page.count("src='data:image/png;base64,") == 4
    assert "http://" not in page and "https://" not in page  # nothing to fetch: works offline in KFP's viewer
    assert "Gate &lt;test&gt;" in page and "Decision: PROMOTE" in page and "challenger wins" in page
    assert f"{result.metrics['roc_auc']:.4f}" in page and f"{champion.metrics['roc_auc']:.4f}" in page
    assert "Slices by employment" in page and "champion ROC AUC" in page
    # And without a champion there is no champion column
    assert "champion ROC AUC" not in render_report(result, "alone")


def test_report_renders_in_headless_chromium(model, data, result, tmp_path):
    chromium = find_chromium()
    if not chromium:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    # Given the report as a file
    weak = SklearnModel(data[0], ["age"], ["region"])
    champion = evaluate(weak, data[1], TARGET, 0.3, slice_column="employment")
    page = tmp_path / "report.html"
    page.write_text(render_report(result, "Evaluation report", champion=champion,
                                  decision=decide(result.metrics, champion.metrics, {"roc_auc": 0.6}, 0.002)))
    # When headless Chromium screenshots it
    png = tmp_path / "report.png"
    chromium_screenshot(chromium, page, png, tmp_path, size=(1200, 1600))
    # Then the PNG is the window's size and far from blank: plots and tables put many colours on it
    from PIL import Image

    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 1600)
    pixels = np.asarray(image).reshape(-1, 3)
    non_white = (pixels < 245).any(axis=1).mean()
    assert non_white > 0.05, f"only {non_white:.1%} of the screenshot is not white"
    assert len(np.unique(pixels, axis=0)) > 200


# ---------------------------------------------------------------------------------------------
# evaluate_op through kfp.local, with a real model artifact (training.train) and MLflow SQLite
# ---------------------------------------------------------------------------------------------


def train_model_dir(train_file: str, model_dir: str, numeric: list[str], categorical: list[str], data_hash: str):
    """A real model artifact from the project's training entry point (one process, few epochs)."""
    from specs import Hyperparameters
    from training.train import train

    hyperparameters = Hyperparameters(epochs=6, hidden=32, depth=1, learning_rate=0.01, batch_size=128).model_dump()
    spec = {"dataset": {"target": TARGET, "features": {"numeric": numeric, "categorical": categorical}},
            "hyperparameters": hyperparameters, "lineage": {"data_hash": data_hash}}
    train(train_file, model_dir, spec)
    return model_dir


def _executor_outputs(root) -> dict[str, dict]:
    """Each task's executor_output.json under a kfp.local pipeline root, by task folder name."""
    found = {}
    for path in glob.glob(os.path.join(str(root), "**", "executor_output.json"), recursive=True):
        with open(path) as handle:
            found[os.path.basename(os.path.dirname(path))] = json.load(handle)
    return found


@pytest.mark.slow
def test_evaluate_op_through_kfp_local(data, tmp_path):
    from kfp import dsl, local

    from components.evaluate import evaluate_op
    from components.factory import component

    # Given a trained model artifact, the test split as Parquet and a local MLflow store
    train, test = data
    write_table(train, tmp_path / "train.parquet")
    write_table(test, tmp_path / "test.parquet")
    model_dir = train_model_dir(str(tmp_path / "train.parquet"), str(tmp_path / "model"),
                                REFERENCE_NUMERIC, REFERENCE_CATEGORICAL, content_hash(train))
    tracking = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "eval-test",
                "registered_model": "credit-default-test"}
    evaluation_spec = {"thresholds": {"roc_auc": 0.6}, "decision_threshold": 0.3, "slice_column": "employment",
                       "promotion_margin": 0.002}
    evaluate_component = component(evaluate_op, None)

    @dsl.pipeline(name="evaluate-only")
    def pipeline(model_uri: str, data_uri: str):
        model = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model, reimport=True)
        test_data = dsl.importer(artifact_uri=data_uri, artifact_class=dsl.Dataset, reimport=True,
                                 metadata={"data_hash": "sha256:upstream"})
        evaluate_component(model=model.output, test_data=test_data.output, dataset_spec=DATASET_SPEC,
                           evaluation_spec=evaluation_spec, tracking=tracking)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               workspace_root=str(tmp_path / "ws"))
    # When the pipeline runs
    pipeline(model_uri=model_dir, data_uri=str(tmp_path / "test.parquet"))

    # Then the component's numbers are the plain function's on the same model and data
    expected = evaluate(load_model(model_dir), test, TARGET, 0.3, "employment")
    outputs = _executor_outputs(tmp_path / "root")
    executor = next(v for k, v in outputs.items() if k.startswith("evaluate"))
    params = executor["parameterValues"]
    assert params["roc_auc"] == pytest.approx(expected.metrics["roc_auc"], abs=1e-9)
    artifacts = executor["artifacts"]
    kfp_metrics = artifacts["metrics"]["artifacts"][0]["metadata"]
    assert kfp_metrics["pr_auc"] == pytest.approx(expected.metrics["pr_auc"], abs=1e-9)
    assert kfp_metrics["rows"] == len(test)
    classification = artifacts["classification"]["artifacts"][0]["metadata"]
    assert classification["confusionMatrix"]["rows"][1]["row"] == expected.confusion_matrix[1]
    assert len(classification["confidenceMetrics"]) == len(expected.roc["fpr"]) <= MAX_CURVE_POINTS
    assert artifacts["report"]["artifacts"][0]["uri"].endswith("/evaluate-op/report.html"), "opens in a browser"
    report_meta = artifacts["report"]["artifacts"][0]["metadata"]
    assert report_meta["mlflow_run_id"] == params["run_id"]
    assert report_meta["test_data_hash"] == content_hash(test)
    assert report_meta["dataset_hash"] == "sha256:upstream"
    assert report_meta["model_data_hash"] == content_hash(train)
    report_files = glob.glob(str(tmp_path / "root" / "**" / "evaluate-op" / "report.html"), recursive=True)
    assert report_files
    with open(report_files[0]) as handle:
        assert "data:image/png;base64," in handle.read()

    # And the MLflow run holds the hyperparameters, the metrics, the lineage and the report
    from mlflow import MlflowClient

    client = MlflowClient(tracking["tracking_uri"])
    mlflow_run = client.get_run(params["run_id"])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["hidden"] == "32"
    assert mlflow_run.data.metrics["roc_auc"] == pytest.approx(expected.metrics["roc_auc"])
    assert mlflow_run.data.tags["test_data_hash"] == content_hash(test)
    assert {a.path for a in client.list_artifacts(params["run_id"])} >= {"report.html", "evaluation.json"}
    # And MLflow's artifacts sit beside the SQLite database, not in the current directory
    assert (tmp_path / "artifacts" / "eval-test").is_dir()
