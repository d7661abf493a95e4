"""The monitoring check's history: the same window checked twice counts once, overlapping windows are
not two breaching windows, and a check that is not new evidence leaves the streak alone."""
import datetime as dt

import numpy as np

from tests.support import local_settings, reference, write_window


def test_the_same_window_checked_twice_counts_once(tmp_path, champion):
    from monitoring.check import history_uri, load_history, run_check
    from monitoring.windows import read_window

    settings = local_settings(tmp_path)
    root = settings.monitoring.sink.root
    when = dt.datetime(2025, 6, 15, 10, tzinfo=dt.UTC)
    shifted = reference(600, seed=5).assign(age=lambda f: f.age + 15)
    write_window(root, "7", shifted, when, np.random.default_rng(2).beta(2, 5, 600))

    def check():
        frame = read_window(root, model_version="7")
        return run_check(frame, champion, settings.monitoring, settings.dataset.features, model_version="7",
                         root=root, env="local", render=False)

    first = check()
    assert first.report.breaches and not first.retrain and "1 of 2" in first.reasons[0]
    second = check()  # no new traffic: the same window again
    assert not second.retrain and len(load_history(history_uri(root, "7"))) == 1
    write_window(root, "7", shifted, when + dt.timedelta(hours=1), np.random.default_rng(3).beta(2, 5, 600))
    third = check()
    assert third.retrain and "2 consecutive breaching windows" in third.reasons[0]
    assert third.dedup_key.startswith("drift/local/v7/") and third.dedup_key != first.dedup_key


def test_overlapping_windows_are_not_two_breaching_windows_but_disjoint_ones_are(tmp_path, champion):
    from monitoring.check import history_uri, load_history, run_check
    from monitoring.windows import read_window

    settings = local_settings(tmp_path)
    spec = settings.monitoring.model_copy(update={"window_rows": 600})  # a check reads the newest 600 rows
    root = spec.sink.root
    when = dt.datetime(2025, 6, 15, 10, tzinfo=dt.UTC)

    def traffic(rows, at, seed):
        shifted = reference(rows, seed=seed).assign(age=lambda f: f.age + 15)
        write_window(root, "7", shifted, at, np.random.default_rng(seed).beta(2, 5, rows))

    def check():
        frame = read_window(root, model_version="7", rows=spec.window_rows)
        return run_check(frame, champion, spec, settings.dataset.features, model_version="7", root=root,
                         env="local", render=False)

    # Given a breaching window of 600 rows
    traffic(600, when, 5)
    first = check()
    assert first.report.breaches and not first.retrain and "1 of 2" in first.reasons[0]
    # When a check hours later sees 100 new rows and 500 of the first window's (< min_samples 200 new)
    traffic(100, when + dt.timedelta(hours=3), 6)
    overlapping = check()
    # Then it breaches too, but it is not a second breaching window: no retraining, and it says why
    assert overlapping.report.breaches and overlapping.report.enough_data and not overlapping.retrain
    assert "1 of 2" in overlapping.reasons[0] and "not new evidence" in overlapping.reasons[0]
    assert "100 rows newer" in overlapping.reasons[0]
    history = load_history(history_uri(root, "7"))
    assert [(h["new_rows"], h["new_evidence"]) for h in history] == [(600, True), (100, False)]
    # When the next check's window is disjoint from the first's (600 rows, all new)
    traffic(600, when + dt.timedelta(hours=6), 7)
    disjoint = check()
    # Then the two breaching windows retrain
    assert disjoint.retrain and "2 consecutive breaching windows" in disjoint.reasons[0]
    assert load_history(history_uri(root, "7"))[-1]["new_rows"] == 600


def test_a_check_that_is_not_new_evidence_neither_adds_to_nor_breaks_the_streak():
    from monitoring.check import decide
    from specs import MonitoringSpec

    spec = MonitoringSpec(consecutive_windows=2)
    breach = {"enough_data": True, "breaches": ["age: PSI 0.4"], "rows": 800}
    calm = {"enough_data": True, "breaches": [], "rows": 800}
    stale = {"new_evidence": False, "new_rows": 50}
    assert not decide([breach, {**breach, **stale}], spec).retrain
    assert decide([breach, {**calm, **stale}, breach], spec).retrain
    assert decide([breach, breach], spec).retrain and not decide([breach, calm, breach], spec).retrain
    assert not decide([breach, {**breach, **stale, "enough_data": False}, breach], spec).retrain
