"""Evaluation as plain Python: one model's metrics, curves, calibration and slices on held-out data.

Metrics come from scikit-learn. The gate, the HTML report, KFP and MLflow all read the same
`EvaluationResult`. Labels are scored as codes (1 = positive class, per the model's label mapping).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from model.labels import LabelMapping

MAX_CURVE_POINTS = 200  # KFP stores curves in artifact metadata: keep them small
LOWER_IS_BETTER = frozenset({"brier", "log_loss"})
MISSING_SLICE = "(missing)"


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
    classes: list = field(default_factory=lambda: [0, 1])  # [negative, positive] as in the data

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


def _labels(frame: pd.DataFrame, target: str, mapping: LabelMapping) -> np.ndarray:
    """The target as 0/1 codes through the model's label mapping; errors name the column."""
    if target not in frame.columns:
        raise ValueError(f"target column {target!r} is not in the test data (columns: {list(frame.columns)})")
    if frame[target].isna().any():
        raise ValueError(f"target column {target!r} has {int(frame[target].isna().sum())} missing values")
    codes = mapping.encode(frame[target], target)
    if len(np.unique(codes)) < 2:
        only = mapping.classes[int(codes[0])] if len(codes) else "none"
        raise ValueError(f"test data holds only class {only!r} of {target!r}: ROC AUC is undefined")
    return codes


def model_labels(model) -> LabelMapping:
    """The label mapping saved with a model (`metadata["labels"]`); 0/1 for older models."""
    return LabelMapping.from_dict((getattr(model, "metadata", None) or {}).get("labels"))


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
    """Score `model` on a held-out table; `model` is anything with `predict_proba(frame)` (the
    probability of the positive class) and the label mapping in its `metadata`."""
    from sklearn import metrics as skm
    from sklearn.calibration import calibration_curve

    mapping = model_labels(model)
    labels = _labels(frame, target, mapping)
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
        classes=mapping.classes,
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
