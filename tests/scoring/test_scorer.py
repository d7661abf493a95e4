"""The pure batch scorer (`stages.scoring`): screening rows against the training suite and the
model's input contract, partitions, and the predictions with their lineage columns."""
import datetime as dt

import numpy as np
import pandas as pd
import pytest
import torch

from model.labels import LabelMapping
from model.loader import TrainedModel
from model.network import TabularNet
from model.preprocessing import Preprocessor
from pipelines.config import load_settings
from stages.dataset import ReferenceTask
from stages.scoring import (
    REASON,
    ROW,
    QuarantineError,
    check_coverage,
    check_share,
    labels_of,
    partitions,
    probabilities,
    read_rows,
    row_rules,
    score_frame,
    screen,
)
from stages.validation import load_suite
from tests.support import CONFIG_DIR

FEATURES = load_settings("local").dataset.features
LINEAGE = {"model_name": "credit-default", "model_version": "3", "run_id": "abc123"}


@pytest.fixture(scope="module")
def frame():
    return ReferenceTask(rows=400, seed=5).generate()


@pytest.fixture(scope="module")
def suite():
    return load_suite(load_settings("local").dataset, CONFIG_DIR)


@pytest.fixture(scope="module")
def model(frame):
    """An untrained network over a fitted preprocessor, labelled no/yes: enough to score with."""
    torch.manual_seed(0)
    pre = Preprocessor.fit(frame, FEATURES.numeric, FEATURES.categorical)
    net = TabularNet(pre.numeric_width, pre.cardinalities, hidden=8, depth=1).eval()
    return TrainedModel(net, pre, {"labels": LabelMapping("no", "yes").to_dict()})


def broken(frame: pd.DataFrame) -> pd.DataFrame:
    """Three bad rows: an age out of range (row 1), an unknown region (row 4), and both plus a
    credit limit above income (row 7)."""
    bad = frame.copy()
    bad.loc[1, "age"] = -5
    bad.loc[4, "region"] = "atlantis"
    bad.loc[7, ["age", "region", "credit_limit"]] = [300, "mars", bad.loc[7, "income"] * 10]
    return bad


def test_only_blocking_row_level_rules_on_features_and_id_quarantine(suite):
    rules = row_rules(suite, [*FEATURES.columns, "customer_id"])
    kinds = {(r["type"], r["kwargs"].get("column") or r["kwargs"].get("column_A")) for r in rules}
    # Then ranges, sets, types, nulls, keys and the column pair count, row by row
    assert ("expect_column_values_to_be_between", "age") in kinds
    assert ("expect_column_values_to_be_in_set", "region") in kinds
    assert ("expect_column_pair_values_a_to_be_greater_than_b", "income") in kinds
    assert ("expect_column_values_to_be_unique", "customer_id") in kinds
    # And the label, batch-level means, warnings and `mostly` tolerances do not
    assert not any(r["kwargs"].get("column") == "default" for r in rules)
    assert not any(r["type"] == "expect_column_mean_to_be_between" or r["severity"] != "blocking" for r in rules)
    assert ("expect_column_values_to_not_be_null", "income") not in kinds


def test_screen_quarantines_the_broken_rows_with_reasons_naming_expectation_and_column(frame, suite, model):
    screened = screen(broken(frame), suite, model.preprocessor, "customer_id")
    assert screened.quarantined[ROW].tolist() == [1, 4, 7]
    assert len(screened.clean) == len(frame) - 3 and screened.rows == len(frame)
    reasons = dict(zip(screened.quarantined[ROW], screened.quarantined[REASON]))
    assert reasons[1] == "expect_column_values_to_be_between on 'age' (min_value=18, max_value=110)"
    assert reasons[4].startswith("expect_column_values_to_be_in_set on 'region' (value_set=")
    assert "expect_column_values_to_be_between on 'age'" in reasons[7]
    assert "expect_column_values_to_be_in_set on 'region'" in reasons[7]
    assert "expect_column_pair_values_a_to_be_greater_than_b on 'income', 'credit_limit'" in reasons[7]
    # The clean rows are the rest, in input order
    assert screened.clean["customer_id"].tolist() == frame.drop(index=[1, 4, 7])["customer_id"].tolist()


def test_a_null_where_training_had_none_is_quarantined_as_serving_would_refuse_it(frame, suite, model):
    bad = frame.copy()
    bad["housing"] = bad["housing"].astype(object)
    bad.loc[2, "housing"] = None
    bad.loc[3, "utilization"] = np.inf
    screened = screen(bad, suite, model.preprocessor, "customer_id")
    reasons = dict(zip(screened.quarantined[ROW], screened.quarantined[REASON]))
    assert "model input: column 'housing' is null, but the training data had no missing values in it" in reasons[2]
    assert "expect_column_values_to_not_be_null on 'housing'" in reasons[2]
    assert "model input: column 'utilization' must be a finite number" in reasons[3]


def test_a_missing_feature_column_fails_naming_it(frame, suite, model):
    with pytest.raises(ValueError, match=r"lacks the model's feature columns \['region'\]"):
        screen(frame.drop(columns=["region"]), suite, model.preprocessor)


def test_past_the_share_the_run_fails_naming_counts_expectations_and_columns(frame, suite, model):
    screened = screen(broken(frame), suite, model.preprocessor, "customer_id")
    check_share(screened, 0.01)  # 3 of 400 = 0.75%: within 1%
    with pytest.raises(QuarantineError) as err:
        check_share(screened, 0.005, where="/tmp/q.parquet")
    message = str(err.value)
    assert message.startswith("quarantined 3 of 400 rows (0.75%) > scoring.max_quarantine_share 0.50%")
    assert "expect_column_values_to_be_between on 'age' (min_value=18, max_value=110) (2 rows)" in message
    assert "expect_column_values_to_be_in_set on 'region'" in message and "/tmp/q.parquet" in message


@pytest.mark.parametrize("rows, size, expected", [
    (10, 4, [(0, 4), (4, 8), (8, 10)]),  # a last short partition
    (8, 4, [(0, 4), (4, 8)]),
    (3, 10, [(0, 3)]),
    (0, 5, []),
])
def test_partitions_cover_every_row_exactly_once(rows, size, expected):
    ranges = partitions(rows, size)
    assert [(r["start"], r["stop"]) for r in ranges] == expected
    assert [r["partition"] for r in ranges] == list(range(len(expected)))
    covered = np.concatenate([np.arange(r["start"], r["stop"]) for r in ranges]) if ranges else np.array([])
    assert sorted(covered.tolist()) == list(range(rows))
    check_coverage(ranges, rows)


@pytest.mark.parametrize("ranges, message", [
    ([(0, 4), (3, 8)], "overlap at row 3"),
    ([(0, 4), (5, 8)], "a gap at row 4"),
    ([(0, 4)], "cover rows 0..3, the table has 8 rows"),
])
def test_coverage_check_names_overlaps_gaps_and_short_totals(ranges, message):
    with pytest.raises(ValueError, match=message):
        check_coverage([{"start": a, "stop": b} for a, b in ranges], 8)


def test_predictions_carry_id_label_values_probability_and_lineage(frame, model):
    at = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    scored = score_frame(model, frame, decision_threshold=0.5, lineage=LINEAGE, id_column="customer_id", scored_at=at)
    assert list(scored.columns) == ["customer_id", "prediction", "probability", "model_name", "model_version",
                                    "run_id", "scored_at"]
    assert scored["customer_id"].tolist() == frame["customer_id"].tolist()
    assert set(scored["prediction"]) <= {"no", "yes"}
    assert (scored["prediction"] == np.where(scored["probability"] >= 0.5, "yes", "no")).all()
    # The probability is the model's, rounded to FP32 as the predictor answers
    expected = model.predict_proba(frame).astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(scored["probability"].to_numpy(), expected)
    assert scored[["model_name", "model_version", "run_id"]].drop_duplicates().values.tolist() == [
        ["credit-default", "3", "abc123"]]
    assert (scored["scored_at"] == pd.Timestamp(at)).all()


def test_without_an_id_column_there_is_none_and_the_threshold_moves_labels(frame, model):
    scored = score_frame(model, frame.drop(columns=["customer_id"]), decision_threshold=0.0, lineage=LINEAGE,
                         id_column="customer_id")
    assert "customer_id" not in scored.columns
    assert set(scored["prediction"]) == {"yes"}


def test_a_partition_reads_its_rows_alone(tmp_path, frame):
    path = tmp_path / "clean.parquet"
    frame.to_parquet(path, index=False, row_group_size=150)
    for start, stop in [(0, 150), (150, 300), (300, 400), (140, 160)]:
        part = read_rows(str(path), start, stop)
        assert part["customer_id"].tolist() == frame["customer_id"].iloc[start:stop].tolist()


def test_a_reason_lists_the_bounds_low_to_high_whatever_order_the_suite_gives():
    from stages.scoring import _expected

    entry = {"type": "expect_column_values_to_be_between",
             "kwargs": {"max_value": 110, "column": "age", "mostly": 1.0, "min_value": 18}}
    assert _expected(entry) == "min_value=18, max_value=110, mostly=1"


def test_predictions_join_back_to_their_input_rows_without_an_id_column(tmp_path, frame, suite, model):
    """A file dataset has no id column: with a row quarantined in the middle, each prediction's
    input_row is the input row whose features produced it, through partitions and collection."""
    from stages.scoring import write_predictions

    table = frame.drop(columns=["customer_id"]).copy()
    table.loc[150, "age"] = -5  # quarantined: every row after it shifts by one among the clean rows
    screened = screen(table, suite, model.preprocessor, "customer_id")
    assert screened.quarantined[ROW].tolist() == [150]
    clean = tmp_path / "clean.parquet"
    screened.clean.to_parquet(clean, index=False, row_group_size=100)
    screened.quarantined.to_parquet(tmp_path / "q.parquet", index=False)
    parts = []
    for part in partitions(len(screened.clean), 100):
        scored = score_frame(model, read_rows(str(clean), part["start"], part["stop"]), decision_threshold=0.5,
                             lineage=LINEAGE, id_column="customer_id")
        scored.to_parquet(tmp_path / f"part-{part['partition']}.parquet", index=False)
        parts.append((part, str(tmp_path / f"part-{part['partition']}.parquet")))
    out = tmp_path / "out" / "preds.parquet"
    facts = write_predictions(parts[::-1], str(tmp_path / "joined.parquet"), str(out), str(tmp_path / "q.parquet"),
                              len(screened.clean))
    assert facts["quarantined"] == 1 and facts["rows"] == len(table) - 1
    preds = pd.read_parquet(out)
    assert list(preds.columns) == [ROW, "prediction", "probability", "model_name", "model_version", "run_id",
                                   "scored_at"]
    # The input positions, less the quarantined one
    assert preds[ROW].tolist() == [i for i in range(len(table)) if i != 150]
    # Each input_row rescored alone (a forward pass of one row) gives its prediction: input_row points
    # at the features that produced it (to FP32 rounding: a batch of one multiplies in another order)
    alone = probabilities(model, table.iloc[preds[ROW]], batch_rows=1)
    np.testing.assert_allclose(preds["probability"].to_numpy(), alone, rtol=0, atol=1e-6)
    assert (labels_of(alone, model.labels, 0.5).to_numpy() == preds["prediction"].to_numpy()).all()
    # Row k of the predictions is not input row k past the quarantined one: the join needs input_row
    assert preds[ROW].iloc[150] == 151
    shifted = probabilities(model, table.iloc[: len(preds)], batch_rows=1)
    assert np.abs(shifted[150:] - preds["probability"].to_numpy()[150:]).max() > 1e-3


def test_with_an_id_column_input_row_follows_it(frame, suite, model):
    screened = screen(broken(frame), suite, model.preprocessor, "customer_id")
    scored = score_frame(model, screened.clean, decision_threshold=0.5, lineage=LINEAGE, id_column="customer_id")
    assert list(scored.columns)[:3] == ["customer_id", ROW, "prediction"]
    assert scored[ROW].tolist() == [i for i in range(len(frame)) if i not in (1, 4, 7)]
    assert (frame["customer_id"].iloc[scored[ROW]].to_numpy() == scored["customer_id"].to_numpy()).all()


@pytest.mark.parametrize("rename, id_column, named", [
    ({"region": ROW}, "customer_id", ROW),
    ({"income": REASON}, "customer_id", REASON),
    ({"customer_id": "prediction"}, "prediction", "prediction"),
    ({"customer_id": "probability"}, "probability", "probability"),
    ({"customer_id": "model_version"}, "model_version", "model_version"),
    ({"customer_id": "scored_at"}, "scored_at", "scored_at"),
    ({"customer_id": ROW}, ROW, ROW),
])
def test_a_column_named_like_one_scoring_adds_is_refused_up_front_in_one_line(frame, suite, model, rename,
                                                                              id_column, named):
    from stages.scoring import ColumnClashError

    table = frame.rename(columns=rename)
    with pytest.raises(ColumnClashError) as err:
        screen(table, suite, model.preprocessor, id_column)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert f"column named {named!r}" in message or f"id column {named!r}" in message
    assert "rename" in message


def test_an_id_column_named_like_a_prediction_column_is_refused_when_scoring_too(frame, model):
    from stages.scoring import ColumnClashError

    with pytest.raises(ColumnClashError, match="id column 'probability'"):
        score_frame(model, frame.rename(columns={"customer_id": "probability"}), decision_threshold=0.5,
                    lineage=LINEAGE, id_column="probability")


def test_a_feature_or_other_column_named_prediction_is_no_clash(frame, suite, model):
    """Only the id column is carried into the predictions: another input column may be called `prediction`."""
    screened = screen(frame.assign(prediction=1), suite, model.preprocessor, "customer_id")
    assert len(screened.clean) == len(frame) and "prediction" in screened.clean.columns


def test_predictions_are_copied_in_chunks_and_atomically(tmp_path, monkeypatch):
    """write_predictions never reads the whole file: shutil.copyfileobj in chunks to a local
    target (a temporary file renamed), a chunked upload (put_file) to an object store."""
    import shutil

    import fsspec

    from stages import scoring

    source = tmp_path / "preds.parquet"
    payload = bytes(range(256)) * 1000
    source.write_bytes(payload)
    reads = []
    copy = shutil.copyfileobj
    monkeypatch.setattr(scoring.shutil, "copyfileobj", lambda a, b, n: reads.append(n) or copy(a, b, n))
    target = tmp_path / "deep" / "out.parquet"
    scoring.copy_to(str(source), str(target), chunk_bytes=4096)
    assert target.read_bytes() == payload and reads == [4096]
    assert [p.name for p in target.parent.iterdir()] == ["out.parquet"]  # no temporary file left
    scoring.copy_to(str(source), "memory://flywheel-test/out.parquet")
    assert fsspec.filesystem("memory").cat_file("/flywheel-test/out.parquet") == payload


def test_the_cli_shows_a_column_clash_from_the_screen_task_as_its_one_line(frame, suite, model):
    """`flywheel score` shows the failing task's exception line (pipelines.local_runner.failure_reason)."""
    from pipelines.local_runner import failure_reason
    from stages.scoring import ColumnClashError

    with pytest.raises(ColumnClashError) as err:
        screen(frame.rename(columns={"region": ROW}), suite, model.preprocessor, "customer_id")
    log = (f"Traceback (most recent call last):\n  File x\nstages.scoring.ColumnClashError: {err.value}\n"
           "screen-op failed\n")
    assert failure_reason(log) == f"stages.scoring.ColumnClashError: {err.value}"
