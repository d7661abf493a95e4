"""What live traffic is checked for, and when retraining runs."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from specs.base import Strict

CRON = r"^(\S+\s+){4}\S+$"


class MonitoringSpec(Strict):
    psi_threshold: Annotated[float, Field(gt=0.0)] = 0.2
    missing_rate_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    min_roc_auc: Annotated[float, Field(ge=0.0, le=1.0)] = 0.65
    window_rows: Annotated[int, Field(gt=0)] = 5000


class RetrainingSpec(Strict):
    enabled: bool = False
    schedule: Annotated[str, Field(pattern=CRON, description="5-field cron, e.g. '0 3 * * 1'")] = "0 3 * * 1"
    max_concurrency: Annotated[int, Field(ge=1, le=10)] = Field(1, description="KFP allows 1-10 concurrent runs")
