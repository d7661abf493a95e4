"""A FleetContext per (env, cluster) from the committed config, for the builders' tests."""
from __future__ import annotations

import pytest

from pipelines.config import load_settings
from pipelines.fleet_context import fleet_contexts

CLUSTER_ENVS = ("dev", "staging", "prod")
# A checkout's prod carries the all-zero placeholder digest until `make image ENV=prod` pins one
# (render refuses it, policy flags it); these tests render what a pinned prod would run.
PINNED_DIGEST = "sha256:" + "5f0c8e9a" * 8


def pinned_settings(env: str, config_dir=None):
    """The env's settings, its image pinned to PINNED_DIGEST where config requires a digest."""
    settings = load_settings(env, config_dir)
    if settings.image.require_digest:
        settings = load_settings(env, config_dir, overrides={"image": {"digest": PINNED_DIGEST}})
    return settings


def contexts(env: str):
    return fleet_contexts(pinned_settings(env))


@pytest.fixture(params=[(env, i) for env in CLUSTER_ENVS for i in range(len(contexts(env)))],
                ids=lambda p: f"{p[0]}-{p[1]}")
def fleet_ctx(request):
    """Every cluster of every cluster env, one at a time."""
    env, index = request.param
    return contexts(env)[index]


@pytest.fixture(params=[(env, c.cluster.name) for env in CLUSTER_ENVS for c in contexts(env) if c.runs("training")],
                ids=lambda p: p[1])
def training_ctx(request):
    """Every cluster that runs training, one at a time."""
    env, name = request.param
    return next(c for c in contexts(env) if c.cluster.name == name)


@pytest.fixture
def pinned_checkout(tmp_path, monkeypatch):
    """A copy of config/ and manifests/ as a user has them after `make image ENV=prod` pinned prod's
    image and `flywheel render --write` regenerated the tree; the CLI and gitops read the copy."""
    import shutil

    from pipelines import config, manifests
    from pipelines.gitops import write_tree
    from pipelines.images import pin
    from tests.support import ROOT

    config_dir, manifests_dir = tmp_path / "config", tmp_path / "manifests"
    shutil.copytree(ROOT / "config", config_dir)
    shutil.copytree(ROOT / "manifests", manifests_dir)
    pin(config_dir / "prod.yaml", PINNED_DIGEST)
    monkeypatch.setattr(config, "CONFIG_DIR", config_dir)
    monkeypatch.setattr(manifests, "MANIFESTS_DIR", manifests_dir)
    write_tree(manifests_dir)
    return tmp_path
