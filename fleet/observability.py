"""PrometheusRule, ServiceMonitor/PodMonitor, the Grafana dashboard ConfigMap, the Alertmanager route.

Stub: being written."""
from __future__ import annotations

from fleet.context import FleetContext

FEATURE: str | None = None
SCOPE = "env"


def objects(ctx: FleetContext) -> list[dict]:
    return []


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []
