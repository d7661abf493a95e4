"""Deploy a promoted model with the deployer `serving.deployer` names: served on this machine's
loopback by `serving.local`, or as an InferenceService by `serving.deployer`. Either way a real
prediction (v1 and v2 through the transformer) is the smoke test, and the result says what is live."""
from __future__ import annotations

import tempfile
from pathlib import Path

from specs import DeploySpec


def deploy_model(spec: DeploySpec, model_dir: str, version: str, model_uri: str | None, records: list[dict],
                 log_dir: str | None = None) -> dict:
    """Serve `model_dir` (registered as `version`; `model_uri` is where a cluster's storage
    initializer finds it) and smoke-test it with `records`. Returns {deployer, version, outcome,
    live, url, detail}; raises when the model could not be served."""
    if spec.serving.deployer == "local":
        return _local(spec, model_dir, version, records, log_dir)
    return _inferenceservice(spec, version, model_uri, records)


def _local(spec: DeploySpec, model_dir: str, version: str, records: list[dict], log_dir: str | None) -> dict:
    from serving.local import LocalServing, smoke_test

    with tempfile.TemporaryDirectory() as scratch:
        logs = Path(log_dir or scratch)
        with LocalServing(model_dir, spec.model_name, spec.serving, logs,
                          decision_threshold=spec.decision_threshold, model_version=version) as serving:
            answers = smoke_test(serving, records)
            url = serving.url
    predictions = answers["v1"]["predictions"]
    return {"deployer": "local", "version": version, "outcome": "served", "live": f"{spec.model_name} v{version}",
            "url": url, "detail": f"smoke test passed on loopback (v1 and v2, {len(predictions)} rows); "
                                  f"`flywheel serve --env {spec.env}` keeps the champion up"}


def _inferenceservice(spec: DeploySpec, version: str, model_uri: str | None, records: list[dict]) -> dict:
    from serving.deployer import InferenceServiceDeployer, http_smoke_test
    from serving.inferenceservice import ServedModel, render

    if not model_uri:
        raise ValueError("an InferenceService needs the model's storage URI (the registered version's model_dir)")
    model = ServedModel(spec.model_name, version, model_uri)
    isvc = render(spec.serving, image=spec.image, namespace=spec.namespace, env=spec.env, model=model,
                  object_store_endpoint=spec.object_store_endpoint, decision_threshold=spec.decision_threshold)
    deployer = InferenceServiceDeployer(spec.namespace, timeout=spec.serving.ready_timeout_seconds)
    result = deployer.deploy(isvc, http_smoke_test(records))
    if not result.ok:
        raise RuntimeError(f"deploy of {spec.model_name} v{version} failed: {result.summary()}")
    return {"deployer": "inferenceservice", "version": version, "outcome": result.outcome,
            "live": f"{spec.model_name} v{result.live_version}", "url": result.url or "", "detail": result.summary()}
