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


# A shadow's model version and request ids carry this suffix: its rows get a sink partition of their
# own, and its payload events never pair with the champion's (the sink pairs halves by ce-id).
SHADOW_SUFFIX = "-shadow"


def shadow_id(value: str) -> str:
    """`value` (a version or a request id) as the shadow's, once: `7` -> `7-shadow`."""
    return value if value.endswith(SHADOW_SUFFIX) else f"{value}{SHADOW_SUFFIX}"


class ShadowSpec(Strict):
    """Promotion after live shadow traffic: a candidate that passes the gate becomes the
    `challenger` (not the champion), is served beside the champion on a mirrored copy of live
    traffic, and is promoted once `rows` mirrored rows were answered by both and, where ground
    truth has arrived, its live ROC AUC is no more than `max_regression` below the champion's
    (with `min_agreement`, also that share of identical decisions)."""

    rows: Annotated[int, Field(ge=1)] = Field(1000, description="mirrored rows both versions must have answered")
    max_regression: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.01, description="how far the challenger's live ROC AUC may fall below the champion's")
    min_agreement: Annotated[float | None, Field(ge=0.0, le=1.0)] = Field(
        None, description="share of rows both must decide alike (None: not checked; a better model disagrees)")
    percent: Annotated[float, Field(gt=0.0, le=100.0)] = Field(
        100.0, description="on a cluster: the share of requests the Istio route mirrors to the challenger")


class EvaluationSpec(Strict):
    thresholds: Thresholds = Thresholds()
    decision_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    slice_column: str | None = None
    promotion_margin: Annotated[float, Field(ge=0.0)] = 0.002
    shadow: ShadowSpec | None = None  # None: a candidate that wins the gate is the champion at once


class TrackingSpec(Strict):
    tracking_uri: str
    experiment: str
    registered_model: str
