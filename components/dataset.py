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


def table_format(path: str | Path) -> str:
    """'parquet' or 'csv', by extension, else by content (KFP artifact paths have no extension)."""
    name = str(path)
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    with open(name, "rb") as handle:
        return "parquet" if handle.read(4) == b"PAR1" else "csv"


def read_table(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read CSV or Parquet (by extension, else by content)."""
    if table_format(path) == "parquet":
        return pd.read_parquet(path, columns=columns)
    return pd.read_csv(path, usecols=columns)


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


def split(frame: pd.DataFrame, test_fraction: float, seed: int, stratify: str | None = None):
    """Deterministic train/test split, stratified on the label when given."""
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(frame), dtype=bool)
    groups = [np.arange(len(frame))] if stratify is None else [
        np.flatnonzero(frame[stratify].to_numpy() == value) for value in pd.unique(frame[stratify])
    ]
    for index in groups:
        chosen = rng.permutation(index)[: int(round(len(index) * test_fraction))]
        test_mask[chosen] = True
    return frame[~test_mask].reset_index(drop=True), frame[test_mask].reset_index(drop=True)
