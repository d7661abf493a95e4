"""A FleetContext per (env, cluster) from the committed config, for the builders' tests."""
from __future__ import annotations

import pytest

from pipelines.config import load_settings
from pipelines.fleet_context import fleet_contexts

CLUSTER_ENVS = ("dev", "staging", "prod")


def contexts(env: str):
    return fleet_contexts(load_settings(env))


@pytest.fixture(params=[(env, i) for env in CLUSTER_ENVS for i in range(len(contexts(env)))],
                ids=lambda p: f"{p[0]}-{p[1]}")
def fleet_ctx(request):
    """Every cluster of every cluster env, one at a time."""
    env, index = request.param
    return contexts(env)[index]
