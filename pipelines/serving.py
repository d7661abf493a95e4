"""The champion, wherever an environment serves it: what `flywheel serve`, `deploy` and
`rollback` do with the registry and the env's deployer (`serving.deployer`, `serving.local`)."""
from __future__ import annotations

import json
import tempfile

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


def _deploy(settings: Settings, alias: str) -> dict:
    from serving.deploy import deploy_model
    from stages.versions import download_model_dir, model_dir_uri

    tracking, name = settings.mlflow.tracking_uri, settings.mlflow.registered_model
    version = _version(settings, alias)
    records = example_records(settings)
    if settings.serving.deployer == "local":
        with tempfile.TemporaryDirectory(prefix="flywheel-deploy-") as tmp:
            return deploy_model(deploy_spec(settings), download_model_dir(tracking, name, version, tmp), version,
                                None, records)
    return deploy_model(deploy_spec(settings), "", version, model_dir_uri(tracking, name, version), records)


def deploy_champion(settings: Settings) -> dict:
    """Serve the champion with the env's deployer and smoke-test it; what is live."""
    from stages.versions import CHAMPION

    return _deploy(settings, CHAMPION)


def plan_champion(settings: Settings) -> dict:
    """The InferenceService `deploy_champion` would apply (validated against the CRD)."""
    from serving.deployer import plan, registry_model

    if settings.serving.deployer == "local":
        raise ValueError(f"env {settings.env!r} serves on this machine (serving.deployer local): nothing to print; "
                         f"`flywheel serve --env {settings.env}` serves the champion")
    model = registry_model(settings.mlflow.tracking_uri, settings.mlflow.registered_model)
    if model is None:
        raise LookupError(f"{settings.mlflow.registered_model} has no champion yet")
    return plan(settings, model)


def roll_back(settings: Settings) -> dict:
    """Serve the previous champion (smoke-tested; on a cluster at once, no canary: the live model
    is the one being abandoned), then make it the champion in the registry."""
    from stages.versions import PREVIOUS_CHAMPION, roll_back_champion

    if settings.serving.deployer == "local":
        live = _deploy(settings, PREVIOUS_CHAMPION)
    else:
        from serving.deployer import http_smoke_test, registry_model, rollback

        previous = registry_model(settings.mlflow.tracking_uri, settings.mlflow.registered_model, PREVIOUS_CHAMPION)
        if previous is None:
            raise LookupError(f"{settings.mlflow.registered_model} has no {PREVIOUS_CHAMPION} to roll back to")
        result = rollback(settings, previous, http_smoke_test(example_records(settings)))
        if not result.ok:
            raise RuntimeError(f"rollback to v{previous.version} failed: {result.summary()}")
        live = {"deployer": "inferenceservice", "version": previous.version, "outcome": result.outcome,
                "live": f"{previous.name} v{result.live_version}", "url": result.url or "", "detail": result.summary()}
    champion, abandoned = roll_back_champion(settings.mlflow.tracking_uri, settings.mlflow.registered_model)
    live["detail"] += f"; registry: v{champion} is the champion again, v{abandoned} is tagged rolled_back"
    return live
