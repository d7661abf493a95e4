"""How a table is scored in batch with the champion: the quarantine tolerance and the partitions."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from specs.base import Strict


class ScoringSpec(Strict):
    """The batch scoring pipeline's settings (`pipelines/scoring_pipeline.py`)."""

    max_quarantine_share: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.01, description="the run fails when more than this share of the input's rows break a blocking "
                          "row-level expectation (those rows go to the quarantine file either way)")
    partition_rows: Annotated[int, Field(gt=0)] = Field(
        100_000, description="rows one scoring task reads and scores: bounds a task's memory")
    partitions: Annotated[int, Field(ge=1, le=64)] = Field(
        4, description="scoring tasks that run at once (dsl.ParallelFor parallelism; compile time)")
