"""Hyperparameter search: strategy, budget and the space it searches."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from specs.base import Strict
from specs.training import Hyperparameters

SearchValue = list[float] | list[int] | list[str]


class TuningSpec(Strict):
    enabled: bool = True
    strategy: Literal["grid", "random", "successive_halving"] = "random"
    trials: Annotated[int, Field(ge=1)] = 4
    parallelism: Annotated[int, Field(ge=1)] = 2
    epochs_per_trial: Annotated[int, Field(ge=1)] = 3
    search_space: dict[str, SearchValue] = {}

    @field_validator("search_space")
    @classmethod
    def _known_hyperparameters(cls, space):
        allowed = set(Hyperparameters.model_fields) - {"seed"}
        unknown = sorted(set(space) - allowed)
        if unknown:
            raise ValueError(f"unknown hyperparameters {unknown}; allowed: {sorted(allowed)}")
        empty = [k for k, v in space.items() if not v]
        if empty:
            raise ValueError(f"empty search lists for {empty}")
        return space
