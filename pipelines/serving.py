"""The champion, wherever an environment serves it: what `flywheel serve`, `deploy` and
`rollback` do with the registry and the env's deployer (through `deployment.deployers`)."""
from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

from pipelines.arguments import deploy_spec
from pipelines.config import Settings

SMOKE_ROWS = 3
SERVE_DIR = Path("runs") / "serve"


def example_records(settings: Settings, version: str | None = None, rows: int = SMOKE_ROWS) -> list[dict]:
    """A few feature rows as a client sends them (JSON records). With `version`: the input example
    registered with it (stages.registry.register_model logs the first test rows with every
    version), so the training data is not read and need not exist any more; otherwise, or for a
    version registered without one, the first rows of the env's dataset."""
    if version is not None:
        from gateways.mlflow_api import Registry
        from storage.endpoints import doing

        name = settings.mlflow.registered_model
        with doing(f"reading the input example of {name} v{version}"):
            example = Registry(settings.mlflow.tracking_uri, name).input_example(version)
        if example is not None:
            return _records(example, settings.dataset.features.columns, rows)
    from stages.dataset import load_dataset

    frame = load_dataset(settings.dataset.model_copy(update={"rows": max(rows, 50)}))
    return _records(frame, settings.dataset.features.columns, rows)


def _records(frame, columns: list[str], rows: int) -> list[dict]:
    columns = [c for c in columns if c in frame.columns]
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
    from deployment.deployers import deploy_model
    from stages.versions import CHAMPION

    version = _version(settings, CHAMPION)
    live = deploy_model(deploy_spec(settings), None, version, example_records(settings, version),
                        tracking_uri=settings.mlflow.tracking_uri)
    return _followed(settings, live, version)


def plan_champion(settings: Settings) -> dict:
    """The InferenceService `deploy_champion` would apply (validated against the CRD)."""
    from deployment.deployers import plan_model
    from stages.versions import CHAMPION

    return plan_model(deploy_spec(settings), _version(settings, CHAMPION), settings.mlflow.tracking_uri)


def roll_back(settings: Settings, to: str | None = None) -> dict:
    """Serve an earlier champion (`to`: the version you name, also a newer one: roll forward),
    smoke-tested first (on a cluster at once, no canary: the live model is the one being
    abandoned), then make it the champion in the registry; a running `flywheel serve` follows.

    Plain rollback serves `previous-champion` and walks the champion history back, never to a
    version tagged `rolled_back` (stages.registry.rollback_target); `to` clears that tag."""
    from deployment.deployers import roll_back_model
    from stages import registry

    uri, name = settings.mlflow.tracking_uri, settings.mlflow.registered_model
    if to is None:
        target, current = registry.rollback_target(uri, name)
    else:
        target, current = registry.check_version(uri, name, to), _version(settings, "champion")
    live = roll_back_model(deploy_spec(settings), target, example_records(settings, target), tracking_uri=uri)
    if to is None:
        previous = registry.roll_back(uri, name, target, current)
        live["detail"] += (f"; registry: v{target} is the champion again, v{current} is tagged rolled_back, "
                           + (f"v{previous} is the previous champion" if previous else "no older champion is left"))
    else:
        registry.promote_version(uri, name, target)
        live["detail"] += (f"; registry: v{target} is the champion" if target != current
                           else f"; registry: v{target} already was the champion") + (
            f", v{current} the previous champion" if target != current else "")
    return _followed(settings, live, target)


def describe(live: dict) -> str:
    """What `deploy` and `rollback` print: what is live, the URL only when something answers there."""
    url = f" {live['url']}" if live.get("url") else ""
    return f"live: {live['live']} ({live['outcome']}){url}\n{live['detail']}"


# ---- a running `flywheel serve`, seen from other commands ---------------------------------------

def state_path(env: str) -> Path:
    """Where a running `flywheel serve --env ENV` says what it serves (relative to the working directory)."""
    return SERVE_DIR / f"{env}.json"


def read_state(env: str) -> dict | None:
    """The state of a `flywheel serve` of `env` whose process is alive, else None."""
    try:
        state = json.loads(state_path(env).read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _followed(settings: Settings, live: dict, version: str) -> dict:
    """A local deploy's servers stop after the smoke test: point at what still answers instead, a
    running `flywheel serve` once it serves `version` (it follows the champion alias), or nothing."""
    if live.get("deployer") != "local":
        return live
    live["url"] = ""
    state = read_state(settings.env)
    if state is None:
        live["detail"] += f"; nothing serves it here now: `flywheel serve --env {settings.env}` does"
        return live
    deadline = time.monotonic() + float(state.get("poll_seconds", 5)) + settings.serving.ready_timeout_seconds + 10
    while time.monotonic() < deadline and state is not None and state.get("version") != version:
        if (state.get("failed") or {}).get("version") == version:
            break
        time.sleep(0.5)
        state = read_state(settings.env)
    if state is not None and state.get("version") == version and _answers(state["url"]):
        live["url"] = state["url"]
        live["detail"] += f"; `flywheel serve` (pid {state['pid']}) now serves v{version} at {state['url']}"
    elif state is None:
        live["detail"] += "; the running `flywheel serve` exited: see runs/serve/*.log"
    else:
        failed = (state.get("failed") or {}).get("error", "it did not switch in time")
        live["detail"] += (f"; the running `flywheel serve` (pid {state['pid']}) still serves v{state.get('version')}: "
                           f"{failed}")
    return live
