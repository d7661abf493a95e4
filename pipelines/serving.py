"""The champion, wherever an environment serves it: what `flywheel serve`, `deploy` and
`rollback` do with the registry and the env's deployer (through `serving.deploy`)."""
from __future__ import annotations

import json

from pipelines.config import Settings
from pipelines.training_pipeline import deploy_spec

SMOKE_ROWS = 3


def example_records(settings: Settings, rows: int = SMOKE_ROWS) -> list[dict]:
    """A few rows of the env's data, features only, as a client sends them (JSON records)."""
    from stages.dataset import load_dataset

    frame = load_dataset(settings.dataset.model_copy(update={"rows": max(rows, 50)}))
    columns = settings.dataset.features.columns
    return json.loads(frame[columns].head(rows).to_json(orient="records"))


def _version(settings: Settings, alias: str) -> str:
    from stages.versions import version_behind

    version = version_behind(settings.mlflow.tracking_uri, settings.mlflow.registered_model, alias)
    if version is None:
        raise LookupError(f"{settings.mlflow.registered_model} has no {alias} in {settings.mlflow.tracking_uri}; "
                          "run the training pipeline first (`flywheel run` here, `flywheel submit` on a cluster)")
    return version


def local_champion(settings: Settings, dst: str) -> tuple[str, str]:
    """(version, local model directory) of the registry's champion, downloaded under `dst`."""
    from stages.versions import CHAMPION, download_model_dir

    version = _version(settings, CHAMPION)
    return version, download_model_dir(settings.mlflow.tracking_uri, settings.mlflow.registered_model, version, dst)


def deploy_champion(settings: Settings) -> dict:
    """Serve the champion with the env's deployer and smoke-test it; what is live."""
    from serving.deploy import deploy_model
    from stages.versions import CHAMPION

    return deploy_model(deploy_spec(settings), None, _version(settings, CHAMPION), example_records(settings),
                        tracking_uri=settings.mlflow.tracking_uri)


def plan_champion(settings: Settings) -> dict:
    """The InferenceService `deploy_champion` would apply (validated against the CRD)."""
    from serving.deploy import plan_model
    from stages.versions import CHAMPION

    return plan_model(deploy_spec(settings), _version(settings, CHAMPION), settings.mlflow.tracking_uri)


def roll_back(settings: Settings) -> dict:
    """Serve the previous champion (smoke-tested; on a cluster at once, no canary: the live model
    is the one being abandoned), then make it the champion in the registry."""
    from serving.deploy import roll_back_model
    from stages.versions import PREVIOUS_CHAMPION, roll_back_champion

    live = roll_back_model(deploy_spec(settings), _version(settings, PREVIOUS_CHAMPION), example_records(settings),
                           tracking_uri=settings.mlflow.tracking_uri)
    champion, abandoned = roll_back_champion(settings.mlflow.tracking_uri, settings.mlflow.registered_model)
    live["detail"] += f"; registry: v{champion} is the champion again, v{abandoned} is tagged rolled_back"
    return live
