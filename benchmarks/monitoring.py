"""Drift-check speed: monitoring.drift.check_window over a window of logged requests against a
saved reference profile, beside a plain numpy/scipy floor doing the same statistics, in one run.

    .venv/bin/python benchmarks/monitoring.py [--rows 1M] [--repeat 3]

The profile comes from 20,000 ReferenceTask training rows (and held-out scores), saved as JSON and
read back, as monitoring reads it from metadata.json. The window is `--rows` logged requests as the
sink writes them (the 10 features as sent, request_id, probability, prediction), through Parquet
(storage.tables) so the columns have the dtypes a reader gets; no ground truth (AUC is left out of
both sides). Throughput is values/s = rows x features / seconds; each figure is the best of
`--repeat` runs after a warm-up (imports and first-call costs are not counted).

  check_window            PSI, KS / chi-square (+ holm), missing rates, prediction PSI, reasons
  check_window + GX       the same plus the training suite on the live rows (great-expectations)
  GX alone                monitoring.drift.check_quality: what quality on a window costs
  floor                   the same statistics hand-written: per numeric column a precomputed
                          histogram (np.searchsorted into the edges + np.bincount) for PSI and an
                          np.sort-based KS (statistic at the reference points, kstwo p-value); per
                          categorical column pd.factorize + np.bincount (numpy's np.unique on object
                          strings is ~10x slower) and scipy.stats.chi2_contingency; missing rates; score PSI
  floor, one sort per column   the floor with PSI bins read off the sort KS needs anyway (what
                          check_window does): the tighter floor
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from tests.support import reference_probability  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def saved_profile(directory: Path) -> dict:
    from model.profile import build_profile
    from stages.dataset import REFERENCE_CATEGORICAL, REFERENCE_NUMERIC, ReferenceTask

    training = ReferenceTask(rows=20_000, seed=1).generate()
    held_out = ReferenceTask(rows=4_000, seed=99).generate()
    profile = build_profile(training, REFERENCE_NUMERIC, REFERENCE_CATEGORICAL, reference_probability(held_out),
                            held_out["default"].to_numpy())
    path = directory / "reference_profile.json"
    path.write_text(json.dumps(profile, indent=1))
    return json.loads(path.read_text())


def logged_requests(rows: int, directory: Path) -> pd.DataFrame:
    from stages.dataset import REFERENCE_CATEGORICAL, REFERENCE_NUMERIC, ReferenceTask
    from storage.tables import read_table, write_table

    frame = ReferenceTask(rows=rows, seed=2).generate()
    live = frame[REFERENCE_NUMERIC + REFERENCE_CATEGORICAL].copy()
    live["request_id"] = [f"r{i:08d}" for i in range(rows)]
    live["probability"] = reference_probability(frame)
    live["prediction"] = np.where(live["probability"] > 0.3, "1", "0")
    path = directory / "window.parquet"
    write_table(live, str(path))
    return read_table(str(path))


# ------------------------------------------------------------------------------------------- floor


def _psi(ref, live, eps=1e-4):
    ref, live = np.asarray(ref, float), np.asarray(live, float)
    keep = (ref > 0) | (live > 0)
    p = np.maximum(ref[keep] / ref.sum(), eps)
    q = np.maximum(live[keep] / live.sum(), eps)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def floor(window: pd.DataFrame, profile: dict, shared_sort: bool = False) -> dict:
    """The same statistics as check_window, hand-written with the plain primitives; `shared_sort`
    bins the sorted column (a binary search per edge) instead of searching every value."""
    out = {}
    for name, ref in profile["numeric"].items():
        x = window[name].to_numpy(dtype=np.float64, na_value=np.nan)
        missing = np.isnan(x)
        v = x[~missing]
        edges = np.asarray(ref["edges"])
        s = np.sort(v)
        if shared_sort:
            counts = np.diff(np.concatenate(([0], np.searchsorted(s, edges, side="right"), [len(s)])))
        else:
            counts = np.bincount(np.searchsorted(edges, v, side="left"), minlength=len(edges) + 1)
        r = np.asarray(ref["sample"])
        n1, n2 = len(s), len(r)
        f2 = np.arange(1, n2 + 1) / n2
        d = max(np.max(np.searchsorted(s, r, side="left") / n1 - (f2 - 1 / n2)),  # live above: just before r_j
                np.max(f2 - np.searchsorted(s, r, side="right") / n1), 0.0)  # reference above: at r_j
        p = stats.kstwo.sf(d, round(n1 * n2 / (n1 + n2)))
        out[name] = (_psi(ref["counts"], counts), d, p, missing.mean())
    for name, ref in profile["categorical"].items():
        codes, uniques = pd.factorize(window[name])
        per_unique = np.bincount(codes + 1, minlength=len(uniques) + 1)
        index = {c: i for i, c in enumerate(ref["categories"])}
        bucket = np.array([index.get(str(u), len(index) + 1) for u in uniques], dtype=np.int64)
        counts = np.bincount(bucket, weights=per_unique[1:], minlength=len(index) + 2)
        reference = np.array([*ref["counts"], ref["other"], 0], float)
        keep = (reference > 0) | (counts > 0)
        chi = stats.chi2_contingency(np.vstack([reference[keep], counts[keep]]), correction=False)
        out[name] = (_psi(reference, counts), chi.statistic, chi.pvalue, per_unique[0] / len(codes))
    scores = window["probability"].to_numpy(dtype=np.float64)
    edges = np.asarray(profile["score"]["edges"])
    out["probability"] = _psi(profile["score"]["counts"],
                              np.bincount(np.searchsorted(edges, scores), minlength=len(edges) + 1))
    return out


# ------------------------------------------------------------------------------------------- timing


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1M", help="logged requests in the window (e.g. 100k, 1M)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gx-repeat", type=int, default=2, help="runs of the GX contenders (they take seconds)")
    args = parser.parse_args(argv)
    rows = parse_size(args.rows)

    from monitoring.drift import check_quality, check_window
    from specs import DatasetSpec, MonitoringSpec
    from stages.dataset import REFERENCE_CATEGORICAL, REFERENCE_NUMERIC
    from stages.validation import load_suite

    features = {"numeric": REFERENCE_NUMERIC, "categorical": REFERENCE_CATEGORICAL}
    names = REFERENCE_NUMERIC + REFERENCE_CATEGORICAL
    spec = MonitoringSpec()
    suite = load_suite(DatasetSpec(source="reference", target="default", id_column="customer_id",
                                   features=features), ROOT / "config")
    with tempfile.TemporaryDirectory() as tmp:
        profile = saved_profile(Path(tmp))
        profile_bytes = (Path(tmp) / "reference_profile.json").stat().st_size
        print(f"generating {rows:,} logged requests ...", flush=True)
        window = logged_requests(rows, Path(tmp))

    # Warm-up: imports, GX's context, scipy's first calls (one-off per process)
    warm = window.iloc[:5000].reset_index(drop=True)
    check_window(warm, profile, spec, features, suite=suite)
    floor(warm, profile)

    values = rows * len(names)
    t_floor, floor_result = best_of(args.repeat, lambda: floor(window, profile))
    t_floor_sorted, _ = best_of(args.repeat, lambda: floor(window, profile, shared_sort=True))
    t_check, report = best_of(args.repeat, lambda: check_window(window, profile, spec, features))
    t_gx, quality = best_of(args.gx_repeat, lambda: check_quality(window, suite, names))
    t_both, _ = best_of(args.gx_repeat, lambda: check_window(window, profile, spec, features, suite=suite))

    # The two sides computed the same numbers
    for f in report.features:
        psi_floor, statistic_floor = floor_result[f.feature][0], floor_result[f.feature][1]
        assert abs(f.psi - psi_floor) < 1e-9 and abs(f.statistic - statistic_floor) < 1e-6 * max(1, f.statistic), \
            (f.feature, f.psi, psi_floor, f.statistic, statistic_floor)
    assert abs(report.prediction_psi - floor_result["probability"]) < 1e-9

    rows_out = [
        ("floor (numpy/scipy)", t_floor),
        ("floor, one sort per column", t_floor_sorted),
        ("check_window (no GX)", t_check),
        ("check_window + GX", t_both),
        ("GX alone (check_quality)", t_gx),
    ]
    print(f"\n{rows:,} rows x {len(names)} features = {values:,} values; profile {profile_bytes:,} bytes; "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), numpy {np.__version__}")
    print(f"{'contender':28} {'seconds':>9} {'values/s':>14} {'x floor':>8}")
    for name, seconds in rows_out:
        print(f"{name:28} {seconds:9.3f} {values / seconds:14,.0f} {seconds / t_floor:8.2f}")
    print(f"\ncheck_window / floor = {t_check / t_floor:.2f} (target <= 2.00), / the one-sort floor "
          f"{t_check / t_floor_sorted:.2f}; with GX {t_both / t_floor:.1f}x; "
          f"GX is {t_gx / t_both:.0%} of check_window + GX")
    print(f"window verdict: {len(report.breaches)} breaches, drifted {report.drifted}, prediction PSI "
          f"{report.prediction_psi:.4f}; quality: {quality['summary']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "monitoring.json").write_text(json.dumps({
        "rows": rows, "features": len(names), "values": values, "profile_bytes": profile_bytes,
        "cpus": os.cpu_count(), "numpy": np.__version__,
        "seconds": {name: seconds for name, seconds in rows_out},
        "values_per_s": {name: values / seconds for name, seconds in rows_out},
        "ratio_check_window_to_floor": t_check / t_floor,
        "ratio_check_window_to_one_sort_floor": t_check / t_floor_sorted, "ratio_with_gx_to_floor": t_both / t_floor,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
