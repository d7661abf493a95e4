"""The reference task and table IO: deterministic, realistic, drift-able, any file type we claim."""
import numpy as np
import pandas as pd
import pytest

from components.dataset import (REFERENCE_CATEGORICAL, REFERENCE_NUMERIC, Drift, ReferenceTask, content_hash,
                                file_hash, read_table, split, write_table)


def test_same_seed_same_data_other_seed_other_data():
    a, b = ReferenceTask(rows=2000, seed=1).generate(), ReferenceTask(rows=2000, seed=1).generate()
    assert content_hash(a) == content_hash(b)
    assert content_hash(a) != content_hash(ReferenceTask(rows=2000, seed=2).generate())


def test_looks_like_a_credit_default_problem():
    frame = ReferenceTask(rows=20_000).generate()
    assert list(frame.columns) == ["customer_id", *REFERENCE_NUMERIC, *REFERENCE_CATEGORICAL, "default"]
    assert 0.06 < frame["default"].mean() < 0.25, "imbalanced, but not degenerate"
    assert 0.01 < frame["income"].isna().mean() < 0.06
    assert 0.005 < frame["employment"].isna().mean() < 0.05
    assert frame["customer_id"].is_unique
    # the label depends on the features (a model has something to learn)
    high_use = frame["utilization"] > frame["utilization"].quantile(0.8)
    assert frame.loc[high_use, "default"].mean() > 1.5 * frame.loc[~high_use, "default"].mean()


def test_drift_knobs_shift_the_distributions():
    base = ReferenceTask(rows=10_000, seed=3).generate()
    shifted = ReferenceTask(rows=10_000, seed=3, drift=Drift(income_scale=0.5, utilization_shift=0.3,
                                                              missing_rate_scale=4.0)).generate()
    assert shifted["income"].median() < 0.6 * base["income"].median()
    assert shifted["utilization"].mean() > base["utilization"].mean() + 0.2
    assert shifted["income"].isna().mean() > 2.5 * base["income"].isna().mean()


@pytest.mark.parametrize("name", ["data.csv", "data.csv.gz", "data.parquet"])
def test_tables_round_trip_by_extension(tmp_path, name):
    frame = ReferenceTask(rows=300).generate()
    path = write_table(frame, tmp_path / "nested" / name)
    back = read_table(path)
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)


def test_extensionless_artifacts_are_sniffed(tmp_path):
    frame = ReferenceTask(rows=100).generate()
    write_table(frame, tmp_path / "a.parquet").rename(tmp_path / "artifact_p")
    write_table(frame, tmp_path / "a.csv").rename(tmp_path / "artifact_c")
    assert len(read_table(tmp_path / "artifact_p")) == len(read_table(tmp_path / "artifact_c")) == 100
    assert file_hash(tmp_path / "artifact_p") != file_hash(tmp_path / "artifact_c")


def test_unsupported_extension_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"data.xlsx: unsupported file type"):
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "data.xlsx")


def test_split_is_deterministic_disjoint_and_stratified():
    frame = ReferenceTask(rows=5000).generate()
    train, test = split(frame, 0.2, seed=11, stratify="default")
    again, _ = split(frame, 0.2, seed=11, stratify="default")
    assert len(train) + len(test) == len(frame) and abs(len(test) - 1000) <= 2
    assert not set(train["customer_id"]) & set(test["customer_id"])
    assert train["customer_id"].tolist() == again["customer_id"].tolist()
    assert abs(train["default"].mean() - test["default"].mean()) < 0.005
