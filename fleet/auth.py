"""Istio RequestAuthentication and AuthorizationPolicies for the inference endpoint and the monitor.

Stub: being written."""
from __future__ import annotations

from fleet.context import FleetContext

FEATURE: str | None = "jwt-auth"
SCOPE = "env"


def objects(ctx: FleetContext) -> list[dict]:
    return []


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []
