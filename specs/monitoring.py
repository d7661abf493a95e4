"""What live traffic is checked for, where it is recorded, and when retraining runs."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from specs.base import Strict
from specs.cron import check_cron


class SinkSpec(Strict):
    """The monitor service's payload sink: where the KServe logger's events go and are kept."""

    url: str | None = Field(None, description="where serving sends payload events (the sink's /events); null: off")
    root: str = Field("runs/monitoring", description="storage URI of the windows (Parquet, by model version and time)")
    buffer_events: Annotated[int, Field(gt=0)] = Field(
        10_000, description="events held in memory (unpaired halves, buffered pairs and the pairs a flush is "
                            "writing); beyond it new calls get a 503. A flush starts at a quarter of it")
    buffer_bytes: Annotated[int, Field(gt=0)] = Field(
        64 << 20, description="event body bytes held in memory, counted as buffer_events; beyond it: 503")
    flush_events: Annotated[int, Field(gt=0)] = Field(2_000, description="flush a window file at this many rows")
    flush_seconds: Annotated[float, Field(gt=0)] = Field(5.0, description="... or after this long")


class MonitoringSpec(Strict):
    psi_threshold: Annotated[float, Field(gt=0.0)] = Field(0.2, description="per-feature PSI above this is drift")
    prediction_psi_threshold: Annotated[float, Field(gt=0.0)] = Field(
        0.2, description="PSI of the score distribution against training's held-out scores")
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.01, description="family-wise significance of KS (numeric) and chi-square (categorical) tests")
    correction: Literal["holm", "bonferroni", "fdr_bh"] = "holm"
    min_samples: Annotated[int, Field(gt=0)] = Field(200, description="fewer rows in a window: no tests, no decision")
    missing_rate_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.1, description="a feature's missing rate above training's by more than this is a breach")
    min_roc_auc: Annotated[float, Field(ge=0.0, le=1.0)] = Field(0.65, description="live ROC AUC floor (with labels)")
    window_rows: Annotated[int, Field(gt=0)] = Field(5000, description="the most recent rows a check reads")
    consecutive_windows: Annotated[int, Field(ge=1)] = Field(
        2, description="hysteresis: retrain only after this many breaching windows in a row")
    check_every_hours: Annotated[int, Field(ge=1, le=24)] = Field(6, description="the monitoring recurring run")
    sink: SinkSpec = SinkSpec()


class RetrainingSpec(Strict):
    enabled: bool = False
    schedule: Annotated[str, AfterValidator(check_cron),
                        Field(description="5-field cron, e.g. '0 3 * * 1'")] = "0 3 * * 1"
    max_concurrency: Annotated[int, Field(ge=1, le=10)] = Field(1, description="KFP allows 1-10 concurrent runs")
    cooldown_minutes: Annotated[int, Field(ge=0)] = Field(
        360, description="storm guard: no drift-triggered run within this long of the last one")
    trigger_on_drift: bool = Field(True, description="a drift decision (or an alert) starts a retraining run")
