"""Datasets: the reference credit-default task, bring-your-own files, snapshots and splits.

Plain Python (pandas/pyarrow), no KFP. Tables are read and written through `storage.tables`.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass

import numpy as np
import pandas as pd

import storage
from model.labels import LabelError, LabelMapping
from specs import DatasetSpec, DistributionShift, Features
from storage.tables import content_hash, file_hash, read_table, table_format, write_table

REFERENCE_TARGET = "default"
REFERENCE_ID = "customer_id"
REFERENCE_NUMERIC = [
    "age",
    "income",
    "credit_limit",
    "utilization",
    "debt_to_income",
    "late_payments",
    "months_on_book",
]
REFERENCE_CATEGORICAL = ["employment", "housing", "region"]
REFERENCE_CATEGORIES = {
    "employment": ["salaried", "self_employed", "unemployed", "retired", "student"],
    "housing": ["own", "rent", "mortgage", "other"],
    "region": ["north", "south", "east", "west", "central"],
}


@dataclass(frozen=True)
class ReferenceTask:
    """A bank's credit-default problem: numeric and categorical features, ~1 in 8 positives,
    a few percent missing values, generated deterministically from a seed at any size."""

    rows: int = 20_000
    seed: int = 7
    shift: DistributionShift = DistributionShift()

    def generate(self) -> pd.DataFrame:
        rng = np.random.default_rng(self.seed)
        n, d = self.rows, self.shift
        employment_p = np.array([0.62, 0.16, 0.06 + d.unemployment_boost, 0.10, 0.06])
        employment = rng.choice(REFERENCE_CATEGORIES["employment"], n, p=employment_p / employment_p.sum())
        housing = rng.choice(REFERENCE_CATEGORIES["housing"], n, p=[0.33, 0.34, 0.28, 0.05])
        region = rng.choice(REFERENCE_CATEGORIES["region"], n, p=[0.22, 0.2, 0.2, 0.18, 0.2])
        age = rng.integers(18, 80, n)
        income = rng.lognormal(10.8, 0.55, n) * d.income_scale
        income[employment == "unemployed"] *= 0.25
        income[employment == "student"] *= 0.35
        credit_limit = np.round(income * rng.uniform(0.1, 0.6, n), -2)
        utilization = np.clip(rng.beta(2.0, 3.5, n) + d.utilization_shift, 0.0, 1.5)
        debt_to_income = np.clip(rng.gamma(2.0, 0.12, n), 0.0, 3.0)
        late_payments = rng.poisson(0.35 * d.late_payment_rate + 1.2 * utilization**2, n)
        months_on_book = rng.integers(1, 240, n)

        logit = (
            -3.2
            + 2.4 * utilization
            + 0.55 * late_payments
            + 1.1 * debt_to_income
            - 0.45 * (np.log(income) - 10.8)
            - 0.012 * (age - 45)
            - 0.003 * months_on_book
            + np.select(
                [employment == "unemployed", employment == "self_employed", employment == "student"],
                [1.3, 0.35, 0.5],
                0.0,
            )
            + np.where(housing == "rent", 0.3, 0.0)
        )
        default = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype("int64")

        frame = pd.DataFrame(
            {
                REFERENCE_ID: [f"C{i:08d}" for i in range(n)],
                "age": age.astype("int64"),
                "income": income.round(2),
                "credit_limit": credit_limit,
                "utilization": utilization.round(4),
                "debt_to_income": debt_to_income.round(4),
                "late_payments": late_payments.astype("int64"),
                "months_on_book": months_on_book.astype("int64"),
                "employment": employment,
                "housing": housing,
                "region": region,
                REFERENCE_TARGET: default,
            }
        )
        # Missing values where real data has them: income and employment are self-reported.
        for column, rate in (("income", 0.03), ("employment", 0.02)):
            frame.loc[rng.random(n) < rate * d.missing_rate_scale, column] = None
        return frame


def _seed_key(seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"flywheel-split:{seed}".encode()).digest()[:8], "little")


def split_hashes(frame: pd.DataFrame, seed: int, id_column: str | None = None) -> np.ndarray:
    """One uint64 per row that depends only on the row's id (or, without one, its content) and
    the seed: not on row order, row position or which other rows are present."""
    if id_column is not None:
        # Ids as text: the same key hashes the same whether a reader typed it int64, object or
        # arrow string. Nulls all hash alike (the validation suite rejects null ids anyway).
        ids = frame[id_column].astype(str).to_numpy(dtype=object)
        rows = pd.util.hash_array(ids, categorize=False)
    else:
        # Columns by name, so reordering columns keeps the split; changing a value, a dtype or
        # the set of columns moves the row (give the dataset an id_column for a split that lasts).
        columns = sorted(frame.columns, key=str)
        rows = pd.util.hash_pandas_object(frame[columns], index=False).to_numpy()
    # Mix in the seed: pandas hashes numbers without a key, so xor a seed-derived key and hash
    # again (splitmix64-style finaliser, a bijection): another seed gives an independent split.
    return pd.util.hash_array(rows.astype(np.uint64) ^ np.uint64(_seed_key(seed)))


def split(frame: pd.DataFrame, test_fraction: float, seed: int, id_column: str | None = None):
    """Deterministic train/test split that is stable per row: a row is in test iff the hash of
    (seed, its id) falls below `test_fraction`, or, without `id_column`, the hash of (seed, its
    content). So a row keeps its side when the dataset grows, shrinks or is reordered, and a
    champion's training rows never land in a later challenger's test set (no leakage in the gate).

    Sizes are test_fraction in expectation (binomial noise, about sqrt(n*f*(1-f)) rows), not
    exact, for every class alike. The split is not stratified on purpose: per-class quotas would
    move the threshold as data arrives and break the stability above. Rows with the same id (or
    identical content) always land on the same side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if id_column is not None and id_column not in frame.columns:
        raise KeyError(f"id column {id_column!r} is not in the frame")
    unit = (split_hashes(frame, seed, id_column) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    test_mask = unit < test_fraction
    return frame[~test_mask].reset_index(drop=True), frame[test_mask].reset_index(drop=True)


def load_dataset(spec: DatasetSpec) -> pd.DataFrame:
    """The env's dataset as a DataFrame: the generated reference task or the configured file,
    read through `storage` (local paths, s3://, minio://) and sniffed by content like the
    pipeline's artifact (Parquet, CSV or gzip-compressed CSV); `spec.shift`'s feature knobs applied."""
    if spec.source == "reference":
        frame = ReferenceTask(rows=spec.rows, seed=spec.seed, shift=spec.shift).generate()
    else:
        with storage.open_uri(spec.uri) as handle:
            frame = read_table(handle)
    return shift_features(frame, spec.features, spec.shift, spec.seed) if spec.shift.moves_features else frame


def shift_features(frame: pd.DataFrame, features: Features, shift: DistributionShift, seed: int) -> pd.DataFrame:
    """The rows with the world moved, on any schema: each numeric feature scaled by
    `numeric_scale` and moved by `numeric_offset` of its standard deviations (integer columns stay
    integers, missing values stay missing); a `category_skew` share of rows (drawn per column)
    switched to the column's rarest category, so the categories stay ones the model knows."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    for column in features.numeric:
        values = pd.to_numeric(out[column], errors="coerce")
        std = float(values.std()) if values.notna().sum() > 1 else 0.0
        moved = values * shift.numeric_scale + shift.numeric_offset * (std or 1.0)
        if pd.api.types.is_integer_dtype(out[column].dtype):
            moved = moved.round().astype(out[column].dtype)
        out[column] = moved
    for column in features.categorical:
        counts = out[column].value_counts()
        if shift.category_skew and len(counts) > 1:
            pick = (rng.random(len(out)) < shift.category_skew) & out[column].notna().to_numpy()
            out.loc[pick, column] = counts.index[-1]
    return out


def read_columns(uri: str) -> list[str]:
    """A table's column names from its header alone: the Parquet footer's schema, or a CSV's (or
    gzip-compressed CSV's) first line; the rows are never read."""
    import csv
    import gzip
    import io

    with storage.open_uri(uri) as handle:
        fmt = table_format(handle)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(handle).names)
        raw = gzip.GzipFile(fileobj=handle) if fmt == "csv.gz" else handle
        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name (pyarrow drops it too)
        header = next(csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")), [])
    return [name.strip() for name in header]


def materialise(spec: DatasetSpec, path: str) -> dict:
    """Write the dataset to `path` (the reference task, or a shifted file, as Parquet; a user file
    byte for byte otherwise, so a corrupt file reaches validation as it is) and return its lineage
    metadata."""
    if spec.source == "reference" or spec.shift.moves_features:
        write_table(load_dataset(spec), path + ".parquet")
        shutil.move(path + ".parquet", path)
        fmt = "parquet"
        source = f"reference(rows={spec.rows}, seed={spec.seed})" if spec.source == "reference" else spec.uri
        if spec.shift.moves_features:
            source += " shifted"
    else:
        with storage.open_uri(spec.uri) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        source = spec.uri
        fmt = table_format(path)  # by content, as every later stage reads the artifact
    return {"source": source, "format": fmt, "content_hash": file_hash(path)}


def split_snapshot(path: str, spec: DatasetSpec) -> list[tuple[pd.DataFrame, dict]]:
    """Read a snapshot and split it per `spec` into [(train, metadata), (test, metadata)]; the
    metadata holds rows, role, content hash, the label mapping and the positive rate."""
    frame = read_table(path)
    if spec.target not in frame.columns:
        raise LabelError(f"target column {spec.target!r} is not in the data (columns: {list(frame.columns)})")
    labels = LabelMapping.infer(frame[spec.target], spec.positive_label, spec.target)
    parts = split(frame, spec.test_fraction, spec.seed, id_column=spec.id_column)
    return [(part, {"rows": len(part), "role": role, "content_hash": content_hash(part), "labels": labels.to_dict(),
                    "positive_rate": float(labels.encode(part[spec.target], spec.target).mean()) if len(part) else 0.0})
            for part, role in zip(parts, ("train", "test"))]
