"""The monitor service: ServiceAccount, config ConfigMap, Deployment, Service, PodDisruptionBudget.

Stub: being written."""
from __future__ import annotations

from fleet.context import FleetContext

FEATURE: str | None = None
SCOPE = "cluster"


def objects(ctx: FleetContext) -> list[dict]:
    return []


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []
