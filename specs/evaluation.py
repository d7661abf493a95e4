"""How a candidate is judged, and where runs and models are tracked (MLflow)."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from specs.base import Strict


class Thresholds(Strict):
    """Absolute floors (ceilings for brier) a model must clear to be promoted; only the metrics
    set here are checked."""

    roc_auc: Annotated[float | None, Field(ge=0.0, le=1.0)] = 0.70
    pr_auc: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    f1: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    brier: Annotated[float | None, Field(ge=0.0, le=1.0)] = None

    def configured(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class EvaluationSpec(Strict):
    thresholds: Thresholds = Thresholds()
    decision_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    slice_column: str | None = None
    promotion_margin: Annotated[float, Field(ge=0.0)] = 0.002


class TrackingSpec(Strict):
    tracking_uri: str
    experiment: str
    registered_model: str
