"""`flywheel shadow --env ENV start|report|stop`, and the loop's shadow run before promotion.

With `evaluation.shadow` set, the gate registers a winning candidate as the `challenger` (the
champion keeps answering). Then:

- `start`: a running `flywheel serve` (its state file) is told, through `runs/serve/<env>.shadow.json`,
  to serve the challenger as a shadow: its next poll starts the pair and the front mirrors every REST
  inference request to it (`pipelines.local_serve.Follower`, `pipelines.mirror`).
- `report`: the shadow report (`monitoring.shadow`) over the sink's windows, written as HTML + JSON
  under `runs/serve/shadow-<env>/`, with the mirror's counts.
- `stop`: the report; the shadow stops; the challenger becomes the champion when the report passes
  (the running serve swaps to it at its next poll), else says why not (exit 1).

This is the local path. On a cluster env, pipelines/shadow_cluster.py serves the challenger as its
own InferenceService behind the Istio mirror route fleet/shadow.py builds.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines.config import Settings
from pipelines.serving import SERVE_DIR, read_state


def request_path(env: str) -> Path:
    return SERVE_DIR / f"{env}.shadow.json"


def read_request(env: str) -> str | None:
    """The version `flywheel shadow start` asked the running serve to shadow, or None."""
    try:
        return str(json.loads(request_path(env).read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _spec(settings: Settings):
    from specs.evaluation import ShadowSpec

    return settings.evaluation.shadow or ShadowSpec()


def start(settings: Settings, echo: Callable[[str], None] = print, timeout: float | None = None) -> int:
    """Ask the running serve to shadow the challenger; wait until it does (or says why not)."""
    from stages.registry import CHALLENGER
    from stages.versions import version_behind

    env, name = settings.env, settings.mlflow.registered_model
    state = read_state(env)
    if state is None:
        echo(f"no serve running for {env}: start `flywheel serve --env {env}` first")
        return 1
    challenger = version_behind(settings.mlflow.tracking_uri, name, CHALLENGER)
    if challenger is None:
        echo(f"no challenger: {name} has no `challenger` alias (the gate sets it when evaluation.shadow is set)")
        return 1
    request_path(env).parent.mkdir(parents=True, exist_ok=True)
    request_path(env).write_text(json.dumps({"version": challenger, "since": time.time()}))
    deadline = time.monotonic() + (timeout or 3 * state.get("poll_seconds", 5) + settings.serving.ready_timeout_seconds)
    while time.monotonic() < deadline:
        state = read_state(env) or {}
        if (state.get("shadow") or {}).get("version") == challenger:
            echo(f"shadowing {name} v{challenger} behind v{state.get('version')} at {state.get('url')}: "
                 f"`flywheel shadow --env {env} report` compares them")
            return 0
        if (state.get("shadow_failed") or {}).get("version") == challenger:
            echo(f"error: {state['shadow_failed']['error']}")
            return 1
        time.sleep(0.3)
    echo(f"asked the serve to shadow v{challenger}; it has not started it yet (see {SERVE_DIR}/*.log)")
    return 1


def report(settings: Settings, echo: Callable[[str], None] = print):
    """The shadow report of the challenger against the served champion, written and summarised."""
    from monitoring import shadow as shadow_report
    from stages.registry import CHALLENGER
    from stages.versions import CHAMPION, version_behind

    env, name, uri = settings.env, settings.mlflow.registered_model, settings.mlflow.tracking_uri
    state = read_state(env) or {}
    challenger = (state.get("shadow") or {}).get("version") or version_behind(uri, name, CHALLENGER)
    if challenger is None:
        echo(f"no challenger: {name} has no `challenger` alias and no shadow is running")
        return None
    champion = state.get("version") or version_behind(uri, name, CHAMPION)
    result = shadow_report.load(settings.monitoring.sink.root, champion, challenger, _spec(settings))
    html, data = shadow_report.write(result, SERVE_DIR / f"shadow-{env}")
    mirror = (state.get("shadow") or {}).get("mirror") or {}
    echo(f"shadow v{challenger} vs champion v{champion}: {result.summary()}")
    if mirror:
        echo("  mirror: " + ", ".join(f"{k} {v:,}" for k, v in mirror.items()))
    echo(f"  report: {html} ({data})")
    return result


def stop(settings: Settings, echo: Callable[[str], None] = print) -> int:
    """Report, stop the shadow, and promote the challenger when the report passes."""
    result = report(settings, echo)
    request_path(settings.env).unlink(missing_ok=True)  # the serve stops the shadow at its next poll
    return promote_if_passed(settings, result, echo, "resumes", "a running serve swaps to it at its next poll")


def promote_if_passed(settings: Settings, result, echo: Callable[[str], None], again: str, then: str) -> int:
    """`stop`'s end, here and on a cluster: promote the challenger when its shadow report passed (0),
    else say why it stays the challenger (1). `again`: what `start` does then; `then`: what follows."""
    from stages.registry import promote_challenger

    if result is None:
        return 1
    if not result.passed:
        echo(f"not promoted: {'; '.join(result.reasons)}; v{result.challenger_version} stays the challenger "
             f"(`flywheel shadow --env {settings.env} start` {again})")
        return 1
    version, previous = promote_challenger(settings.mlflow.tracking_uri, settings.mlflow.registered_model)
    echo(f"promoted: v{version} is the champion (was v{previous}); {then}")
    return 0


# ---- the loop (`make run`): the retrained challenger shadows the champion before promotion -------

def _send(url: str, model: str, frame, columns: list[str], stamp: str, batch: int = 50) -> list[str]:
    """POST `frame` through the front in batches, 4 clients at a time, each with its request id."""
    from deployment.loopback import post_json

    records = json.loads(frame[columns].to_json(orient="records"))
    ids = [f"loop-shadow-{stamp}-{i}" for i in range(0, len(records), batch)]
    calls = [(ids[k], records[i:i + batch]) for k, i in enumerate(range(0, len(records), batch))]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda call: post_json(f"{url}/v1/models/{model}:predict", {"instances": call[1]}, call[0]),
                      calls))
    return ids


def _ground_truth(root: str, frame, target: str, ids: list[str], batch: int = 50) -> None:
    """The served rows' labels, as they would arrive later: by request id and instance."""
    import pandas as pd

    from monitoring.windows import write_ground_truth

    rows = [{"request_id": ids[i // batch], "instance": i % batch, "truth": str(value)}
            for i, value in enumerate(frame[target].tolist())]
    write_ground_truth(root, pd.DataFrame(rows))


def _measured(root: str, champion: str, challenger: str, spec, labels, expected: int, timeout: float = 20.0):
    from monitoring import shadow as shadow_report

    deadline = time.monotonic() + timeout
    while True:
        result = shadow_report.load(root, champion, challenger, spec, labels)
        if result.rows >= expected or time.monotonic() > deadline:
            return result
        time.sleep(0.3)


def loop_shadow(settings: Settings, champion, champion_version: str, frame, labels, work: Path,
                before: str | None) -> list[tuple[str, str]]:
    """When the retraining run left a new challenger (alias moved from `before`): serve it as a
    shadow beside `champion` (a running LocalServing), send `frame` through a front that mirrors
    to it, join its ground truth, report, and promote it when the report passes."""
    from deployment.loopback import LocalServing, free_port
    from monitoring.shadow import shadow_version, write
    from pipelines.front import Front
    from stages.registry import CHALLENGER, promote_challenger
    from stages.versions import download_model_dir, version_behind

    uri, name, spec = settings.mlflow.tracking_uri, settings.mlflow.registered_model, _spec(settings)
    challenger = version_behind(uri, name, CHALLENGER)
    if challenger is None or challenger == before:
        return []
    model_dir = download_model_dir(uri, name, challenger, str(work / f"challenger-v{challenger}"))
    with LocalServing(model_dir, name, settings.serving, work / "shadow",
                      decision_threshold=settings.evaluation.decision_threshold,
                      model_version=shadow_version(challenger)) as shadow:
        front = Front("127.0.0.1", {"entry_http": free_port()}, http=("entry_http",))
        front.start(champion.ports)
        try:
            front.mirror_to(shadow.ports["entry_http"])
            ids = _send(f"http://127.0.0.1:{front.ports['entry_http']}", name, frame,
                        settings.dataset.features.columns, time.strftime("%H%M%S"))
            _ground_truth(settings.monitoring.sink.root, frame, settings.dataset.target, ids)
            result = _measured(settings.monitoring.sink.root, champion_version, challenger, spec, labels, len(frame))
            counts = front.mirror_to(None)
        finally:
            front.stop()
    html, _ = write(result, work / "shadow-report")
    steps = [("shadow", f"v{challenger} beside champion v{champion_version}: {result.summary()}"),
             ("shadow mirror", ", ".join(f"{k} {v:,}" for k, v in counts.items())), ("shadow report", html)]
    if result.passed:
        version, previous = promote_challenger(uri, name)
        steps.append(("promoted", f"v{version} is the champion (was v{previous}) after its shadow run"))
    else:
        steps.append(("not promoted", f"v{challenger} stays the challenger: {'; '.join(result.reasons)}"))
    return steps
