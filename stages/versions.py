"""Registered versions without loading them: the `champion` / `previous-champion` aliases, where a
version's Flywheel model directory is, and downloading it. Torch-free: serving's transformer and
the CLI resolve models through here."""
from __future__ import annotations

from gateways.mlflow_api import Registry, download
from storage.endpoints import doing

CHAMPION, PREVIOUS_CHAMPION = "champion", "previous-champion"
# The pyfunc artifact that holds the Flywheel model directory (stages.registry logs it).
MODEL_DIR_ARTIFACT = "model_dir"


def set_champion(registry: Registry, version: str) -> str | None:
    """Move `champion` to `version`, first parking the old champion under `previous-champion`
    (so a failure in between never leaves the model without a champion). Returns the old one."""
    current = (registry.aliases() or {}).get(CHAMPION)
    if current is not None and current != str(version):
        registry.set_alias(PREVIOUS_CHAMPION, current)
    registry.set_alias(CHAMPION, str(version))
    return None if current is None or current == str(version) else current


def version_behind(tracking_uri: str, registered_model: str, alias: str = CHAMPION) -> str | None:
    """The version number behind `alias` (champion, previous-champion), or None if there is none."""
    with doing(f"reading {registered_model}@{alias}"):
        registry = Registry(tracking_uri, registered_model)  # probes a remote server before mlflow is imported
        return registry.version_behind(alias)


def model_dir_uri(tracking_uri: str, registered_model: str, version: str) -> str:
    """The storage URI of the Flywheel model directory inside a registered version: the pyfunc
    keeps it as its `model_dir` artifact, and MLmodel says where (artifacts/<directory name>)."""
    with doing(f"finding where {registered_model} v{version} is stored"):
        registry = Registry(tracking_uri, registered_model)
        return registry.pyfunc_artifacts_uri(version, MODEL_DIR_ARTIFACT)


def download_model_dir(tracking_uri: str, registered_model: str, version: str, dst: str) -> str:
    """The Flywheel model directory of a registered version, downloaded under `dst`; its local path."""
    uri = model_dir_uri(tracking_uri, registered_model, version)
    with doing(f"downloading {registered_model} v{version}"):
        return download(tracking_uri, uri, dst)
