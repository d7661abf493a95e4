"""Drift and data-quality statistics of a live window against the model's reference profile. The
retraining decision over a history of checks (the hysteresis) is `monitoring.check`'s.

Per feature: PSI over the profile's bins (numeric: its quantile edges; categorical: its categories,
"other" and an unseen-category bucket; epsilon-smoothed), a two-sample KS test against the profile's
reference sample (numeric) or a two-sample chi-square test of live against reference category counts
(categorical), corrected for testing many features at once, and the missing rate against
training's. Per window: PSI of the live scores against the held-out scores, live ROC/PR AUC where
ground truth has arrived, and the training expectation suite (great-expectations) on the live
rows. Statistical tests and breaches need `spec.min_samples` rows.

Vectorised: one sort per numeric column (PSI bins and the KS statistic are binary searches of the
profile's few edges and reference points into it) and one hash pass per categorical column.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from model.labels import LabelError, LabelMapping
from model.preprocessing import category_key
from model.profile import bin_counts, numeric_values
from specs import MonitoringSpec

EPSILON = 1e-4  # PSI smoothing: a bucket's share is at least this (an empty bucket would make PSI infinite)
OTHER, UNSEEN = "(other)", "(unseen)"
KS_EXACT_MAX = 10_000  # scipy's ks_2samp "auto" method is exact up to this sample size, asymptotic above
TRUTH, PROBABILITY = "truth", "probability"
TOP_UNSEEN = 5


@dataclass
class FeatureDrift:
    """One feature's row in a drift report."""

    feature: str
    kind: str  # numeric | categorical
    psi: float | None
    test: str | None  # ks | chi2 | None (too few rows)
    statistic: float | None
    p_value: float | None
    p_adjusted: float | None
    missing_rate: float
    reference_missing_rate: float
    drifted: bool = False
    missing_breach: bool = False
    reasons: list[str] = field(default_factory=list)
    rows: int = 0  # live non-missing values
    counts: list[int] = field(default_factory=list)  # live counts in the profile's bins / buckets
    buckets: list[str] | None = None  # categorical: bucket names (categories, other, unseen)
    unseen: dict[str, int] = field(default_factory=dict)  # categorical: the most frequent unseen values
    live_min: float | None = None
    live_max: float | None = None


@dataclass
class DriftReport:
    """What one check of a window found; `breaches` say in words what is wrong (empty: nothing)."""

    rows: int
    enough_data: bool
    features: list[FeatureDrift]
    prediction_psi: float | None = None
    prediction_counts: list[int] = field(default_factory=list)
    live_roc_auc: float | None = None
    live_pr_auc: float | None = None
    truth_rows: int = 0
    quality: dict | None = None  # GX outcome summary on the live rows
    breaches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    correction: str = "holm"

    @property
    def breached(self) -> bool:
        return bool(self.breaches)

    @property
    def drifted(self) -> list[str]:
        return [f.feature for f in self.features if f.drifted]

    def feature(self, name: str) -> FeatureDrift:
        return next(f for f in self.features if f.feature == name)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for KFP Metrics and Prometheus (absent values are left out, not NaN)."""
        out: dict[str, float] = {"rows": float(self.rows), "enough_data": float(self.enough_data),
                                 "breaches": float(len(self.breaches)), "features_drifted": float(len(self.drifted)),
                                 "truth_rows": float(self.truth_rows)}
        if not self.enough_data:
            # Too few rows to test: publishing their PSI would let an alert rule act on noise
            # that the decision itself refuses to act on (min_samples).
            return out
        for name in ("prediction_psi", "live_roc_auc", "live_pr_auc"):
            if getattr(self, name) is not None:
                out[name] = float(getattr(self, name))
        for f in self.features:
            out[f"missing_rate_{f.feature}"] = float(f.missing_rate)
            out[f"drifted_{f.feature}"] = float(f.drifted)
            for name in ("psi", "statistic", "p_value", "p_adjusted"):
                if getattr(f, name) is not None:
                    out[f"{name}_{f.feature}"] = float(getattr(f, name))
        for name, value in ((self.quality or {}).get("metrics") or {}).items():
            out[f"quality_{name}"] = float(value)
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "breached": self.breached, "drifted": self.drifted}

    @classmethod
    def from_dict(cls, data: dict) -> DriftReport:
        names = set(cls.__dataclass_fields__)
        features = [FeatureDrift(**f) for f in data.get("features", [])]
        return cls(**{k: v for k, v in data.items() if k in names and k != "features"}, features=features)


# --------------------------------------------------------------------------------------- statistics


def psi(reference_counts, live_counts, epsilon: float = EPSILON) -> float | None:
    """Population stability index sum((live - ref) * ln(live / ref)) over shares of matching bins;
    bins empty on both sides are left out, and shares are floored at `epsilon` (then renormalised)."""
    ref, live = np.asarray(reference_counts, dtype=np.float64), np.asarray(live_counts, dtype=np.float64)
    keep = (ref > 0) | (live > 0)
    ref, live = ref[keep], live[keep]
    if ref.sum() <= 0 or live.sum() <= 0:
        return None
    p = np.maximum(ref / ref.sum(), epsilon)
    q = np.maximum(live / live.sum(), epsilon)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def ks_2samp_sorted(live: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(statistic, p-value) of `scipy.stats.ks_2samp(live, reference)` (two-sided, method "auto")
    for sorted samples. Up to KS_EXACT_MAX rows this is ks_2samp itself (exact p-values, cheap);
    above, the same statistic without ks_2samp's search of every pooled point in both samples: the
    reference ECDF is constant between two reference values and the live one only grows, so the
    extremes of their difference sit at the reference values (the live ECDF just before and at each),
    and the p-value is ks_2samp's asymptotic one (`kstwo.sf(D, round(n1*n2/(n1+n2)))`)."""
    n1, n2 = len(live), len(reference)
    if max(n1, n2) <= KS_EXACT_MAX:
        result = stats.ks_2samp(live, reference)
        return float(result.statistic), float(result.pvalue)
    values, counts = np.unique(reference, return_counts=True)
    f2 = np.cumsum(counts) / n2  # reference ECDF at each distinct value
    before = np.searchsorted(live, values, side="left")  # live values below each reference value
    upto = np.searchsorted(live, values, side="right")  # ... and up to it
    # live minus reference: largest just before the next reference value (or at the end of the live data)
    d_plus = max(before[0] / n1, float(np.max(np.append(before[1:], n1) / n1 - f2)))
    d_minus = float(np.max(f2 - upto / n1))  # reference minus live: largest at a reference value
    d = max(d_plus, d_minus, 0.0)
    m, n = sorted([float(n1), float(n2)], reverse=True)
    return float(d), float(np.clip(stats.kstwo.sf(d, np.round(m * n / (m + n))), 0.0, 1.0))


def adjust(p_values: Sequence[float], method: str) -> np.ndarray:
    """Multiple-testing corrected p-values: holm (step-down, family-wise), bonferroni, fdr_bh
    (Benjamini-Hochberg, false discovery rate)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    if method == "bonferroni":
        return np.minimum(1.0, p * m)
    if method == "holm":
        order = np.argsort(p, kind="stable")
        stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
        out = np.empty(m)
        out[order] = np.minimum(1.0, stepped)
        return out
    if method == "fdr_bh":
        return stats.false_discovery_control(p, method="bh")
    raise ValueError(f"unknown correction {method!r}; use holm, bonferroni or fdr_bh")


# ------------------------------------------------------------------------------------------ columns


def _share(count: float, total: float) -> float:
    return float(count / total) if total else 0.0


def _numeric(name: str, values: pd.Series | None, ref: dict, test: bool, min_samples: int) -> FeatureDrift:
    if values is None:  # the column is not in the window at all
        return FeatureDrift(name, "numeric", None, None, None, None, None, 1.0, ref["missing_rate"],
                            reasons=["column absent from the live data"],
                            counts=[0] * (len(ref["edges"]) + 1))
    raw = numeric_values(values)
    missing = np.isnan(raw)
    n_missing = int(missing.sum())
    live = np.sort(raw[~missing] if n_missing else raw)
    counts = bin_counts(live, ref["edges"])
    row = FeatureDrift(name, "numeric", psi(ref["counts"], counts), None, None, None, None,
                       _share(n_missing, len(raw)), ref["missing_rate"], rows=len(live), counts=counts.tolist(),
                       live_min=float(live[0]) if len(live) else None, live_max=float(live[-1]) if len(live) else None)
    if test and len(live) >= min_samples and ref["sample"]:
        row.test = "ks"
        row.statistic, row.p_value = ks_2samp_sorted(live, np.asarray(ref["sample"], dtype=np.float64))
    return row


def _bucket_of(key: str, ref: dict, index: dict[str, int], other: set[str]) -> int:
    if key in index:
        return index[key]
    if key in other or ref.get("other_truncated"):
        return len(index)  # OTHER
    return len(index) + 1  # UNSEEN


def _categorical(name: str, values: pd.Series | None, ref: dict, test: bool, min_samples: int) -> FeatureDrift:
    buckets = [*ref["categories"], OTHER, UNSEEN]
    if values is None:
        return FeatureDrift(name, "categorical", None, None, None, None, None, 1.0, ref["missing_rate"],
                            reasons=["column absent from the live data"], counts=[0] * len(buckets),
                            buckets=buckets)
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    per_unique = np.bincount(codes + 1, minlength=len(uniques) + 1)
    n_missing = int(per_unique[0])
    index = {c: i for i, c in enumerate(ref["categories"])}
    other = set(ref.get("other_values", []))
    keys = [category_key(v) for v in uniques]
    bucket = np.fromiter((_bucket_of(k, ref, index, other) for k in keys), dtype=np.int64, count=len(keys))
    counts = np.bincount(bucket, weights=per_unique[1:], minlength=len(buckets)).astype(np.int64)
    unseen: dict[str, int] = {}
    for key, b, count in zip(keys, bucket, per_unique[1:]):
        if b == len(buckets) - 1:
            unseen[key] = unseen.get(key, 0) + int(count)
    unseen = dict(sorted(unseen.items(), key=lambda kv: -kv[1])[:TOP_UNSEEN])
    reference = np.array([*ref["counts"], ref.get("other", 0), 0], dtype=np.float64)
    present = int(counts.sum())
    row = FeatureDrift(name, "categorical", psi(reference, counts), None, None, None, None,
                       _share(n_missing, len(values)), ref["missing_rate"], rows=present, counts=counts.tolist(),
                       buckets=buckets, unseen=unseen)
    if test and present >= min_samples:
        keep = (reference > 0) | (counts > 0)
        row.test = "chi2"
        if keep.sum() < 2:
            row.statistic, row.p_value = 0.0, 1.0
        else:
            # Two-sample (homogeneity) chi-square of the reference and live counts: the reference
            # frequencies are a sample too, and a goodness-of-fit test that takes them as exact
            # (scipy.stats.chisquare) flags a fresh sample of the same distribution once the window
            # is a few times the training set (its statistic grows by 1 + live rows / training rows).
            # An unseen category (no reference count) makes the statistic large, not infinite.
            result = stats.chi2_contingency(np.vstack([reference[keep], counts[keep]]), correction=False)
            row.statistic, row.p_value = float(result.statistic), float(result.pvalue)
    return row


# ---------------------------------------------------------------------------------------- the suite


def _columns_of(kwargs: dict) -> list[str]:
    cols = [kwargs[k] for k in ("column", "column_A", "column_B") if kwargs.get(k)]
    return cols + list(kwargs.get("column_list") or [])


def live_suite(suite: dict, features: Sequence[str], columns: Sequence[str]) -> dict:
    """The training suite for live rows: only expectations on feature columns (and on the id column
    when the window has one); live rows have no target, and a window's size is `min_samples`'
    business, so target and table-size expectations go; the column set is the features (+ id)."""
    id_column = suite.get("id_column")
    allowed = set(features) | ({id_column} if id_column and id_column in columns else set())
    kept = []
    for entry in suite["expectations"]:
        kwargs = entry["kwargs"]
        if entry["type"] == "expect_table_columns_to_match_set":
            kept.append({**entry, "kwargs": {**kwargs, "column_set": [c for c in kwargs["column_set"]
                                                                      if c in allowed]}})
            continue
        used = _columns_of(kwargs)
        if used and set(used) <= allowed:
            kept.append(entry)
    return {**suite, "name": f"{suite['name']}-live", "expectations": kept}


def check_quality(window: pd.DataFrame, suite: dict, features: Sequence[str]) -> dict:
    """The training suite (as `live_suite`) on the window's feature (and id) columns, in GX."""
    from stages.validation import validate_frame

    checked = live_suite(suite, features, list(window.columns))
    allowed = set(features) | {suite.get("id_column")}
    columns = [c for c in window.columns if c in allowed]
    id_column = suite.get("id_column") if suite.get("id_column") in columns else None
    outcome = validate_frame(window[columns], checked, id_column=id_column, source="live window")
    return {"suite": checked["name"], "passed": outcome.passed, "summary": outcome.summary(),
            "metrics": outcome.metrics(), "failures": [r.describe() for r in outcome.blocking_failures],
            "warnings": [r.describe() for r in outcome.warnings]}


# ------------------------------------------------------------------------------------------ a window


def _feature_lists(features, profile: dict) -> tuple[list[str], list[str]]:
    if features is None:
        features = profile["features"]
    if isinstance(features, dict):
        return list(features.get("numeric", [])), list(features.get("categorical", []))
    return list(features.numeric), list(features.categorical)


def _truth_codes(truth: pd.Series, labels: LabelMapping) -> tuple[np.ndarray, int]:
    """(0/1 code per row, -1 where there is no usable truth; how many values are neither class)."""
    codes, uniques = pd.factorize(truth, use_na_sentinel=True)
    mapped = np.full(len(uniques) + 1, -1, dtype=np.int64)
    unknown = 0
    per_unique = np.bincount(codes + 1, minlength=len(uniques) + 1)
    for i, value in enumerate(uniques):
        try:
            mapped[i] = int(labels.encode(pd.Series([value], dtype=object))[0])
        except LabelError:
            unknown += int(per_unique[i + 1])
    return mapped[codes], unknown  # codes == -1 (missing) picks mapped[-1] == -1


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e-3 else f"{value:.3f}"


def _feature_breaches(report: DriftReport, spec: MonitoringSpec) -> None:
    """The p-values adjusted for testing many features (`spec.correction`), then each feature's
    reasons and breaches (with enough data only)."""
    tested = [f for f in report.features if f.p_value is not None]
    for f, p in zip(tested, adjust([f.p_value for f in tested], spec.correction)):
        f.p_adjusted = float(p)
    for f in report.features if report.enough_data else []:
        absent = bool(f.reasons)  # "column absent": no values to compare, only the missing rate
        if f.psi is not None and f.psi > spec.psi_threshold:
            f.reasons.append(f"PSI {f.psi:.3f} > {spec.psi_threshold:g}")
        if f.p_adjusted is not None and f.p_adjusted < spec.alpha:
            test = "KS D" if f.test == "ks" else "chi-square"
            f.reasons.append(f"{test} {f.statistic:.4g}, {spec.correction}-adjusted p {_fmt(f.p_adjusted)} "
                             f"< alpha {spec.alpha:g}")
        f.drifted = len(f.reasons) > absent
        if f.unseen:
            f.reasons.append(f"unseen categories in {_share(f.counts[-1], f.rows):.1%} of values (e.g. "
                             f"{', '.join(repr(k) for k in list(f.unseen)[:3])})")
        if f.missing_rate > f.reference_missing_rate + spec.missing_rate_threshold:
            f.missing_breach = True
            f.reasons.append(f"missing rate {f.missing_rate:.1%} > training's {f.reference_missing_rate:.1%} "
                             f"+ {spec.missing_rate_threshold:.1%}")
        if f.drifted or f.missing_breach:
            report.breaches.append(f"{f.feature}: " + "; ".join(f.reasons))


def _prediction_drift(report: DriftReport, window: pd.DataFrame, profile: dict, spec: MonitoringSpec) -> None:
    """PSI of the live scores against the held-out scores of the profile."""
    if PROBABILITY in window.columns and profile.get("score"):
        scores = np.sort(numeric_values(window[PROBABILITY]))
        scores = scores[: len(scores) - int(np.isnan(scores).sum())]  # NaN sorts last
        counts = bin_counts(scores, profile["score"]["edges"])
        report.prediction_counts = counts.tolist()
        report.prediction_psi = psi(profile["score"]["counts"], counts)
        breached = report.prediction_psi is not None and report.prediction_psi > spec.prediction_psi_threshold
        if report.enough_data and breached:
            report.breaches.append(f"prediction drift: score PSI {report.prediction_psi:.3f} > "
                                   f"{spec.prediction_psi_threshold:g}")
    else:
        report.notes.append(f"no {PROBABILITY!r} column or no score profile: prediction drift not checked")


def _live_auc(report: DriftReport, window: pd.DataFrame, spec: MonitoringSpec, labels: LabelMapping | None) -> None:
    """Live ROC / PR AUC over the rows whose ground truth has arrived."""
    if TRUTH in window.columns and PROBABILITY in window.columns:
        truth, unknown = _truth_codes(window[TRUTH], labels or LabelMapping.from_dict(None))
        has = truth >= 0
        report.truth_rows = int(has.sum())
        if unknown:
            report.notes.append(f"{unknown:,} truth values are neither class of the model's labels: ignored")
        score = numeric_values(window[PROBABILITY])
        has &= ~np.isnan(score)
        y, score = truth[has], score[has]
        if report.enough_data and len(y) >= spec.min_samples and 0 < y.sum() < len(y):
            from sklearn.metrics import average_precision_score, roc_auc_score

            report.live_roc_auc = float(roc_auc_score(y, score))
            report.live_pr_auc = float(average_precision_score(y, score))
            if report.live_roc_auc < spec.min_roc_auc:
                report.breaches.append(f"live ROC AUC {report.live_roc_auc:.3f} < {spec.min_roc_auc:g} over "
                                       f"{report.truth_rows:,} rows with ground truth")
        else:
            report.notes.append(f"{report.truth_rows:,} rows with ground truth (both classes and min_samples "
                                f"{spec.min_samples} needed): live AUC not computed")


def check_window(window: pd.DataFrame, profile: dict, spec: MonitoringSpec, features=None, suite: dict | None = None,
                 labels: LabelMapping | None = None) -> DriftReport:
    """Check one window of logged requests (feature columns, `probability`, optional `truth`)
    against the model's reference profile; `features` (numeric, categorical; default: the
    profile's), `suite` (the training expectation suite; None: no quality check) and `labels`
    (the model's mapping, to read `truth`; default 0/1)."""
    numeric, categorical = _feature_lists(features, profile)
    unknown = [c for c in numeric if c not in profile["numeric"]]
    unknown += [c for c in categorical if c not in profile["categorical"]]
    if unknown:
        raise ValueError(f"features {unknown} are not in the reference profile (it has "
                         f"{profile['features']}): is it this model's profile?")
    rows = len(window)
    enough = rows >= spec.min_samples
    report = DriftReport(rows=rows, enough_data=enough, features=[], correction=spec.correction)
    if not enough:
        report.notes.append(f"{rows} rows < min_samples {spec.min_samples}: no tests, no breaches, no decision")
    columns = set(window.columns)
    for name in numeric:
        report.features.append(_numeric(name, window[name] if name in columns else None,
                                        profile["numeric"][name], enough, spec.min_samples))
    for name in categorical:
        report.features.append(_categorical(name, window[name] if name in columns else None,
                                            profile["categorical"][name], enough, spec.min_samples))

    _feature_breaches(report, spec)
    _prediction_drift(report, window, profile, spec)
    _live_auc(report, window, spec, labels)
    if suite is not None and enough:
        report.quality = check_quality(window, suite, [*numeric, *categorical])
        report.breaches += [f"data quality: {failure}" for failure in report.quality["failures"]]
    elif suite is not None:
        report.notes.append("data quality not checked (too few rows)")
    return report
