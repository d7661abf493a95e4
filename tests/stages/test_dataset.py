"""The reference task and table IO: deterministic, realistic, drift-able, any file type we claim."""
import gzip
import io

import numpy as np
import pandas as pd
import pytest

from specs import DistributionShift
from stages.dataset import REFERENCE_CATEGORICAL, REFERENCE_NUMERIC, ReferenceTask, load_dataset, split
from storage.tables import content_hash, file_hash, read_table, table_format, write_table


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
    shifted = ReferenceTask(rows=10_000, seed=3, shift=DistributionShift(income_scale=0.5, utilization_shift=0.3,
                                                                          missing_rate_scale=4.0)).generate()
    assert shifted["income"].median() < 0.6 * base["income"].median()
    assert shifted["utilization"].mean() > base["utilization"].mean() + 0.2
    assert shifted["income"].isna().mean() > 2.5 * base["income"].isna().mean()


def test_config_dataset_shift_reaches_the_generated_data():
    """Given dataset.shift in an env's config, When its dataset loads, Then it is the shifted task."""
    from pipelines.config import load_settings

    shift = {"income_scale": 0.5, "utilization_shift": 0.3}
    spec = load_settings("local", overrides={"dataset": {"rows": 2000, "seed": 3, "shift": shift}}).dataset
    assert spec.shift == DistributionShift(**shift)
    expected = ReferenceTask(rows=2000, seed=3, shift=DistributionShift(**shift)).generate()
    assert content_hash(load_dataset(spec)) == content_hash(expected)
    assert content_hash(expected) != content_hash(ReferenceTask(rows=2000, seed=3).generate())


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


def test_extensionless_gzip_csv_is_sniffed_and_read(tmp_path):
    # ingest copies a user's .csv.gz byte for byte to an artifact path with no extension
    frame = ReferenceTask(rows=200).generate()
    write_table(frame, tmp_path / "a.csv.gz").rename(tmp_path / "artifact_gz")
    assert (tmp_path / "artifact_gz").read_bytes()[:2] == b"\x1f\x8b"
    assert table_format(tmp_path / "artifact_gz") == "csv.gz"
    assert table_format(tmp_path / "a.csv.gz") == "csv.gz" and table_format("x.csv") == "csv"
    pd.testing.assert_frame_equal(read_table(tmp_path / "artifact_gz"), frame, check_dtype=False)


@pytest.mark.parametrize("name", ["data.csv", "data.csv.gz", "data.parquet"])
def test_read_table_takes_a_file_object_sniffed_or_with_its_format(tmp_path, name):
    frame = ReferenceTask(rows=150).generate()
    path = write_table(frame, tmp_path / name)
    fmt = {"data.csv": "csv", "data.csv.gz": "csv.gz", "data.parquet": "parquet"}[name]
    with open(path, "rb") as handle:
        assert table_format(handle) == fmt and handle.tell() == 0, "sniffing rewinds the handle"
        pd.testing.assert_frame_equal(read_table(handle), frame, check_dtype=False)
    buffer = io.BytesIO(path.read_bytes())
    pd.testing.assert_frame_equal(read_table(buffer, format=fmt), frame, check_dtype=False)
    assert fmt != "csv.gz" or gzip.decompress(path.read_bytes()).startswith(b"customer_id,")


def test_unsupported_extension_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"data.xlsx: unsupported file type"):
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "data.xlsx")


@pytest.mark.parametrize("id_column", ["customer_id", None])
def test_split_is_deterministic_disjoint_and_roughly_balanced(id_column):
    frame = ReferenceTask(rows=5000).generate()
    train, test = split(frame, 0.2, seed=11, id_column=id_column)
    again, _ = split(frame, 0.2, seed=11, id_column=id_column)
    # hashed, so the size is binomial around 1000 (sd ~28): within 4 sd
    assert len(train) + len(test) == len(frame) and abs(len(test) - 1000) <= 115
    assert not set(train["customer_id"]) & set(test["customer_id"])
    assert train["customer_id"].tolist() == again["customer_id"].tolist()
    # each class lands in test at the fraction in expectation (positive rate sd in test ~0.01)
    assert abs(train["default"].mean() - test["default"].mean()) < 0.04


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_split_sizes_follow_the_test_fraction(fraction):
    frame = pd.DataFrame({"id": np.arange(40_000), "x": np.arange(40_000) % 7})
    for id_column in ("id", None):
        _, test = split(frame, fraction, seed=3, id_column=id_column)
        sd = (len(frame) * fraction * (1 - fraction)) ** 0.5
        assert abs(len(test) - fraction * len(frame)) < 4 * sd, (id_column, len(test))


def _test_ids(frame, seed=7, id_column="customer_id"):
    return set(split(frame, 0.2, seed=seed, id_column=id_column)[1]["customer_id"])


@pytest.mark.parametrize("id_column", ["customer_id", None])
def test_a_rows_side_survives_appended_rows_and_reordering(id_column):
    """No leakage in the champion/challenger gate: a row the champion trained on never becomes a
    test row for the next run, when the dataset grows by appended rows and comes back shuffled."""
    old = ReferenceTask(rows=20_000, seed=7).generate()
    extra = ReferenceTask(rows=2_000, seed=8).generate()
    extra["customer_id"] = [f"N{i:08d}" for i in range(len(extra))]
    grown = pd.concat([old, extra], ignore_index=True).sample(frac=1.0, random_state=1).reset_index(drop=True)
    old_train, old_test = split(old, 0.2, seed=7, id_column=id_column)
    new_train, new_test = split(grown, 0.2, seed=7, id_column=id_column)
    assert not set(old_train["customer_id"]) & set(new_test["customer_id"]), "old training rows leaked into test"
    assert set(old_test["customer_id"]) <= set(new_test["customer_id"]), "old test rows stay test rows"
    assert not set(old_test["customer_id"]) & set(new_train["customer_id"])


def test_id_split_ignores_everything_but_the_id():
    frame = ReferenceTask(rows=3000, seed=5).generate()
    changed = frame.copy()
    changed["income"] = changed["income"] * 1.1  # corrected values, same customers
    changed = changed[list(reversed(changed.columns))]
    assert _test_ids(frame) == _test_ids(changed)
    ints = pd.DataFrame({"customer_id": np.arange(3000), "default": 0})
    as_text = ints.assign(customer_id=ints["customer_id"].astype(str))
    assert _test_ids(ints) == set(map(int, _test_ids(as_text))), "the same key, typed int or str"


def test_same_seed_same_split_other_seed_other_split():
    frame = ReferenceTask(rows=5000).generate()
    for id_column in ("customer_id", None):
        a, b = _test_ids(frame, 1, id_column), _test_ids(frame, 2, id_column)
        assert a == _test_ids(frame, 1, id_column)
        # independent splits share about f^2 of the rows (200 of 5000), far from all 1000
        assert 100 < len(a & b) < 350, (id_column, len(a & b))


def test_split_names_a_missing_id_column():
    with pytest.raises(KeyError, match="account"):
        split(ReferenceTask(rows=50).generate(), 0.2, seed=1, id_column="account")
