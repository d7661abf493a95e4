"""Monitoring's drift checks: the reference profile saved at training time, per-feature PSI with
KS / chi-square tests under a multiple-testing correction, missing rates, the training expectation
suite on live rows, prediction drift, live AUC from ground truth, the retraining decision with
hysteresis, and the HTML drift report (rendered in headless Chromium)."""

import json
import os
import shutil
import subprocess

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from model.artifact import PROFILE_KEY, read_metadata, reference_profile
from model.labels import LabelMapping
from monitoring.check import decide
from monitoring.drift import DriftReport, adjust, check_window, ks_2samp_sorted, live_suite, psi
from monitoring.drift_report import render_report
from monitoring.reference_profile import build_profile, load_profile
from specs import DatasetSpec, DistributionShift, MonitoringSpec
from stages.dataset import REFERENCE_CATEGORICAL, REFERENCE_ID, REFERENCE_NUMERIC, REFERENCE_TARGET, ReferenceTask
from stages.validation import load_suite
from storage.tables import write_table
from tests.support import ROOT, reference_probability

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SPEC = MonitoringSpec()
SHIFT = DistributionShift(income_scale=0.5, utilization_shift=0.3, unemployment_boost=0.2)
SHIFTED = {"income", "utilization", "employment"}  # what the shift moves directly
UNSHIFTED = {"age", "debt_to_income", "months_on_book", "housing", "region"}  # what it leaves alone
FEATURES = {"numeric": REFERENCE_NUMERIC, "categorical": REFERENCE_CATEGORICAL}


def window(task: ReferenceTask, truth: bool = True) -> pd.DataFrame:
    """Logged requests as the sink writes them: the features as sent, the model's probability and
    prediction, ground truth joined later; no target and no customer id."""
    frame = task.generate()
    live = frame[REFERENCE_NUMERIC + REFERENCE_CATEGORICAL].copy()
    live["request_id"] = [f"r{i}" for i in range(len(live))]
    live["probability"] = reference_probability(frame)
    live["prediction"] = np.where(live["probability"] > 0.3, "1", "0")
    live["truth"] = frame[REFERENCE_TARGET].astype(str) if truth else None
    return live


@pytest.fixture(scope="module")
def training():
    return ReferenceTask(rows=20_000, seed=1).generate()


@pytest.fixture(scope="module")
def profile(training):
    held_out = ReferenceTask(rows=4000, seed=99).generate()
    built = build_profile(training, REFERENCE_NUMERIC, REFERENCE_CATEGORICAL, reference_probability(held_out),
                          held_out[REFERENCE_TARGET].to_numpy())
    return json.loads(json.dumps(built))  # as saved in metadata.json and read back


@pytest.fixture(scope="module")
def suite():
    dataset = DatasetSpec(source="reference", target=REFERENCE_TARGET, id_column=REFERENCE_ID, features=FEATURES)
    return load_suite(dataset, ROOT / "config")


@pytest.fixture(scope="module")
def same():
    return window(ReferenceTask(rows=5000, seed=2))


@pytest.fixture(scope="module")
def shifted():
    return window(ReferenceTask(rows=5000, seed=3, shift=SHIFT))


@pytest.fixture(scope="module")
def drifted_report(shifted, profile, suite):
    return check_window(shifted, profile, SPEC, FEATURES, suite=suite)


# ------------------------------------------------------------------------------------------ profile


def test_profile_holds_bins_samples_categories_and_scores_in_a_few_kb(training, profile):
    # Given the profile of 20,000 training rows and 4,000 held-out scores (fixture), Then
    # numeric features have increasing decile cut points whose bins hold the non-missing rows
    for name in REFERENCE_NUMERIC:
        ref = profile["numeric"][name]
        assert 1 <= len(ref["edges"]) <= 9 and ref["edges"] == sorted(set(ref["edges"]))
        assert len(ref["counts"]) == len(ref["edges"]) + 1 and sum(ref["counts"]) == ref["rows"]
        assert ref["sample"] == sorted(ref["sample"]) and len(ref["sample"]) == 1000
        assert ref["min"] == training[name].min() and ref["max"] == training[name].max()
    assert profile["numeric"]["income"]["missing_rate"] == pytest.approx(training["income"].isna().mean())
    assert profile["numeric"]["income"]["rows"] == training["income"].notna().sum()
    # And a continuous feature gets ten equal-mass bins; a discrete one fewer (duplicate quantiles merge)
    assert len(profile["numeric"]["age"]["edges"]) == 9
    assert np.ptp(profile["numeric"]["debt_to_income"]["counts"]) <= 0.01 * len(training)  # ties: 4 decimals
    assert len(profile["numeric"]["late_payments"]["edges"]) < 9
    # And categorical features have their categories most frequent first, missing values apart
    employment = profile["categorical"]["employment"]
    assert set(employment["categories"]) == {"salaried", "self_employed", "unemployed", "retired", "student"}
    assert employment["counts"] == sorted(employment["counts"], reverse=True)
    assert employment["categories"][0] == "salaried" and employment["other"] == 0
    assert employment["missing_rate"] == pytest.approx(training["employment"].isna().mean())
    # And the held-out scores are binned on [0, 1], with the labels' base rate
    score = profile["score"]
    assert score["range"] == [0.0, 1.0] and all(0.0 < e < 1.0 for e in score["edges"])
    assert sum(score["counts"]) == score["rows"] == 4000
    assert 0.1 < profile["labels"]["base_rate"] < 0.25 and profile["labels"]["rows"] == 4000
    # And the whole profile is a few tens of KB of JSON, however many training rows there are
    assert len(json.dumps(profile)) < 80_000
    assert len(json.dumps(build_profile(ReferenceTask(rows=60_000, seed=4).generate(), REFERENCE_NUMERIC,
                                        REFERENCE_CATEGORICAL, np.linspace(0, 1, 9000)))) < 80_000


def test_profile_pools_rare_categories_and_refuses_logits(training):
    # Given a category seen in 0.1% of the training rows
    frame = training.copy()
    frame.loc[:19, "region"] = "north-east"
    # When it is profiled, Then it is pooled into "other", by name
    ref = build_profile(frame, [], ["region"], np.full(10, 0.2))["categorical"]["region"]
    assert "north-east" not in ref["categories"] and ref["other"] == 20 and ref["other_values"] == ["north-east"]
    # And scores outside [0, 1] (logits) are refused with the reason
    with pytest.raises(ValueError, match="probabilities"):
        build_profile(training, REFERENCE_NUMERIC, [], np.array([-2.0, 0.5, 3.0]))


@pytest.mark.slow
def test_training_saves_the_profile_and_registering_logs_it(tmp_path):
    # Given the project's training entry point on a small reference table
    from specs import Hyperparameters
    from stages.registry import input_example, register_model
    from training.train import train

    frame = ReferenceTask(rows=1500, seed=5).generate()
    write_table(frame, str(tmp_path / "train.parquet"))
    hyperparameters = Hyperparameters(epochs=2, hidden=16, depth=1, batch_size=256).model_dump()
    spec = {"dataset": {"target": REFERENCE_TARGET, "features": FEATURES}, "hyperparameters": hyperparameters}
    # When it trains
    model_dir = str(tmp_path / "model")
    metadata = train(str(tmp_path / "train.parquet"), model_dir, spec)
    # Then metadata.json carries the profile of the training rows and the validation split's scores
    saved = reference_profile(read_metadata(model_dir))
    assert saved is not None and saved == load_profile(model_dir) == json.loads(json.dumps(metadata[PROFILE_KEY]))
    assert saved["rows"] == metadata["train_rows"] and saved["score"]["rows"] == metadata["validation_rows"]
    assert set(saved["numeric"]) == set(REFERENCE_NUMERIC) and set(saved["categorical"]) == set(REFERENCE_CATEGORICAL)
    assert 0.05 < saved["labels"]["base_rate"] < 0.4
    # And the registered version's run holds it as reference_profile.json
    from mlflow import MlflowClient
    from mlflow.artifacts import load_dict

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    example = input_example(frame, REFERENCE_NUMERIC + REFERENCE_CATEGORICAL)
    version = register_model(uri, "drift-test", model_dir, None, {}, example, experiment="drift-test",
                             make_champion=False)
    run_id = MlflowClient(uri).get_model_version("drift-test", version).run_id
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        assert load_dict(f"runs:/{run_id}/{PROFILE_KEY}.json") == saved
    finally:
        mlflow.set_tracking_uri(None)


# -------------------------------------------------------------------------------------- statistics


def test_ks_matches_scipy_on_large_windows_and_corrections_match_their_definitions():
    # Given live windows larger than scipy's exact limit, continuous and with ties
    rng = np.random.default_rng(0)
    pairs = [(rng.normal(0.05, 1, 30_000), rng.normal(0, 1, 1000)),
             (rng.normal(0, 1, 12_000), rng.normal(0, 1, 1000)),
             (rng.poisson(2.0, 25_000).astype(float), rng.poisson(2.1, 1000).astype(float))]
    for live, reference in pairs:
        # When the KS test runs on the sorted samples, Then it is ks_2samp's statistic and p-value
        expected = stats.ks_2samp(live, reference)
        d, p = ks_2samp_sorted(np.sort(live), np.sort(reference))
        assert d == pytest.approx(expected.statistic, abs=1e-12) and p == pytest.approx(expected.pvalue, rel=1e-9)
    # And the corrections are Holm's, Bonferroni's and Benjamini-Hochberg's
    p = [0.01, 0.04, 0.03, 0.005]
    assert adjust(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust(p, "fdr_bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # And PSI is zero for equal shares and grows with the shift, finite for empty bins
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    assert 0 < psi([25, 25, 25, 25], [20, 25, 25, 30]) < psi([25, 25, 25, 25], [5, 25, 25, 45]) < np.inf
    assert np.isfinite(psi([50, 50, 0], [40, 40, 20]))


# -------------------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("correction", ["holm", "bonferroni", "fdr_bh"])
def test_no_drift_on_a_fresh_sample_of_the_same_task(same, profile, correction):
    # Given live traffic drawn afresh from the training distribution
    spec = MonitoringSpec(correction=correction)
    # When the window is checked, Then no feature drifts, nothing breaches and PSI stays "stable"
    report = check_window(same, profile, spec, FEATURES)
    assert report.enough_data and report.breaches == [] and report.drifted == []
    assert all(f.psi < 0.1 for f in report.features) and report.prediction_psi < 0.1
    assert {f.test for f in report.features} == {"ks", "chi2"}
    assert all(f.p_adjusted >= f.p_value for f in report.features)


def test_a_window_larger_than_the_training_set_is_not_flagged(profile):
    # Given 80,000 live rows from the training distribution (four times the 20,000 profiled rows):
    # a test that took the training frequencies as exact would reject them as the window grows
    live = window(ReferenceTask(rows=80_000, seed=8), truth=False)
    # When the window is checked, Then nothing drifts: both tests are two-sample
    report = check_window(live, profile, SPEC, FEATURES)
    assert report.drifted == [] and report.breaches == [], report.breaches
    assert all(f.p_adjusted > SPEC.alpha for f in report.features)


@pytest.mark.parametrize("correction", ["holm", "bonferroni", "fdr_bh"])
def test_drift_on_a_shifted_task_names_the_shifted_features(shifted, profile, correction):
    # Given live traffic with lower incomes, higher utilisation and more unemployed applicants
    spec = MonitoringSpec(correction=correction)
    # When the window is checked
    report = check_window(shifted, profile, spec, FEATURES)
    # Then the shifted features drift and the ones the shift leaves alone do not
    assert set(report.drifted) >= SHIFTED, report.drifted
    assert not UNSHIFTED & set(report.drifted), report.drifted
    # And each breach names its feature with the numbers against their thresholds
    income = report.feature("income")
    assert income.psi > SPEC.psi_threshold and income.p_adjusted < SPEC.alpha and income.test == "ks"
    assert report.feature("employment").test == "chi2" and report.feature("employment").p_adjusted < SPEC.alpha
    line = next(b for b in report.breaches if b.startswith("income: "))
    assert f"PSI {income.psi:.3f} > 0.2" in line and f"{correction}-adjusted p" in line and "< alpha 0.01" in line
    # And the scores moved too (prediction drift)
    assert report.prediction_psi > SPEC.prediction_psi_threshold
    assert any(b.startswith("prediction drift: score PSI") for b in report.breaches)


def test_an_unseen_category_counts_and_a_rare_known_one_does_not(same, profile, training):
    # Given a window where one region in ten is a value training never saw
    live = same.copy()
    live.loc[live.index[::10], "region"] = "atlantis"
    # When it is checked, Then the unseen bucket holds them, and region drifts, naming the value
    region = check_window(live, profile, SPEC, FEATURES).feature("region")
    assert region.buckets[-1] == "(unseen)" and region.counts[-1] == 500 and region.unseen == {"atlantis": 500}
    assert region.drifted and region.psi > SPEC.psi_threshold and region.p_adjusted < SPEC.alpha
    assert any("'atlantis'" in r and "10.0% of values" in r for r in region.reasons)
    # And a category training saw, but rarely (pooled as "other"), is not unseen
    frame = training.copy()
    frame.loc[:19, "region"] = "north-east"
    rare = build_profile(frame, REFERENCE_NUMERIC, REFERENCE_CATEGORICAL, np.full(10, 0.2))
    live = same.copy()
    live.loc[live.index[:3], "region"] = "north-east"
    region = check_window(live, rare, SPEC, FEATURES).feature("region")
    assert region.counts[-2:] == [3, 0] and region.unseen == {} and not region.drifted


def test_too_few_rows_mean_no_tests_no_breaches_no_decision(profile, suite):
    # Given a badly shifted window of fewer rows than min_samples
    small = window(ReferenceTask(rows=150, seed=6, shift=SHIFT))
    # When it is checked, Then nothing is tested or breached, and the report says why
    report = check_window(small, profile, SPEC, FEATURES, suite=suite)
    assert not report.enough_data and report.rows == 150
    assert report.breaches == [] and report.drifted == [] and report.quality is None
    assert all(f.test is None and f.p_value is None and f.p_adjusted is None for f in report.features)
    assert report.live_roc_auc is None
    assert any("150 rows < min_samples 200" in n for n in report.notes)
    # And PSI is still measured (for the record), but decides nothing
    assert report.feature("utilization").psi > SPEC.psi_threshold
    # And it breaks a streak instead of counting toward a retraining
    decision = decide([report, report], SPEC)
    assert not decision.retrain and "min_samples 200" in decision.reasons[0]


def test_a_missing_rate_above_trainings_breaches(profile):
    # Given a window where income and employment go missing eight times as often as in training
    live = window(ReferenceTask(rows=5000, seed=7, shift=DistributionShift(missing_rate_scale=8.0)))
    # When it is checked, Then both breach on their missing rate, naming the rates
    report = check_window(live, profile, SPEC, FEATURES)
    income = report.feature("income")
    assert income.missing_breach and income.missing_rate > income.reference_missing_rate + 0.1
    line = next(b for b in report.breaches if b.startswith("income: "))
    assert f"missing rate {income.missing_rate:.1%} > training's {income.reference_missing_rate:.1%} + 10.0%" in line
    assert report.feature("employment").missing_breach
    assert not report.feature("age").missing_breach and not report.feature("income").drifted


def test_the_training_suite_checks_ranges_on_live_rows(same, profile, suite):
    # Given the training suite, turned into the live one for a window without target and customer id
    checked = live_suite(suite, REFERENCE_NUMERIC + REFERENCE_CATEGORICAL, list(same.columns))
    used = {c for e in checked["expectations"] for c in (e["kwargs"].get("column"), e["kwargs"].get("column_A"))}
    assert REFERENCE_TARGET not in used and REFERENCE_ID not in used
    assert not any(e["type"] == "expect_table_row_count_to_be_between" for e in checked["expectations"])
    # When a clean window is checked, Then it passes the suite
    clean = check_window(same, profile, SPEC, FEATURES, suite=suite)
    assert clean.quality["passed"] and clean.quality["failures"] == [] and clean.breaches == []
    assert clean.quality["metrics"]["expectations_evaluated"] == len(checked["expectations"])
    # When some rows carry impossible ages and utilisation
    broken = same.copy()
    broken.loc[broken.index[:10], "age"] = 150
    broken.loc[broken.index[10:14], "utilization"] = 2.5
    report = check_window(broken, profile, SPEC, FEATURES, suite=suite)
    # Then the range expectations fail and the breaches say which rows and values
    assert not report.quality["passed"]
    age = next(b for b in report.breaches if "expect_column_values_to_be_between on 'age'" in b)
    assert age.startswith("data quality: ") and "10 unexpected rows" in age and "age=150" in age
    assert any("expect_column_values_to_be_between on 'utilization'" in b for b in report.breaches)


def test_prediction_drift_without_feature_drift(same, profile):
    # Given the same traffic but a model that now scores everyone higher
    live = same.copy()
    live["probability"] = np.sqrt(live["probability"])
    # When it is checked, Then the scores drift while the features do not
    report = check_window(live, profile, SPEC, FEATURES)
    assert report.drifted == [] and report.prediction_psi > SPEC.prediction_psi_threshold
    assert report.breaches == [f"prediction drift: score PSI {report.prediction_psi:.3f} > 0.2"]


def test_live_auc_from_ground_truth_in_the_models_labels(same, profile):
    # Given ground truth in the model's own label values (no/yes)
    labels = LabelMapping("no", "yes")
    live = same.copy()
    live["truth"] = np.where(same["truth"] == "1", "yes", "no")
    y = (live["truth"] == "yes").to_numpy()
    # When it is checked, Then ROC and PR AUC are sklearn's on the labelled rows, above the floor
    report = check_window(live, profile, SPEC, FEATURES, labels=labels)
    assert report.truth_rows == 5000
    assert report.live_roc_auc == pytest.approx(roc_auc_score(y, live["probability"]))
    assert report.live_pr_auc == pytest.approx(average_precision_score(y, live["probability"]))
    assert report.live_roc_auc > SPEC.min_roc_auc and report.breaches == []
    # And truth that no longer matches the scores breaches the floor
    live["truth"] = np.random.default_rng(0).permutation(live["truth"].to_numpy())
    report = check_window(live, profile, SPEC, FEATURES, labels=labels)
    assert report.live_roc_auc < SPEC.min_roc_auc
    assert report.breaches == [f"live ROC AUC {report.live_roc_auc:.3f} < 0.65 over 5,000 rows with ground truth"]
    # And with truth for too few rows, no AUC is computed, and the report says so
    live["truth"] = None
    live.loc[live.index[:50], "truth"] = "yes"
    report = check_window(live, profile, SPEC, FEATURES, labels=labels)
    assert report.live_roc_auc is None and report.truth_rows == 50 and any("live AUC not computed" in n
                                                                           for n in report.notes)


def test_retraining_needs_consecutive_breaching_windows(same, profile, drifted_report):
    ok = check_window(same, profile, SPEC, FEATURES)
    assert drifted_report.breaches and not ok.breaches
    # Given two breaching windows in a row, Then retrain, saying why with the features and numbers
    decision = decide([ok, drifted_report, drifted_report], SPEC)
    assert decision.retrain and decision.streak == 2
    assert decision.reasons[0].startswith("2 consecutive breaching windows")
    assert any("income: PSI" in r for r in decision.reasons)
    # Given a breach followed by a clean window, Then no retraining
    decision = decide([drifted_report, ok], SPEC)
    assert not decision.retrain and decision.reasons == [
        "0 of 2 consecutive breaching windows: the latest window had no breach"]
    # Given a single breach so far, Then wait for it to persist
    decision = decide([ok, drifted_report], SPEC)
    assert not decision.retrain and decision.reasons[0].startswith("1 of 2 consecutive breaching windows")
    # And the history can be stored reports (JSON), and one window is enough when configured so
    stored = [json.loads(json.dumps(r.to_dict())) for r in (drifted_report, drifted_report)]
    assert decide(stored, SPEC).retrain
    assert DriftReport.from_dict(stored[0]).breaches == drifted_report.breaches
    assert decide([drifted_report], MonitoringSpec(consecutive_windows=1)).retrain
    assert not decide([], SPEC).retrain


def test_report_metrics_are_flat_floats(drifted_report):
    metrics = drifted_report.metrics()
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    assert metrics["rows"] == 5000.0 and metrics["features_drifted"] == len(drifted_report.drifted)
    assert metrics["psi_income"] == drifted_report.feature("income").psi and metrics["drifted_income"] == 1.0
    assert metrics["breaches"] == len(drifted_report.breaches) and "quality_expectations_failed" in metrics


# --------------------------------------------------------------------------------------- the report


def test_drift_report_is_self_contained_html_with_plots_and_highlighted_rows(drifted_report, profile):
    # Given a breaching window's report and the decision
    decision = decide([drifted_report, drifted_report], SPEC)
    # When the report is rendered
    page = render_report(drifted_report, profile, decision=decision, title="Drift <test>")
    # Then it inlines a plot per feature and one of the scores, nothing fetched
    assert page.count("src='data:image/png;base64,") == len(REFERENCE_NUMERIC + REFERENCE_CATEGORICAL) + 1
    assert "http://" not in page and "https://" not in page
    # And the drifted rows are highlighted, the breaches and the decision spelled out
    assert page.count("<tr class='drifted'>") == len(drifted_report.drifted)
    assert "Drift &lt;test&gt;" in page and "Decision: RETRAIN" in page
    assert f"{drifted_report.feature('income').psi:.4f}" in page and "prediction drift: score PSI" in page
    assert "No breach" in render_report(check_window(window(ReferenceTask(rows=3000, seed=2)), profile, SPEC,
                                                     FEATURES), profile)
    # And without a decision there is no decision banner
    assert "Decision:" not in render_report(drifted_report, profile)


def _chromium_screenshot(html_file, png, tmp_path):
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={png}", "--window-size=1200,1600",
         f"file://{html_file}"],
        check=True, capture_output=True, timeout=90,
    )


def test_drift_report_renders_in_headless_chromium(drifted_report, profile, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"chromium not installed at {CHROMIUM} (apt-get install -y chromium)")
    # Given the report as a file
    page = tmp_path / "drift.html"
    page.write_text(render_report(drifted_report, profile, decision=decide([drifted_report, drifted_report], SPEC)))
    # When headless Chromium screenshots it
    png = tmp_path / "drift.png"
    _chromium_screenshot(page, png, tmp_path)
    # Then the PNG is the window's size and far from blank: plots and tables put many colours on it
    from PIL import Image

    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 1600)
    pixels = np.asarray(image).reshape(-1, 3)
    non_white = (pixels < 245).any(axis=1).mean()
    assert non_white > 0.05, f"only {non_white:.1%} of the screenshot is not white"
    assert len(np.unique(pixels, axis=0)) > 200
