"""Registered versions without loading them: the `champion` / `previous-champion` aliases, where a
version's Flywheel model directory is, and downloading it. Torch-free: serving's transformer and
the CLI resolve models through here."""
from __future__ import annotations

from stages.tracking import _client, mlflow_at
from storage.endpoints import doing

CHAMPION, PREVIOUS_CHAMPION = "champion", "previous-champion"


def _set_champion(client, registered_model: str, version: str) -> str | None:
    """Move `champion` to `version`, first parking the old champion under `previous-champion`
    (so a failure in between never leaves the model without a champion). Returns the old one."""
    current = client.get_registered_model(registered_model).aliases.get(CHAMPION)
    if current is not None and str(current) != str(version):
        client.set_registered_model_alias(registered_model, PREVIOUS_CHAMPION, str(current))
    client.set_registered_model_alias(registered_model, CHAMPION, str(version))
    return None if current is None or str(current) == str(version) else str(current)


def roll_back_champion(tracking_uri: str, registered_model: str) -> tuple[str, str]:
    """Make `previous-champion` the champion again (the abandoned version becomes
    `previous-champion` and is tagged `rolled_back`); returns (new champion, abandoned)."""
    with doing(f"rolling {registered_model}@{CHAMPION} back"):
        client = _client(tracking_uri)
    aliases = client.get_registered_model(registered_model).aliases
    previous, current = aliases.get(PREVIOUS_CHAMPION), aliases.get(CHAMPION)
    if previous is None:
        raise ValueError(f"{registered_model} has no {PREVIOUS_CHAMPION} to roll back to")
    _set_champion(client, registered_model, str(previous))
    if current is not None:
        client.set_model_version_tag(registered_model, str(current), "rolled_back", "true")
    return str(previous), str(current)


def version_behind(tracking_uri: str, registered_model: str, alias: str = CHAMPION) -> str | None:
    """The version number behind `alias` (champion, previous-champion), or None if there is none."""
    with doing(f"reading {registered_model}@{alias}"):
        client = _client(tracking_uri)  # probes a remote server before mlflow (seconds) is imported
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(registered_model, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def model_dir_uri(tracking_uri: str, registered_model: str, version: str) -> str:
    """The storage URI of the Flywheel model directory inside a registered version: the pyfunc
    keeps it as its `model_dir` artifact, and MLmodel says where (artifacts/<directory name>)."""
    with doing(f"finding where {registered_model} v{version} is stored"):
        client = _client(tracking_uri)
    base = client.get_model_version_download_uri(registered_model, version)
    with mlflow_at(tracking_uri) as mlflow:
        info = mlflow.models.get_model_info(f"models:/{registered_model}/{version}")
    artifacts = (info.flavors.get("python_function") or {}).get("artifacts") or {}
    if "model_dir" not in artifacts:
        raise ValueError(f"{registered_model} v{version} has no model_dir artifact: not a Flywheel model")
    return base.rstrip("/") + "/" + artifacts["model_dir"]["path"]


def download_model_dir(tracking_uri: str, registered_model: str, version: str, dst: str) -> str:
    """The Flywheel model directory of a registered version, downloaded under `dst`; its local path."""
    from mlflow.artifacts import download_artifacts

    uri = model_dir_uri(tracking_uri, registered_model, version)
    with doing(f"downloading {registered_model} v{version}"), mlflow_at(tracking_uri):
        return download_artifacts(artifact_uri=uri, dst_path=dst)
