"""Evaluation, the champion/challenger gate and the MLflow registry, as plain Python.

`components/evaluate.py` wraps these in KFP components; tests call them directly. Metrics come
from scikit-learn, plots from matplotlib (Agg, no pyplot state), and MLflow is imported lazily so
that importing this module stays cheap for the pipeline compiler.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

MAX_CURVE_POINTS = 200  # KFP stores curves in artifact metadata: keep them small
LOWER_IS_BETTER = frozenset({"brier", "log_loss"})
CHAMPION, PREVIOUS_CHAMPION = "champion", "previous-champion"
MISSING_SLICE = "(missing)"
# What the registered pyfunc needs at inference; pinned to what is installed here (FIELD-NOTES:
# letting MLflow infer requirements costs ~4.8 s per log_model). The flywheel package itself
# (training.artifact) comes with the serving image.
RUNTIME_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "fsspec", "cloudpickle")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    """Everything the gate, the report, KFP and MLflow need about one model on one test set."""

    rows: int
    positives: int
    base_rate: float
    decision_threshold: float
    metrics: dict[str, float]
    baseline: dict[str, float]
    confusion_matrix: list[list[int]]  # [[tn, fp], [fn, tp]]; rows = truth, columns = prediction
    roc: dict[str, list[float]]  # fpr, tpr, thresholds (<= MAX_CURVE_POINTS)
    pr: dict[str, list[float]]  # precision, recall, thresholds (<= MAX_CURVE_POINTS)
    calibration: dict[str, list[float]]  # prob_pred, prob_true (non-empty uniform bins)
    score_histogram: dict[str, list[float]]  # edges, counts of predicted probabilities
    slice_column: str | None = None
    slices: list[dict] = field(default_factory=list)

    def beats_baseline(self) -> bool:
        """Better than predicting the base rate for everyone, on ranking and on calibration."""
        return self.metrics["roc_auc"] > self.baseline["roc_auc"] and self.metrics["brier"] < self.baseline["brier"]

    def to_dict(self) -> dict:
        return asdict(self)


def _downsample(n: int, limit: int = MAX_CURVE_POINTS) -> np.ndarray:
    """Evenly spaced indices that always keep the curve's first and last points."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def _labels(frame: pd.DataFrame, target: str) -> np.ndarray:
    if target not in frame.columns:
        raise ValueError(f"target column {target!r} is not in the test data (columns: {list(frame.columns)})")
    labels = frame[target]
    if labels.isna().any():
        raise ValueError(f"target column {target!r} has {int(labels.isna().sum())} missing values")
    values = labels.to_numpy()
    found = set(np.unique(values).tolist())
    if not found <= {0, 1}:
        raise ValueError(f"target column {target!r} must be binary 0/1, found {sorted(found, key=str)[:10]}")
    if len(found) < 2:
        raise ValueError(f"test data holds only class {found.pop()} of {target!r}: ROC AUC is undefined")
    return values.astype(np.int64)


def predict_scores(model, frame: pd.DataFrame) -> np.ndarray:
    """Call `model.predict_proba` and check the contract: shape (n,), finite, within [0, 1]."""
    scores = np.asarray(model.predict_proba(frame), dtype=np.float64)
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.shape != (len(frame),):
        raise ValueError(f"predict_proba returned shape {scores.shape}, expected ({len(frame)},)")
    bad = ~np.isfinite(scores) | (scores < 0.0) | (scores > 1.0)
    if bad.any():
        raise ValueError(f"predict_proba returned {int(bad.sum())} values that are not probabilities in [0, 1]")
    return scores


def metrics_from_scores(labels: np.ndarray, scores: np.ndarray, decision_threshold: float) -> dict[str, float]:
    """The scalar metrics: the gate, KFP and MLflow all read these same numbers."""
    from sklearn import metrics as skm

    predicted = (scores >= decision_threshold).astype(np.int64)
    return {
        "roc_auc": float(skm.roc_auc_score(labels, scores)),
        "pr_auc": float(skm.average_precision_score(labels, scores)),
        "f1": float(skm.f1_score(labels, predicted, zero_division=0)),
        "precision": float(skm.precision_score(labels, predicted, zero_division=0)),
        "recall": float(skm.recall_score(labels, predicted, zero_division=0)),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "brier": float(skm.brier_score_loss(labels, scores)),
        "log_loss": float(skm.log_loss(labels, np.clip(scores, 1e-15, 1 - 1e-15), labels=[0, 1])),
    }


def _slices(frame: pd.DataFrame, labels: np.ndarray, scores: np.ndarray, column: str) -> list[dict]:
    from sklearn import metrics as skm

    if column not in frame.columns:
        raise ValueError(f"slice column {column!r} is not in the test data (columns: {list(frame.columns)})")
    keys = frame[column].astype(object).where(frame[column].notna(), MISSING_SLICE).astype(str).to_numpy()
    out = []
    for value in sorted(set(keys.tolist())):
        mask = keys == value
        y, p = labels[mask], scores[mask]
        both = len(np.unique(y)) == 2
        out.append({
            "value": value,
            "rows": int(mask.sum()),
            "positives": int(y.sum()),
            "base_rate": float(y.mean()),
            "roc_auc": float(skm.roc_auc_score(y, p)) if both else None,
            "brier": float(skm.brier_score_loss(y, p, labels=[0, 1])),
        })
    return sorted(out, key=lambda s: (-s["rows"], s["value"]))


def evaluate(model, frame: pd.DataFrame, target: str, decision_threshold: float,
             slice_column: str | None = None) -> EvaluationResult:
    """Score `model` on a held-out table; `model` is anything with `predict_proba(frame)`."""
    from sklearn import metrics as skm
    from sklearn.calibration import calibration_curve

    labels = _labels(frame, target)
    scores = predict_scores(model, frame.drop(columns=[target]))
    base_rate = float(labels.mean())

    fpr, tpr, roc_thresholds = skm.roc_curve(labels, scores)
    keep = _downsample(len(fpr))
    # sklearn's first ROC threshold is +inf ("nothing positive"); JSON and KFP need a number.
    roc_thresholds = np.minimum(roc_thresholds, 1.0)
    precision, recall, pr_thresholds = skm.precision_recall_curve(labels, scores)
    pr_thresholds = np.append(pr_thresholds, 1.0)  # sklearn gives one threshold fewer than points
    keep_pr = _downsample(len(precision))
    prob_true, prob_pred = calibration_curve(labels, scores, n_bins=10, strategy="uniform")
    counts, edges = np.histogram(scores, bins=20, range=(0.0, 1.0))
    constant = np.full(len(labels), base_rate)

    return EvaluationResult(
        rows=int(len(labels)),
        positives=int(labels.sum()),
        base_rate=base_rate,
        decision_threshold=float(decision_threshold),
        metrics=metrics_from_scores(labels, scores, decision_threshold),
        # The trivial model predicts the test set's own base rate for every row: the best constant.
        baseline={
            "roc_auc": float(skm.roc_auc_score(labels, constant)),
            "pr_auc": base_rate,
            "brier": float(skm.brier_score_loss(labels, constant)),
        },
        confusion_matrix=skm.confusion_matrix(labels, (scores >= decision_threshold).astype(np.int64),
                                              labels=[0, 1]).tolist(),
        roc={"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "thresholds": roc_thresholds[keep].tolist()},
        pr={"precision": precision[keep_pr].tolist(), "recall": recall[keep_pr].tolist(),
            "thresholds": pr_thresholds[keep_pr].tolist()},
        calibration={"prob_pred": prob_pred.tolist(), "prob_true": prob_true.tolist()},
        score_histogram={"edges": edges.tolist(), "counts": counts.astype(int).tolist()},
        slice_column=slice_column,
        slices=_slices(frame, labels, scores, slice_column) if slice_column else [],
    )


# --------------------------------------------------------------------------------------------
# The champion/challenger gate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate: dict
    champion: dict | None

    @property
    def label(self) -> str:
        """What the pipeline branches on (dsl.If): "promote" or "reject"."""
        return "promote" if self.promote else "reject"

    def to_dict(self) -> dict:
        return {"decision": self.label, **asdict(self)}


_EPSILON = 1e-9  # a gain of exactly the margin is a tie, whatever the float rounding of the subtraction


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def threshold_failures(metrics: Mapping[str, float], thresholds: Mapping[str, float]) -> list[str]:
    """Each absolute threshold the metrics miss, named with value and limit; [] when all pass."""
    failures = []
    for metric, limit in thresholds.items():
        value = metrics.get(metric)
        if not _finite(value):
            failures.append(f"{metric} is missing or not a number ({value!r})")
        elif metric in LOWER_IS_BETTER and value > limit:
            failures.append(f"{metric} {value:.4f} is above the maximum {limit:g}")
        elif metric not in LOWER_IS_BETTER and value < limit:
            failures.append(f"{metric} {value:.4f} is below the minimum {limit:g}")
    return failures


def decide(candidate: dict, champion: dict | None, thresholds: dict, margin: float, primary: str = "roc_auc",
           champion_error: str | None = None) -> Decision:
    """Promote the candidate or keep the champion; the reason names the numbers that decided.

    Order: absolute thresholds first (a candidate below them is never promoted), then the
    comparison on `primary` against the champion measured on the same test data. The candidate
    must beat the champion by more than `margin`; a tie within the margin keeps the champion.

    `champion_error` says the registry has a champion that could not be loaded or scored. Then
    the candidate is judged on the absolute thresholds alone and promoted if it passes them:
    a champion that cannot be loaded cannot be served or rolled back to either, so keeping it
    would freeze the flywheel on a broken model, while the thresholds are the floor every
    production model must clear anyway. The broken version stays in the registry under
    `previous-champion`, and the reason says what happened. (Registry outages are not this
    case: `load_champion` raises on them, and the task fails.)
    """
    if not _finite(candidate.get(primary)):
        return Decision(False, f"candidate has no {primary} to compare", candidate, champion)
    failures = threshold_failures(candidate, thresholds)
    if failures:
        return Decision(False, "candidate below absolute thresholds: " + "; ".join(failures), candidate, champion)
    value = candidate[primary]
    passed = f"candidate passes the absolute thresholds ({_describe_thresholds(candidate, thresholds)})"
    if champion_error:
        return Decision(True, f"champion unreadable ({champion_error}); judged on absolute thresholds only: "
                        f"{passed}; promoting", candidate, None)
    if champion is None:
        return Decision(True, f"no champion yet; {passed}; promoting", candidate, None)
    incumbent = champion.get(primary)
    if not _finite(incumbent):
        raise ValueError(f"champion metrics have no {primary}: {champion!r}")
    gain = (incumbent - value) if primary in LOWER_IS_BETTER else (value - incumbent)
    numbers = f"{primary} {value:.4f} vs champion {incumbent:.4f} (gain {gain:+.4f}, margin {margin:g})"
    if gain > margin + _EPSILON:
        return Decision(True, f"challenger wins: {numbers}", candidate, champion)
    if gain >= -margin - _EPSILON:
        return Decision(False, f"tie within margin, keeping the champion: {numbers}", candidate, champion)
    return Decision(False, f"champion wins: {numbers}", candidate, champion)


def _describe_thresholds(metrics: Mapping[str, float], thresholds: Mapping[str, float]) -> str:
    parts = []
    for metric, limit in thresholds.items():
        op = "<=" if metric in LOWER_IS_BETTER else ">="
        parts.append(f"{metric} {metrics[metric]:.4f} {op} {limit:g}")
    return ", ".join(parts) or "none set"


# --------------------------------------------------------------------------------------------
# The HTML report
# --------------------------------------------------------------------------------------------


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _figures(result: EvaluationResult, champion: EvaluationResult | None) -> dict[str, str]:
    """ROC, PR, confusion matrix and calibration as base64 PNGs (Figure objects: no pyplot state)."""
    from matplotlib.figure import Figure

    both = [("candidate", result, "tab:blue")] + ([("champion", champion, "tab:orange")] if champion else [])
    out = {}

    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot()
    for name, res, color in both:
        ax.plot(res.roc["fpr"], res.roc["tpr"], color=color, label=f"{name} (AUC {res.metrics['roc_auc']:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="trivial (AUC 0.5)")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    out["ROC curve"] = _png(fig)

    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot()
    for name, res, color in both:
        ax.plot(res.pr["recall"], res.pr["precision"], color=color, label=f"{name} (AP {res.metrics['pr_auc']:.3f})")
    ax.axhline(result.base_rate, linestyle="--", color="grey", label=f"base rate {result.base_rate:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall curve", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper right", fontsize=8)
    out["Precision-recall curve"] = _png(fig)

    fig = Figure(figsize=(4.2 * len(both), 3.8))
    for i, (name, res, _) in enumerate(both, start=1):
        ax = fig.add_subplot(1, len(both), i)
        matrix = np.asarray(res.confusion_matrix)
        ax.imshow(matrix, cmap="Blues")
        for (r, c), value in np.ndenumerate(matrix):
            ax.text(c, r, str(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black", fontsize=12)
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["0", "1"], yticklabels=["0", "1"],
               xlabel="predicted", ylabel="actual", title=f"{name} @ {res.decision_threshold:g}")
    out["Confusion matrix"] = _png(fig)

    fig = Figure(figsize=(4.6, 5.0))
    ax, hist = fig.add_gridspec(2, 1, height_ratios=[3, 1]).subplots(sharex=True)
    for name, res, color in both:
        ax.plot(res.calibration["prob_pred"], res.calibration["prob_true"], "o-", color=color, label=name)
        edges = np.asarray(res.score_histogram["edges"])
        hist.step(edges[:-1], res.score_histogram["counts"], where="post", color=color)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.set(ylabel="observed positive rate", title="Calibration", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="predicted probability", ylabel="rows")
    out["Calibration"] = _png(fig)
    return out


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d2733;max-width:1150px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #dde}
.meta{color:#5a6570;font-size:13px}
.banner{padding:10px 14px;border-radius:6px;margin:14px 0;font-weight:600}
.promote{background:#e3f6e8;border:1px solid #54b870} .reject{background:#fde8e8;border:1px solid #d9534f}
table{border-collapse:collapse;font-size:13px;margin:6px 0} td,th{border:1px solid #ccd;padding:4px 10px;text-align:right}
th{background:#f0f3f7} td:first-child,th:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0} figcaption{font-size:12px;color:#5a6570}
img{max-width:100%;border:1px solid #e4e7eb}
"""


def render_report(result: EvaluationResult, title: str, champion: EvaluationResult | None = None,
                  decision: Decision | None = None) -> str:
    """A self-contained HTML page (images inlined) for the KFP UI's HTML viewer and MLflow."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='meta'>{result.rows} test rows, {result.positives} positives "
             f"(base rate {result.base_rate:.4f}), decision threshold {result.decision_threshold:g}</p>"]
    if decision is not None:
        parts.append(f"<div class='banner {decision.label}'>Decision: {decision.label.upper()} — "
                     f"{html.escape(decision.reason)}</div>")

    names = ["roc_auc", "pr_auc", "f1", "precision", "recall", "accuracy", "brier", "log_loss"]
    header = ["metric", "candidate"] + (["champion", "candidate − champion"] if champion else []) + ["trivial baseline"]
    rows = []
    for name in names:
        row = [name + (" (lower is better)" if name in LOWER_IS_BETTER else ""), result.metrics[name]]
        if champion:
            row += [champion.metrics[name], result.metrics[name] - champion.metrics[name]]
        rows.append(row + [result.baseline.get(name)])
    parts += ["<h2>Metrics</h2>", _table(header, rows),
              f"<p class='meta'>Beats the trivial baseline (constant base rate): "
              f"{'yes' if result.beats_baseline() else 'NO'}</p>"]

    parts.append("<h2>Plots</h2><div class='figs'>")
    for caption, data in _figures(result, champion).items():
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</div>")

    if result.slices:
        by_value = {s["value"]: s for s in champion.slices} if champion else {}
        header = [result.slice_column or "slice", "rows", "positives", "base rate", "ROC AUC", "Brier"]
        header += ["champion ROC AUC"] if champion else []
        rows = []
        for s in result.slices:
            row = [s["value"], s["rows"], s["positives"], s["base_rate"], s["roc_auc"], s["brier"]]
            rows.append(row + ([by_value.get(s["value"], {}).get("roc_auc")] if champion else []))
        parts += [f"<h2>Slices by {html.escape(result.slice_column or '')}</h2>", _table(header, rows)]

    matrix = result.confusion_matrix
    parts += ["<h2>Confusion matrix (candidate)</h2>",
              _table(["actual \\ predicted", "0", "1"], [["0", *matrix[0]], ["1", *matrix[1]]])]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


# --------------------------------------------------------------------------------------------
# Model artifacts and datasets as the components receive them
# --------------------------------------------------------------------------------------------


def load_model(model_dir: str):
    """The project's model artifact (a directory) -> TrainedModel (`training.artifact`)."""
    from training.artifact import load_model as load

    return load(model_dir)


def read_dataset(path: str) -> pd.DataFrame:
    """Read a KFP Dataset artifact: by extension, a single table inside a directory, or by content
    (KFP artifact paths often carry no extension; Parquet files start with b"PAR1")."""
    from components.dataset import read_table

    p = Path(path)
    if p.is_dir():
        tables = sorted(f for f in p.iterdir() if f.name.endswith((".parquet", ".pq", ".csv", ".csv.gz")))
        if len(tables) != 1:
            raise ValueError(f"{path}: expected one table file in the directory, found {[t.name for t in tables]}")
        return read_table(tables[0])
    return read_table(p)  # by extension, else by content


def feature_columns(metadata: Mapping) -> list[str]:
    features = metadata.get("features") or {}
    return list(features.get("numeric", [])) + list(features.get("categorical", []))


def input_example(frame: pd.DataFrame, columns: list[str], rows: int = 5) -> pd.DataFrame:
    """A few feature rows for the MLflow signature, including a missing value of every column that
    has them, so that the signature marks those columns optional and serving accepts nulls."""
    columns = [c for c in columns if c in frame.columns] or list(frame.columns)
    picked = list(frame.index[:rows])
    for column in columns:
        missing = frame.index[frame[column].isna()]
        if len(missing) and not frame.loc[picked, column].isna().any():
            picked.append(missing[0])
    return frame.loc[picked, columns].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# MLflow: evaluation runs, the registry, champion aliases
# --------------------------------------------------------------------------------------------


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # FIELD-NOTES: no phoning home
    import mlflow

    return mlflow


@contextmanager
def _mlflow_at(tracking_uri: str):
    """Point MLflow's fluent API (needed for log_model) at `tracking_uri` for a block, then leave
    the process's globals and MLFLOW_*_URI variables as they were before."""
    mlflow = _mlflow()
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    _mlflow()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """A local SQLite store keeps artifacts beside the database, not in ./mlruns of whatever the
    current directory happens to be; a tracking server manages its own artifact store."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_absolute():
            db = Path.cwd() / db
        return (db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)).as_uri()
    return None


def experiment_id(tracking_uri: str, experiment: str) -> str:
    """The experiment's id, created on first use (two tasks racing to create it is fine)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=_artifact_location(tracking_uri, experiment))
    except MlflowException:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def _flatten(values: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def metric_name(name: str) -> str:
    """MLflow metric keys allow letters, digits, _ - . / and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def log_evaluation(tracking_uri: str, experiment: str, run_name: str, params: Mapping, metrics: Mapping,
                   artifacts: Mapping[str, str | dict], tags: Mapping) -> str:
    """Log one evaluation as an MLflow run and return its id.

    `artifacts` maps a file name in the run to a local file path or to a JSON-able dict. Params
    are flattened (a.b.c) and truncated to MLflow's 6000-character limit; metrics that are None
    or not finite are skipped. The run ends FAILED if logging breaks halfway.
    """
    import time

    from mlflow.entities import Metric, Param, RunTag

    client = _client(tracking_uri)
    run = client.create_run(experiment_id(tracking_uri, experiment), run_name=run_name,
                            tags={k: str(v)[:5000] for k, v in tags.items() if v is not None})
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        flat = _flatten(params)
        client.log_batch(
            run_id,
            metrics=[Metric(metric_name(k), float(v), now, 0) for k, v in metrics.items() if _finite(v)],
            params=[Param(k, (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000]) for k, v in flat.items()],
            tags=[RunTag("flywheel.stage", "evaluation")],
        )
        for name, value in artifacts.items():
            if isinstance(value, Mapping):
                client.log_dict(run_id, dict(value), name)
            else:
                directory = os.path.dirname(name) or None
                if os.path.basename(name) == os.path.basename(value):
                    client.log_artifact(run_id, value, directory)
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        copy = os.path.join(tmp, os.path.basename(name))
                        shutil.copyfile(value, copy)
                        client.log_artifact(run_id, copy, directory)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


_PYFUNC_CLASS = None


def _pyfunc_class():
    """The registry's PythonModel, defined on first use so `import mlflow` stays lazy. Pickled by
    reference as components.evaluation.FlywheelPyfunc (resolved by the module __getattr__ below),
    so whatever loads the registered model needs the flywheel package installed (the image has it)."""
    global _PYFUNC_CLASS
    if _PYFUNC_CLASS is None:
        mlflow = _mlflow()

        class FlywheelPyfunc(mlflow.pyfunc.PythonModel):
            """Our model directory behind MLflow's pyfunc: predict returns P(target = 1)."""

            def load_context(self, context):
                self.model = load_model(context.artifacts["model_dir"])

            def predict(self, context, model_input, params=None):
                return predict_scores(self.model, model_input)

        FlywheelPyfunc.__module__, FlywheelPyfunc.__qualname__ = __name__, "FlywheelPyfunc"
        _PYFUNC_CLASS = FlywheelPyfunc
    return _PYFUNC_CLASS


def __getattr__(name: str):
    if name == "FlywheelPyfunc":
        return _pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pip_requirements() -> list[str]:
    """Exact pins of what the pyfunc imports, from this environment (the image's lock)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pass
    return pins


def _set_champion(client, registered_model: str, version: str) -> str | None:
    """Move `champion` to `version`, first parking the old champion under `previous-champion`
    (so a failure in between never leaves the model without a champion). Returns the old one."""
    current = client.get_registered_model(registered_model).aliases.get(CHAMPION)
    if current is not None and str(current) != str(version):
        client.set_registered_model_alias(registered_model, PREVIOUS_CHAMPION, str(current))
    client.set_registered_model_alias(registered_model, CHAMPION, str(version))
    return None if current is None or str(current) == str(version) else str(current)


def register_model(tracking_uri: str, registered_model: str, model_dir: str, run_id: str | None,
                   lineage: Mapping, input_example: pd.DataFrame, *, experiment: str | None = None,
                   make_champion: bool = True) -> str:
    """Log `model_dir` as an MLflow pyfunc into run `run_id` (a new run in `experiment` when None),
    register it with lineage tags, move `champion` to it (old one -> `previous-champion`), and
    return the new version number."""
    mlflow = _mlflow()
    from mlflow.models import infer_signature

    model = load_model(model_dir)
    signature = infer_signature(input_example, predict_scores(model, input_example))
    tags = {k: str(v)[:5000] for k, v in lineage.items() if v not in (None, "")}
    with _mlflow_at(tracking_uri):
        if run_id:
            run = mlflow.start_run(run_id=run_id)
        else:
            if not experiment:
                raise ValueError("register_model needs run_id or experiment")
            run = mlflow.start_run(experiment_id=experiment_id(tracking_uri, experiment), run_name="register")
        with run:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=_pyfunc_class()(),
                artifacts={"model_dir": str(model_dir)},
                signature=signature,
                input_example=input_example,
                pip_requirements=pip_requirements(),
                metadata={"flywheel": {"features": feature_columns(model.metadata)}},
            )
            run_id = run.info.run_id
        version = mlflow.register_model(info.model_uri, registered_model, tags=tags)
    client = _client(tracking_uri)
    client.update_model_version(registered_model, version.version,
                                description=f"flywheel model from run {run_id}; lineage: {json.dumps(tags, sort_keys=True)}")
    if make_champion:
        previous = _set_champion(client, registered_model, version.version)
        if previous:
            client.set_model_version_tag(registered_model, version.version, "previous_champion", previous)
    return str(version.version)


@dataclass
class Champion:
    """The registry's current champion. `model` has `predict_proba(frame)`; when it could not be
    loaded, `model` is None and `error` says why (the gate then judges on thresholds alone)."""

    version: dict
    model: Any = None
    error: str | None = None

    @property
    def readable(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str:
        return f"{self.version.get('name')} v{self.version.get('version')}"


class _PyfuncScorer:
    """A loaded MLflow pyfunc seen through our `predict_proba` contract (schema enforced, as in serving)."""

    def __init__(self, pyfunc):
        self.pyfunc = pyfunc
        self.metadata = getattr(getattr(pyfunc.unwrap_python_model(), "model", None), "metadata", {})

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.pyfunc.predict(frame), dtype=np.float64).reshape(-1)


def load_champion(tracking_uri: str, registered_model: str, alias: str = CHAMPION) -> Champion | None:
    """The model behind `alias`, or None when there is none yet (no registered model, no alias).

    A champion whose artifacts cannot be loaded comes back with `error` set rather than raising:
    that is a property of the registry's content the gate must decide on. A registry that cannot
    be reached raises (MlflowException), so the task fails and nothing is promoted by accident.
    """
    from mlflow.exceptions import MlflowException

    mlflow = _mlflow()
    client = _client(tracking_uri)
    try:
        registered = client.get_registered_model(registered_model)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    number = registered.aliases.get(alias)
    if number is None:
        return None
    mv = client.get_model_version(registered_model, str(number))
    info = {"name": registered_model, "alias": alias, "version": str(mv.version), "run_id": mv.run_id,
            "source": mv.source, "tags": dict(mv.tags), "status": mv.status}
    with _mlflow_at(tracking_uri):
        try:
            pyfunc = mlflow.pyfunc.load_model(f"models:/{registered_model}/{mv.version}")
            return Champion(info, _PyfuncScorer(pyfunc))
        except Exception as err:  # noqa: BLE001 - whatever is wrong with the stored model
            if _unreachable(err):
                raise
            return Champion(info, None, f"{registered_model} v{mv.version} could not be loaded: "
                                        f"{type(err).__name__}: {str(err)[:300]}")


def _unreachable(err: BaseException) -> bool:
    """True when a failure (or what caused it) is a network problem, not the champion's content:
    MLflow wraps requests/urllib3/botocore errors, so walk the chain and look at the types."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = type(err).__name__
        if isinstance(err, (ConnectionError, TimeoutError)) or "Connection" in name or "Timeout" in name:
            return True
        err = err.__cause__ or err.__context__
    return False
