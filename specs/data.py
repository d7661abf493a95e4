"""The dataset a pipeline trains on: where it is, its columns, its label and how it is split."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from specs.base import Strict

LabelValue = bool | int | str


class DistributionShift(Strict):
    """Knobs that shift a dataset's distributions (1.0 / 0.0 = no shift): how drifted traffic is
    produced for tests and demos. The first five move the generated reference task's own columns;
    the last three move any dataset's configured features (a file's too)."""

    income_scale: float = 1.0
    utilization_shift: float = 0.0
    late_payment_rate: float = 1.0
    unemployment_boost: Annotated[float, Field(ge=0.0)] = 0.0
    missing_rate_scale: Annotated[float, Field(ge=0.0)] = 1.0
    numeric_scale: float = Field(1.0, description="every numeric feature multiplied by this")
    numeric_offset: float = Field(0.0, description="... then moved by this many of its standard deviations")
    category_skew: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.0, description="share of rows whose categorical features move to the column's rarest category")

    @property
    def moves_features(self) -> bool:
        """True when the feature-generic knobs (not only the reference task's) shift anything."""
        return (self.numeric_scale, self.numeric_offset, self.category_skew) != (1.0, 0.0, 0.0)


class Features(Strict):
    numeric: list[str]
    categorical: list[str] = []

    @property
    def columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]


class DatasetSpec(Strict):
    source: Literal["reference", "file"]
    uri: str | None = Field(None, description="CSV or Parquet path/URI when source is 'file'")
    rows: Annotated[int, Field(gt=0)] = 20_000
    seed: int = 7
    shift: DistributionShift = DistributionShift()
    target: str
    positive_label: LabelValue | None = Field(
        None, description="the target value that counts as the positive class; required unless the values are "
                          "0/1, booleans or yes/no-like")
    id_column: str | None = None
    features: Features
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    expectation_suite: str | None = Field(
        "credit_default", description="config/expectations/<name>.yaml; None derives one from the features"
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.source == "file" and not self.uri:
            raise ValueError("dataset.source 'file' needs dataset.uri (a .csv or .parquet path or URI)")
        if self.uri and not self.uri.endswith((".csv", ".csv.gz", ".parquet", ".pq")):
            raise ValueError(f"dataset.uri {self.uri!r} must end in .csv, .csv.gz or .parquet")
        overlap = set(self.features.numeric) & set(self.features.categorical)
        if overlap:
            raise ValueError(f"columns listed as both numeric and categorical: {sorted(overlap)}")
        if self.target in self.features.columns:
            raise ValueError(f"target {self.target!r} is also listed as a feature")
        if self.id_column and self.id_column in (self.target, *self.features.columns):
            # serving accepts and echoes the id beside the features: it cannot be one (or the label)
            raise ValueError(f"id_column {self.id_column!r} is also the target or a feature")
        return self
