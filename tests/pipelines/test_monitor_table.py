"""`flywheel monitor`'s drift table at 80 columns: one line per feature, the reasons in full under it."""
from rich.console import Console

from monitoring.drift import DriftReport, FeatureDrift
from pipelines.traffic_check import drift_table

NUMERIC = ["age", "income", "credit_limit", "utilization", "debt_to_income", "late_payments", "months_on_book"]
REASONS = ["PSI 0.346 > 0.2", "KS p_adj 1.23e-05 < 0.01", "missing 100.0% vs 0.0% in training"]


def report() -> DriftReport:
    features = [FeatureDrift(name, "numeric", 0.3456, "ks", 0.1234, 1e-6, 1.2345e-5, 1.0, 0.0, True, True,
                             reasons=list(REASONS)) for name in NUMERIC]
    features += [FeatureDrift(name, "categorical", 1.2, "chi2", 123.45, 0.0, 0.0, 0.021, 0.0, True, False,
                              reasons=["3 unseen categories: gig, contract, seasonal"])
                 for name in ("employment", "housing", "region")]
    features.append(FeatureDrift("region_code", "numeric", 0.01, "ks", 0.02, 0.5, 0.9, 0.0, 0.0))
    return DriftReport(rows=5000, enough_data=True, features=features, prediction_psi=0.123, live_roc_auc=0.77,
                       truth_rows=1200)


def test_the_drift_table_fits_80_columns_and_lists_reasons_under_it():
    console = Console(width=80, record=True)
    console.print(drift_table(report(), "credit-default v2: 5,000 rows from runs/monitoring"))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    # Each feature is one row, its values not folded over lines
    for name in NUMERIC:
        row = next(line for line in lines if line.strip().startswith(f"{name} "))
        assert "0.346" in row and "ks 0.123" in row and "100.0/0.0" in row and row.rstrip().endswith("yes"), row
    quiet = next(line for line in lines if line.strip().startswith("region_code "))
    assert quiet.rstrip().endswith("no")
    # ... and every reason reads in full under the table (wrapped at word boundaries at most)
    under = " ".join(lines[next(i for i, line in enumerate(lines) if "(live ROC AUC)" in line) + 1:])
    flat = " ".join(under.split())
    for name in NUMERIC:
        assert f"{name}: {'; '.join(REASONS)}" in flat
    assert "employment: 3 unseen categories: gig, contract, seasonal" in flat
    assert "region_code:" not in flat  # nothing to say, no line


def test_no_cell_is_cut_short_tiny_p_values_included():
    # A p-value like 8.61e-100 used to come out as "8.61e-1…" (a different number) and the drift
    # header as "dri…" at 80 columns
    data = report()
    data.features[0].p_adjusted, data.features[0].psi = 8.61e-100, 0.000136
    console = Console(width=80, record=True)
    console.print(drift_table(data, "credit-default v2"))
    text = console.export_text()
    assert "…" not in text
    row = next(line for line in text.splitlines() if line.strip().startswith("age "))
    assert "8.6e-100" in row and "1.4e-04" in row
    assert "drift" in next(line for line in text.splitlines() if "feature" in line)
