"""NetworkPolicies: default deny for serving and monitor pods, then exactly the lifecycle's flows.

Stub: being written."""
from __future__ import annotations

from fleet.context import FleetContext

FEATURE: str | None = "network-policies"
SCOPE = "env"


def objects(ctx: FleetContext) -> list[dict]:
    return []


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []
