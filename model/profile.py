"""The reference profile: what the training data and the held-out scores looked like, saved with
the model (metadata.json under `model.artifact.PROFILE_KEY`) so that monitoring can compare live
traffic with it without the training data. numpy/pandas only, torch-free: training builds it,
monitoring (`monitoring.drift`) reads it.

A profile is a small JSON-able dict (tens of KB for the reference task):

    format       1
    rows         training rows profiled
    features     {"numeric": [...], "categorical": [...]}
    numeric      {feature: {edges, counts, sample, missing_rate, rows, min, max, mean, std}}
                 `edges` are interior cut points (training quantiles, deduplicated); the bins are
                 (-inf, e0], (e0, e1], ..., (e_last, inf), so `counts` has len(edges) + 1 entries.
                 `sample` is a sorted random sample (<= sample_size) of the non-missing values, for KS.
    categorical  {feature: {categories, counts, other, other_values, other_truncated, missing_rate, rows}}
                 categories (by `model.preprocessing.category_key`) with their counts, most frequent first;
                 rare ones are pooled in `other` (their names in `other_values`, up to a cap). A live
                 value that is neither a category nor in `other_values` is unseen.
    score        {edges, counts, range, rows, mean}: held-out P(positive) in the same binning as
                 numeric features (quantile cut points inside `range` [0, 1])
    labels       {rows, base_rate} of the held-out labels, or None
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from model.preprocessing import category_key

FORMAT = 1
BINS = 10
SAMPLE_SIZE = 1000
MAX_CATEGORIES = 50
MIN_FREQUENCY = 0.005  # categories rarer than this in training are pooled into "other"
MAX_OTHER_VALUES = 1000  # names of pooled categories kept (beyond this, unlisted values count as "other")
DIGITS = 7  # significant digits kept for edges and sample values (the profile stays small)


def _round(values: np.ndarray) -> np.ndarray:
    """Values to DIGITS significant digits (so that the JSON stays short) as float64."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        magnitude = np.where(values == 0, 0, np.floor(np.log10(np.abs(values))))
    scale = 10.0 ** (DIGITS - 1 - magnitude)
    return np.where(np.isfinite(values) & (values != 0), np.round(values * scale) / scale, values)


def _plain(values) -> list:
    """JSON numbers: integral values as int (shorter), the rest as float."""
    return [int(v) if float(v).is_integer() and abs(v) < 2**53 else float(v) for v in np.asarray(values).tolist()]


def numeric_values(values) -> np.ndarray:
    """A column as float64 with NaN for missing (None, NaN, pd.NA, and text that is not a number)."""
    if isinstance(values, pd.Series):
        if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
            return values.to_numpy(dtype=np.float64, na_value=np.nan)
        return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(values, dtype=np.float64)


def bin_counts(sorted_values: np.ndarray, edges) -> np.ndarray:
    """Counts of already sorted values in the bins (-inf, e0], (e0, e1], ..., (e_last, inf): one
    binary search per edge, so the cost is the sort's, not a search per value."""
    cuts = np.searchsorted(sorted_values, np.asarray(edges, dtype=np.float64), side="right")
    return np.diff(np.concatenate(([0], cuts, [len(sorted_values)])))


def quantile_edges(sorted_values: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Interior cut points at the 1/bins ... (bins-1)/bins quantiles, rounded and deduplicated."""
    if len(sorted_values) == 0:
        return np.empty(0)
    return np.unique(_round(np.quantile(sorted_values, np.arange(1, bins) / bins)))


def _numeric(values: np.ndarray, bins: int, sample_size: int, rng: np.random.Generator) -> dict:
    present = np.sort(values[~np.isnan(values)])
    n = len(present)
    edges = quantile_edges(present, bins)
    sample = present if n <= sample_size else np.sort(rng.choice(present, sample_size, replace=False))
    return {
        "edges": _plain(edges),
        "counts": _plain(bin_counts(present, edges)),
        "sample": _plain(_round(sample)),
        "missing_rate": float(1.0 - n / len(values)) if len(values) else 0.0,
        "rows": n,
        "min": float(present[0]) if n else None,
        "max": float(present[-1]) if n else None,
        "mean": float(present.mean()) if n else None,
        "std": float(present.std()) if n else None,
    }


def category_counts(values: pd.Series) -> tuple[dict[str, int], int]:
    """({category key: count}, missing count) of a column; hashing runs once per row in pandas,
    `category_key` once per distinct value."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    counts = np.bincount(codes + 1, minlength=len(uniques) + 1)
    found: dict[str, int] = {}
    for value, count in zip(uniques, counts[1:]):
        key = category_key(value)
        found[key] = found.get(key, 0) + int(count)
    return found, int(counts[0])


def _categorical(values: pd.Series, max_categories: int, min_frequency: float) -> dict:
    found, missing = category_counts(values)
    present = sum(found.values())
    ranked = sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = [(k, c) for k, c in ranked[:max_categories] if c >= min_frequency * present] or ranked[:1]
    pooled = ranked[len(kept):]
    return {
        "categories": [k for k, _ in kept],
        "counts": [c for _, c in kept],
        "other": sum(c for _, c in pooled),
        "other_values": sorted(k for k, _ in pooled[:MAX_OTHER_VALUES]),
        "other_truncated": len(pooled) > MAX_OTHER_VALUES,
        "missing_rate": float(missing / len(values)) if len(values) else 0.0,
        "rows": present,
    }


def build_profile(frame: pd.DataFrame, numeric: list[str], categorical: list[str], scores: np.ndarray,
                  labels: np.ndarray | None = None, *, bins: int = BINS, sample_size: int = SAMPLE_SIZE,
                  max_categories: int = MAX_CATEGORIES, min_frequency: float = MIN_FREQUENCY, seed: int = 0) -> dict:
    """The reference profile (module docstring) of training features `frame[numeric + categorical]`
    and held-out `scores` (P(positive), in [0, 1]) with their 0/1 `labels`."""
    missing = [c for c in [*numeric, *categorical] if c not in frame.columns]
    if missing:
        raise ValueError(f"columns missing from the frame to profile: {missing}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0 or np.isnan(scores).any() or scores.min() < 0.0 or scores.max() > 1.0:
        raise ValueError("scores must be non-empty probabilities in [0, 1] (apply the sigmoid to logits)")
    rng = np.random.default_rng(seed)
    ordered = np.sort(scores)
    score_edges = quantile_edges(ordered, bins)
    profile = {
        "format": FORMAT,
        "rows": len(frame),
        "features": {"numeric": list(numeric), "categorical": list(categorical)},
        "numeric": {c: _numeric(numeric_values(frame[c]), bins, sample_size, rng) for c in numeric},
        "categorical": {c: _categorical(frame[c], max_categories, min_frequency) for c in categorical},
        "score": {"edges": _plain(score_edges), "counts": _plain(bin_counts(ordered, score_edges)),
                  "range": [0.0, 1.0], "rows": len(scores), "mean": float(scores.mean())},
        "labels": None,
    }
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        profile["labels"] = {"rows": len(labels), "base_rate": float(labels.astype(np.float64).mean())
                             if len(labels) else None}
    return profile
