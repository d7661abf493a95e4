"""Kueue: ResourceFlavor and ClusterQueue (cluster-scoped), LocalQueue; the namespace quota sized to what runs at once.

Stub: being written."""
from __future__ import annotations

from fleet.context import FleetContext

FEATURE: str | None = "kueue"
SCOPE = "env"


def objects(ctx: FleetContext) -> list[dict]:
    return []


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []


def namespace_quota(ctx: FleetContext) -> dict[str, str] | None:
    """The namespace ResourceQuota's spec.hard on this cluster; None: keep the env overlay's."""
    return None
