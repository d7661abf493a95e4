"""The champion's InferenceService as the tree holds it (same builder as flywheel deploy), its PodDisruptionBudget.

Stub: being written."""
from __future__ import annotations

from fleet.context import FleetContext

FEATURE: str | None = None
SCOPE = "cluster"


def objects(ctx: FleetContext) -> list[dict]:
    return []


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []


def replacements(ctx: FleetContext) -> list[dict]:
    """Kustomize `replacements` entries the cluster's kustomization carries (the model URI)."""
    return []
