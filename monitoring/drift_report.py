"""The drift report: a self-contained HTML page (summary, per-feature table with drifted rows
highlighted, training-vs-live plots per feature and of the scores, the decision) for the KFP UI's
HTML viewer, MLflow and the monitor service. Plots are matplotlib `Figure`s (no pyplot state)
inlined as base64 PNGs."""
from __future__ import annotations

import base64
import html
import io

import numpy as np

from monitoring.drift import DriftReport, FeatureDrift

TRAINING, LIVE = ("training", "#4c78a8"), ("live", "#f58518")


def _figure():
    """A plot's figure. Constrained layout fits titles, labels and rotated ticks in one layout pass;
    `bbox_inches="tight"` drew every figure twice (~2x the time of 11 plots per checked window)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(4.2, 2.8), layout="constrained")


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return base64.b64encode(buffer.getvalue()).decode()


def _shares(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    return counts / counts.sum() if counts.sum() else counts


def _outer_edges(edges: list, low: float | None, high: float | None) -> np.ndarray:
    """Finite edges for plotting bins whose outer ends are open: as wide as the widest inner bin,
    or only to the data's extremes when they are closer (a far outlier would squash the plot)."""
    edges = np.asarray(edges, dtype=np.float64)
    if len(edges) == 0:
        centre = low if low is not None else 0.0
        return np.array([centre - 0.5, centre + 0.5])
    width = float(np.max(np.diff(edges))) if len(edges) > 1 else max(abs(float(edges[0])) / 4, 1.0)
    first = edges[0] - width if low is None or low >= edges[0] else max(low, edges[0] - width)
    last = edges[-1] + width if high is None or high <= edges[-1] else min(high, edges[-1] + width)
    return np.concatenate(([first], edges, [last]))


def _density_plot(ax, edges: np.ndarray, reference_counts, live_counts) -> None:
    widths = np.diff(edges)
    for (name, color), counts, filled in ((TRAINING, reference_counts, True), (LIVE, live_counts, False)):
        density = _shares(counts) / widths
        if filled:
            ax.bar(edges[:-1], density, width=widths, align="edge", color=color, alpha=0.45, label=name)
        else:
            ax.stairs(density, edges, color=color, linewidth=2, label=name)


def _numeric_figure(row: FeatureDrift, ref: dict) -> str:
    low = min(v for v in (ref.get("min"), row.live_min) if v is not None) if ref.get("min") is not None else None
    high = max(v for v in (ref.get("max"), row.live_max) if v is not None) if ref.get("max") is not None else None
    edges = _outer_edges(ref["edges"], low, high)
    fig = _figure()
    ax = fig.add_subplot()
    _density_plot(ax, edges, ref["counts"], row.counts)
    ax.set(title=row.feature, xlabel="value (training decile bins; outer bins open-ended)", ylabel="density")
    ax.legend(fontsize=8)
    return _png(fig)


def _categorical_figure(row: FeatureDrift, ref: dict) -> str:
    reference = np.array([*ref["counts"], ref.get("other", 0), 0], dtype=np.float64)
    keep = (reference > 0) | (np.asarray(row.counts) > 0)
    names = [b for b, k in zip(row.buckets, keep) if k]
    x = np.arange(len(names))
    fig = _figure()
    ax = fig.add_subplot()
    for offset, (name, color), counts in ((-0.2, TRAINING, reference), (0.2, LIVE, np.asarray(row.counts))):
        ax.bar(x + offset, _shares(counts)[keep], width=0.4, color=color, label=name)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set(title=row.feature, ylabel="share of values")
    ax.legend(fontsize=8)
    return _png(fig)


def _score_figure(report: DriftReport, score: dict) -> str:
    low, high = score.get("range", [0.0, 1.0])
    edges = np.concatenate(([low], np.asarray(score["edges"], dtype=np.float64), [high]))
    fig = _figure()
    ax = fig.add_subplot()
    _density_plot(ax, edges, score["counts"], report.prediction_counts)
    ax.set(title="predicted probability", xlabel="P(positive) (held-out decile bins)", ylabel="density")
    ax.legend(fontsize=8)
    return _png(fig)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if value and abs(value) < 1e-3 else f"{value:.{digits}f}"
    return html.escape(str(value))


_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d2733;max-width:1150px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #dde}
.meta{color:#5a6570;font-size:13px}
.banner{padding:10px 14px;border-radius:6px;margin:14px 0;font-weight:600}
.ok{background:#e3f6e8;border:1px solid #54b870} .breach{background:#fde8e8;border:1px solid #d9534f}
.hold{background:#fff6e0;border:1px solid #e0a800}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #ccd;padding:4px 10px;text-align:right}
th{background:#f0f3f7} td:first-child,th:first-child{text-align:left}
tr.drifted td{background:#fde8e8;font-weight:600} td:last-child{text-align:left}
summary{font-weight:400;font-size:13px;cursor:pointer}
ul{font-size:13px}
.figs{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0} figcaption{font-size:12px;color:#5a6570}
img{max-width:100%;border:1px solid #e4e7eb}
"""


def _feature_table(report: DriftReport) -> list[str]:
    """The per-feature table, drifted rows highlighted."""
    header = ["feature", "kind", "PSI", "test", "statistic", "p-value", "adjusted p", "missing (live)",
              "missing (training)", "drifted", "reasons"]
    body = []
    for f in report.features:
        cells = [f.feature, f.kind, _fmt(f.psi), f.test or "–", _fmt(f.statistic), _fmt(f.p_value), _fmt(f.p_adjusted),
                 f"{f.missing_rate:.2%}", f"{f.reference_missing_rate:.2%}", _fmt(f.drifted),
                 html.escape("; ".join(f.reasons)) or "–"]
        css = " class='drifted'" if f.drifted or f.missing_breach else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{c if i else html.escape(str(c))}</td>" for i, c in enumerate(cells))
                    + "</tr>")
    return ["<h2>Features</h2>",
            "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>"]


def _figures(report: DriftReport, profile: dict) -> list[str]:
    """Training vs live: the scores' and each feature's distribution, one inlined PNG each."""
    parts = ["<h2>Training vs live</h2><div class='figs'>"]
    figures: list[tuple[str, str]] = []
    if report.prediction_counts and profile.get("score"):
        figures.append(("predicted probability", _score_figure(report, profile["score"])))
    for f in report.features:
        if f.rows == 0:
            continue
        if f.kind == "numeric":
            figures.append((f.feature, _numeric_figure(f, profile["numeric"][f.feature])))
        else:
            figures.append((f.feature, _categorical_figure(f, profile["categorical"][f.feature])))
    for caption, data in figures:
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</div>")
    return parts


def render_report(report: DriftReport, profile: dict, decision=None, title: str = "Drift report") -> str:
    """A self-contained HTML page (images inlined, nothing fetched) for one checked window; with
    `decision` (a `monitoring.check.Decision`: retrain, reasons; not imported, as the check renders
    this page) a banner saying it."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='meta'>{report.rows:,} live rows against a profile of {profile.get('rows', 0):,} training "
             f"rows; {len(report.features)} features; p-values {html.escape(report.correction)}-corrected</p>"]
    if decision is not None:
        kind = "breach" if decision.retrain else "hold"
        verdict = "RETRAIN" if decision.retrain else "NO RETRAINING"
        parts.append(f"<div class='banner {kind}'>Decision: {verdict} — {html.escape(decision.reasons[0])}")
        if decision.reasons[1:]:
            parts.append("<details><summary>why</summary><ul>"
                         + "".join(f"<li>{html.escape(r)}</li>" for r in decision.reasons[1:]) + "</ul></details>")
        parts.append("</div>")

    parts.append("<h2>Summary</h2>")
    if not report.enough_data:
        parts.append("<div class='banner hold'>Not enough data: no tests, no breaches</div>")
    elif report.breaches:
        parts.append(f"<div class='banner breach'>{len(report.breaches)} breach(es)</div>")
    else:
        parts.append("<div class='banner ok'>No breach</div>")
    summary = [("rows", f"{report.rows:,}"), ("drifted features", ", ".join(report.drifted) or "none"),
               ("prediction PSI", _fmt(report.prediction_psi)),
               ("live ROC AUC", _fmt(report.live_roc_auc)), ("live PR AUC", _fmt(report.live_pr_auc)),
               ("rows with ground truth", f"{report.truth_rows:,}"),
               ("data quality", html.escape(report.quality["summary"]) if report.quality else "not checked")]
    parts.append("<table><tbody>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary)
                 + "</tbody></table>")
    if report.breaches:
        parts.append("<ul class='breaches'>" + "".join(f"<li>{html.escape(b)}</li>" for b in report.breaches)
                     + "</ul>")
    if report.notes:
        parts.append("<p class='meta'>" + "<br>".join(html.escape(n) for n in report.notes) + "</p>")

    parts += _feature_table(report)
    parts += _figures(report, profile)
    if report.quality and (report.quality["failures"] or report.quality["warnings"]):
        parts.append("<h2>Data quality</h2><ul>"
                     + "".join(f"<li>failed: {html.escape(x)}</li>" for x in report.quality["failures"])
                     + "".join(f"<li>warning: {html.escape(x)}</li>" for x in report.quality["warnings"]) + "</ul>")
    page = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{page}\n</body></html>\n")
