"""The shadow report: how a challenger answered a mirrored copy of the champion's live traffic.

Where the rows come from: the champion's payload events land in its own version's windows
(`model_version=<N>`); the shadow pair serves the challenger as version `<M>-shadow` and its
mirrored requests carry the request id `<id>-shadow` (locally; on a cluster each pod's logger its
own), so its rows land in `model_version=<M>-shadow` (and pair in the sink by their own `ce-id`).
Decision, on purpose: shadow rows feed neither the champion's drift windows nor the challenger's
own windows after it is promoted (they were answers nobody received); they are read here only.

A row of the report is one instance both versions answered: champion rows joined to shadow rows
by (call, instance), the call being the trace id (x-request-id) where the rows carry one (a cluster:
KServe's logger forwards it, `logger.metadataHeaders`), else the request id without `-shadow`.
Ground truth joins the champion's rows (the request id clients know), and applies to the matched
shadow row too.

Numbers: rows answered by both; agreement (share of identical decisions); the score distribution
shift of the challenger against the champion on the same rows (PSI over the champion's score
deciles, KS: `monitoring.drift` helpers); live ROC AUC of each over rows with ground truth of both
classes. Verdict (`evaluation.shadow`): enough rows, and the challenger's live AUC no more than
`max_regression` below the champion's where truth arrived (and agreement at least `min_agreement`
when set).
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from monitoring.drift import ks_2samp_sorted, psi
from monitoring.windows import INSTANCE, PREDICTION, PROBABILITY, REQUEST_ID, TRACE_ID, TRUTH, read_window
from specs.evaluation import SHADOW_SUFFIX, shadow_id

MIN_TRUTH_ROWS = 50  # rows with ground truth (both classes) before live AUCs are compared


def shadow_version(version: str) -> str:
    """The version a shadow pair reports, so its rows get a partition of their own."""
    return shadow_id(version)


def shadow_request_id(request_id: str) -> str:
    """The request id of a mirrored copy (the sink pairs request and response by it)."""
    return shadow_id(request_id)


@dataclass
class ShadowReport:
    champion_version: str
    challenger_version: str
    rows: int  # instances answered by both
    champion_rows: int
    shadow_rows: int
    required_rows: int
    max_regression: float
    min_agreement: float | None = None
    agreement: float | None = None
    score_psi: float | None = None
    score_ks: float | None = None
    score_ks_p: float | None = None
    truth_rows: int = 0
    champion_auc: float | None = None
    challenger_auc: float | None = None
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    champion_scores: list[float] = field(default_factory=list, repr=False)
    challenger_scores: list[float] = field(default_factory=list, repr=False)

    @property
    def verdict(self) -> str:
        return "PROMOTE" if self.passed else "HOLD"

    def summary(self) -> str:
        """One line: rows mirrored, agreement, score PSI, AUCs, verdict."""
        aucs = (f"live ROC AUC v{self.challenger_version} {self.challenger_auc:.4f} vs "
                f"v{self.champion_version} {self.champion_auc:.4f} ({self.truth_rows:,} labelled)"
                if self.champion_auc is not None and self.challenger_auc is not None else "no live AUC (no labels)")
        agreement = f"{self.agreement:.1%}" if self.agreement is not None else "n/a"
        shift = f"{self.score_psi:.3f}" if self.score_psi is not None else "n/a"
        return (f"{self.rows:,} rows mirrored, agreement {agreement}, score PSI {shift}, {aucs}; "
                f"{self.verdict}: {self.reasons[0] if self.reasons else ''}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("champion_scores")
        data.pop("challenger_scores")
        return {**data, "verdict": self.verdict}


def _keyed(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """`frame`'s `columns` keyed by (call, instance). The call is the trace id (x-request-id) where
    the row has one: on a cluster each pod's logger gives its events their own request id (kserve
    pkg/logger/handler.go getOrCreateID), so only the header both copies carry pairs them. Else it
    is the request id without the `-shadow` a local mirror appends (pipelines/shadow.py)."""
    ids = frame[REQUEST_ID].astype(str)
    calls = "id:" + ids.where(~ids.str.endswith(SHADOW_SUFFIX), ids.str[: -len(SHADOW_SUFFIX)])
    if TRACE_ID in frame.columns:
        traces = frame[TRACE_ID]
        calls = calls.where(traces.isna(), "trace:" + traces.astype(str))
    out = frame[columns].copy()
    out[REQUEST_ID], out[INSTANCE] = calls, frame[INSTANCE].astype("int64")
    return out.drop_duplicates([REQUEST_ID, INSTANCE], keep="last")


def matched(champion: pd.DataFrame, shadow: pd.DataFrame) -> pd.DataFrame:
    """One row per instance both answered (`_keyed` says which rows are one call's): champion
    columns `prediction`, `probability`, `truth`, the challenger's `shadow_prediction`,
    `shadow_probability`."""
    if champion.empty or shadow.empty:
        return pd.DataFrame(columns=[PREDICTION, PROBABILITY, TRUTH, "shadow_prediction", "shadow_probability"])
    right = _keyed(shadow, [PREDICTION, PROBABILITY]).rename(
        columns={PREDICTION: "shadow_prediction", PROBABILITY: "shadow_probability"})
    return _keyed(champion, [PREDICTION, PROBABILITY, TRUTH]).merge(right, on=[REQUEST_ID, INSTANCE])


def _truth_codes(truth: pd.Series, labels) -> np.ndarray:
    """0/1 per row, -1 where there is no truth or it is neither class."""
    from model.labels import LabelError

    codes = np.full(len(truth), -1, dtype=np.int64)
    for value in truth.dropna().unique():
        try:
            code = int(labels.encode(pd.Series([value], dtype=object))[0])
        except LabelError:
            continue
        codes[(truth == value).to_numpy()] = code
    return codes


def _scores(report: ShadowReport, rows: pd.DataFrame) -> None:
    champion = pd.to_numeric(rows[PROBABILITY], errors="coerce").to_numpy(dtype=np.float64)
    challenger = pd.to_numeric(rows["shadow_probability"], errors="coerce").to_numpy(dtype=np.float64)
    champion, challenger = champion[~np.isnan(champion)], challenger[~np.isnan(challenger)]
    report.champion_scores, report.challenger_scores = champion.tolist(), challenger.tolist()
    if len(champion) and len(challenger):
        edges = np.unique(np.quantile(champion, np.linspace(0.1, 0.9, 9)))
        count = lambda values: np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
        report.score_psi = psi(count(champion), count(challenger))
        report.score_ks, report.score_ks_p = ks_2samp_sorted(np.sort(challenger), np.sort(champion))


def _aucs(report: ShadowReport, rows: pd.DataFrame, labels) -> None:
    from sklearn.metrics import roc_auc_score

    truth = _truth_codes(rows[TRUTH], labels)
    champion = pd.to_numeric(rows[PROBABILITY], errors="coerce").to_numpy(dtype=np.float64)
    challenger = pd.to_numeric(rows["shadow_probability"], errors="coerce").to_numpy(dtype=np.float64)
    has = (truth >= 0) & ~np.isnan(champion) & ~np.isnan(challenger)
    report.truth_rows = int(has.sum())
    y = truth[has]
    if len(y) >= MIN_TRUTH_ROWS and 0 < y.sum() < len(y):
        report.champion_auc = float(roc_auc_score(y, champion[has]))
        report.challenger_auc = float(roc_auc_score(y, challenger[has]))


def _judge(report: ShadowReport) -> None:
    failures, passes = [], []
    if report.rows < report.required_rows:
        failures.append(f"only {report.rows:,} of the {report.required_rows:,} shadow rows required")
    else:
        passes.append(f"{report.rows:,} shadow rows (>= {report.required_rows:,})")
    if report.champion_auc is not None and report.challenger_auc is not None:
        drop = report.champion_auc - report.challenger_auc
        numbers = (f"live ROC AUC {report.challenger_auc:.4f} vs champion {report.champion_auc:.4f} "
                   f"(drop {drop:+.4f}, max {report.max_regression:g})")
        (failures if drop > report.max_regression + 1e-9 else passes).append(numbers)
    else:
        passes.append(f"no live AUC ({report.truth_rows:,} rows with ground truth, {MIN_TRUTH_ROWS} of both classes "
                      "needed): judged on rows")
    if report.min_agreement is not None and report.agreement is not None:
        numbers = f"agreement {report.agreement:.1%} (min {report.min_agreement:.1%})"
        (failures if report.agreement < report.min_agreement else passes).append(numbers)
    report.passed = not failures
    report.reasons = failures + passes if failures else passes


def compare(champion: pd.DataFrame, shadow: pd.DataFrame, champion_version: str, challenger_version: str,
            spec, labels=None) -> ShadowReport:
    """The report of `shadow` (the challenger's rows) against `champion` (its window) under `spec`
    (a `specs.evaluation.ShadowSpec`); `labels` (a LabelMapping) reads the ground truth."""
    from model.labels import LabelMapping

    rows = matched(champion, shadow)
    report = ShadowReport(str(champion_version), str(challenger_version), len(rows), len(champion), len(shadow),
                          spec.rows, spec.max_regression, spec.min_agreement)
    if len(rows):
        same = rows[PREDICTION].astype(str).to_numpy() == rows["shadow_prediction"].astype(str).to_numpy()
        report.agreement = float(same.mean())
        _scores(report, rows)
        _aucs(report, rows, labels or LabelMapping.from_dict(None))
    _judge(report)
    return report


def load(root: str, champion_version: str, challenger_version: str, spec, labels=None) -> ShadowReport:
    """`compare` over the sink windows under `root`."""
    champion = read_window(root, model_version=str(champion_version))
    shadow = read_window(root, model_version=shadow_version(str(challenger_version)))
    return compare(champion, shadow, champion_version, challenger_version, spec, labels)


# ---- the HTML artifact ----------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d2733;max-width:1000px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #dde}
.meta{color:#5a6570;font-size:13px} table{border-collapse:collapse;font-size:14px}
th,td{padding:4px 10px;border-bottom:1px solid #eef;text-align:left}
.banner{padding:10px 14px;border-radius:6px;margin:12px 0;font-weight:600}
.ok{background:#e3f4e8;color:#17612f} .hold{background:#fdeaea;color:#8a1c1c}
"""


def _figure(report: ShadowReport) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.0))
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 21)
    ax.hist(report.champion_scores, bins=bins, alpha=0.45, color="#4c78a8",
            label=f"champion v{report.champion_version}")
    ax.hist(report.challenger_scores, bins=bins, histtype="step", linewidth=2, color="#f58518",
            label=f"challenger v{report.challenger_version}")
    ax.set_xlabel("P(positive)")
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def render_html(report: ShadowReport) -> str:
    """A self-contained page: the verdict, the numbers, both score distributions."""
    fmt = lambda v, spec="{:.4f}": "n/a" if v is None else spec.format(v)
    title = f"Shadow report: challenger v{report.challenger_version} vs champion v{report.champion_version}"
    rows = [("rows answered by both", f"{report.rows:,} (required {report.required_rows:,})"),
            ("champion rows / shadow rows logged", f"{report.champion_rows:,} / {report.shadow_rows:,}"),
            ("agreement of decisions", fmt(report.agreement, "{:.1%}")),
            ("score PSI (challenger vs champion)", fmt(report.score_psi, "{:.3f}")),
            ("score KS D (p)", f"{fmt(report.score_ks)} ({fmt(report.score_ks_p, '{:.3g}')})"),
            ("rows with ground truth", f"{report.truth_rows:,}"),
            ("live ROC AUC champion", fmt(report.champion_auc)),
            ("live ROC AUC challenger", fmt(report.challenger_auc))]
    kind = "ok" if report.passed else "hold"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<div class='banner {kind}'>{report.verdict}: {html.escape('; '.join(report.reasons))}</div>",
             "<table><tbody>" + "".join(f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
             + "</tbody></table>"]
    if report.champion_scores:
        image = f"<img alt='scores' src='data:image/png;base64,{_figure(report)}'>"
        parts.append(f"<h2>Scores on the same rows</h2>{image}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write(report: ShadowReport, directory) -> tuple[str, str]:
    """`report.html` and `report.json` in `directory` (a local path); their paths."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.html").write_text(render_html(report), encoding="utf-8")
    (directory / "report.json").write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    return str(directory / "report.html"), str(directory / "report.json")
