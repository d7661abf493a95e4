"""Datasets: the reference credit-default task, bring-your-own files, hashing and splits.

Plain Python (pandas/pyarrow), no KFP: every stage reads and writes tables through here.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

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
class Drift:
    """Knobs that shift the reference distributions (1.0 / 0.0 = no shift), for drift tests."""

    income_scale: float = 1.0
    utilization_shift: float = 0.0
    late_payment_rate: float = 1.0
    unemployment_boost: float = 0.0
    missing_rate_scale: float = 1.0


@dataclass(frozen=True)
class ReferenceTask:
    """A bank's credit-default problem: numeric and categorical features, ~1 in 8 positives,
    a few percent missing values, generated deterministically from a seed at any size."""

    rows: int = 20_000
    seed: int = 7
    drift: Drift = field(default_factory=Drift)

    def generate(self) -> pd.DataFrame:
        rng = np.random.default_rng(self.seed)
        n, d = self.rows, self.drift
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


GZIP_MAGIC = b"\x1f\x8b"


def table_format(source) -> str:
    """'parquet', 'csv' or 'csv.gz': by extension, else by content (KFP artifact paths have no
    extension). `source` is a path or a seekable binary file object (sniffed, then rewound)."""
    if hasattr(source, "read"):
        start = source.tell()
        magic = source.read(4)
        source.seek(start)
    else:
        name = str(source)
        if name.endswith((".parquet", ".pq")):
            return "parquet"
        if name.endswith(".csv.gz"):
            return "csv.gz"
        if name.endswith(".csv"):
            return "csv"
        with open(name, "rb") as handle:
            magic = handle.read(4)
    if magic == b"PAR1":
        return "parquet"
    return "csv.gz" if magic[:2] == GZIP_MAGIC else "csv"


def read_table(source, columns: list[str] | None = None, format: str | None = None) -> pd.DataFrame:
    """Read CSV, gzip-compressed CSV or Parquet from a path or a binary file object (e.g. from
    `training.storage.open_uri`). `format` ('parquet' | 'csv' | 'csv.gz') defaults to
    `table_format(source)`: by extension, else by content (file objects must then be seekable)."""
    fmt = format or table_format(source)
    if fmt == "parquet":
        return pd.read_parquet(source, columns=columns)
    if fmt not in ("csv", "csv.gz"):
        raise ValueError(f"unsupported table format {fmt!r}, expected 'parquet', 'csv' or 'csv.gz'")
    return pd.read_csv(source, usecols=columns, compression="gzip" if fmt == "csv.gz" else None)


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write CSV or Parquet by extension, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".parquet", ".pq"):
        frame.to_parquet(path, index=False)
    elif path.name.endswith((".csv", ".csv.gz")):
        frame.to_csv(path, index=False)
    else:
        raise ValueError(f"{path}: unsupported file type, expected .csv, .csv.gz or .parquet")
    return path


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes: the dataset's identity for lineage, even when it won't parse."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def content_hash(frame: pd.DataFrame) -> str:
    """A stable SHA-256 of a table's content (columns, dtypes and values), for lineage."""
    digest = hashlib.sha256()
    digest.update(repr([(c, str(t)) for c, t in frame.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).values.tobytes())
    return "sha256:" + digest.hexdigest()


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


def split(frame: pd.DataFrame, test_fraction: float, seed: int, stratify: str | None = None,
          id_column: str | None = None):
    """Deterministic train/test split that is stable per row: a row is in test iff the hash of
    (seed, its id) falls below `test_fraction`, or, without `id_column`, the hash of (seed, its
    content). So a row keeps its side when the dataset grows, shrinks or is reordered, and a
    champion's training rows never land in a later challenger's test set (no leakage in the gate).

    Sizes are test_fraction in expectation (binomial noise, about sqrt(n*f*(1-f)) rows), not
    exact. `stratify` is accepted for compatibility and does not steer the split: per-class
    quotas would move the threshold as data arrives and break the stability above; each class
    still lands in test at test_fraction in expectation. Rows with the same id (or identical
    content) always land on the same side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if stratify is not None and stratify not in frame.columns:
        raise KeyError(f"stratify column {stratify!r} is not in the frame")
    if id_column is not None and id_column not in frame.columns:
        raise KeyError(f"id column {id_column!r} is not in the frame")
    unit = (split_hashes(frame, seed, id_column) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    test_mask = unit < test_fraction
    return frame[~test_mask].reset_index(drop=True), frame[test_mask].reset_index(drop=True)
