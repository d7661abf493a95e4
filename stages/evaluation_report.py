"""The evaluation and gate report: an HTML page with metrics tables and plots (matplotlib, Agg,
no pyplot state) that the Kubeflow UI shows as an HTML artifact."""
from __future__ import annotations

import base64
import html
import io

import numpy as np

from stages.gate import Decision
from stages.metrics import LOWER_IS_BETTER, EvaluationResult


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
        names = [str(c) for c in res.classes]
        ax.imshow(matrix, cmap="Blues")
        for (r, c), value in np.ndenumerate(matrix):
            ax.text(c, r, str(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black", fontsize=12)
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=names, yticklabels=names,
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
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #ccd;padding:4px 10px;text-align:right}
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
              _table(["actual \\ predicted", *map(str, result.classes)],
                     [[str(result.classes[0]), *matrix[0]], [str(result.classes[1]), *matrix[1]]])]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")
