"""ClusterTrainingRuntime and ClusterStorageContainer that meet Pod Security restricted.

Stub: being written."""
from __future__ import annotations

from fleet.context import FleetContext

FEATURE: str | None = "restricted"
SCOPE = "env"


def objects(ctx: FleetContext) -> list[dict]:
    return []


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []
