"""Deploy a promoted model with the deployer the `serving.deployer` setting names: served on this
machine's loopback by `deployment.loopback`, or as an InferenceService rolled out by
`deployment.rollout`. Either way a real prediction is the smoke test, and the result says what is
live. This is the one place that knows the deployers' names: callers pass a DeploySpec (or, for
`plan`/`deploy`/`rollback`, a pipelines.config Settings) and get the same result.

    deploy_model(spec, model_dir, version, records, tracking_uri=...)   serve `version`, smoke-tested
    roll_back_model(spec, version, records, tracking_uri=...)           serve the previous champion again
    plan_model(spec, version, tracking_uri)                             what a deploy would apply (--dry-run)
    plan_model(spec, version, model_uri=URI)                            the same, offline: no registry
    plan / deploy / rollback (settings, ServedModel)                    the InferenceService path itself
    registry_model(tracking_uri, name, alias)                           champion / previous-champion from MLflow
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from deployment.inferenceservice import ServedModel, render, render_for, validate_inferenceservice
from deployment.rollout import InferenceServiceDeployer, Rollout
from deployment.smoke import SmokeTest, http_smoke_test
from specs import DeploySpec

LOCAL, INFERENCESERVICE = "local", "inferenceservice"
UNVERSIONED = "unversioned"  # the version a dry run shows for a model directory named by URI alone


def deploy_model(spec: DeploySpec, model_dir: str | None, version: str, records: list[dict], *,
                 tracking_uri: str | None = None, log_dir: str | None = None, ingress: str | None = None,
                 **options) -> dict:
    """Serve registered version `version` of `spec.model_name` and smoke-test it with `records`.

    Where the model comes from is the deployer's business: locally, `model_dir` (or, when None, the
    version's model directory downloaded from the registry at `tracking_uri`); as an
    InferenceService, the version's storage URI in the registry at `tracking_uri`, where the
    cluster's storage initializer finds it (`model_dir` is not used). `ingress` and `options`
    (client_configuration, timeout, poll_interval, log) are the InferenceService deployer's.
    Returns {deployer, version, outcome, live, url, detail}; raises when the model could not be served."""
    if _deployer_name(spec) == LOCAL:
        if model_dir is not None:
            return _local(spec, model_dir, version, records, log_dir)
        from stages.versions import download_model_dir

        with tempfile.TemporaryDirectory(prefix="flywheel-deploy-") as tmp:
            local_dir = download_model_dir(_required(tracking_uri), spec.model_name, version, tmp)
            return _local(spec, local_dir, version, records, log_dir)
    result = deploy(spec, _served_model(spec, version, tracking_uri), http_smoke_test(records, ingress=ingress),
                    **options)
    return _cluster_result(spec, version, result, "deploy")


def roll_back_model(spec: DeploySpec, version: str, records: list[dict], *, tracking_uri: str,
                    ingress: str | None = None, **options) -> dict:
    """Serve `version` (the registry's previous champion) again, smoke-tested: locally as any
    deploy; on a cluster at once, no canary (the live model is the one being abandoned).
    The registry's aliases are the caller's to move."""
    if _deployer_name(spec) == LOCAL:
        return deploy_model(spec, None, version, records, tracking_uri=tracking_uri)
    result = rollback(spec, _served_model(spec, version, tracking_uri), http_smoke_test(records, ingress=ingress),
                      **options)
    return _cluster_result(spec, version, result, "rollback")


def plan_model(spec: DeploySpec, version: str, tracking_uri: str | None = None, *,
               model_uri: str | None = None) -> dict:
    """The validated InferenceService `deploy_model` would apply for `version`, as a dict; a local
    deployer has nothing to print (ValueError). With `model_uri` (the storage URI of a Flywheel
    model directory) nothing asks the registry: the object renders offline."""
    if _deployer_name(spec) == LOCAL:
        raise ValueError(f"env {spec.env!r} serves on this machine (serving.deployer local): nothing to print; "
                         f"`flywheel serve --env {spec.env}` serves the champion")
    if model_uri is not None:
        return plan(spec, ServedModel(spec.model_name, version, model_uri))
    return plan(spec, _served_model(spec, version, tracking_uri))


def _deployer_name(spec: DeploySpec) -> str:
    name = spec.serving.deployer
    if name not in (LOCAL, INFERENCESERVICE):
        raise ValueError(f"unknown serving.deployer {name!r}: {LOCAL} or {INFERENCESERVICE}")
    return name


def _required(tracking_uri: str | None) -> str:
    if not tracking_uri:
        raise ValueError("the registry's tracking_uri is needed to find the registered version's model directory")
    return tracking_uri


def _served_model(spec: DeploySpec, version: str, tracking_uri: str | None):
    """The version as an InferenceService serves it: its model directory's storage URI in the registry."""
    from stages import versions

    return ServedModel(spec.model_name, version, versions.model_dir_uri(_required(tracking_uri), spec.model_name,
                                                                       version))


def _cluster_result(spec: DeploySpec, version: str, result, action: str) -> dict:
    if not result.ok:
        verb = "rollback to" if action == "rollback" else "deploy of"
        raise RuntimeError(f"{verb} {spec.model_name} v{version} failed: {result.summary()}")
    return {"deployer": INFERENCESERVICE, "version": version, "outcome": result.outcome,
            "live": f"{spec.model_name} v{result.live_version}", "url": result.url or "", "detail": result.summary()}


def _local(spec: DeploySpec, model_dir: str, version: str, records: list[dict], log_dir: str | None) -> dict:
    from deployment.loopback import LocalServing, smoke_test

    with tempfile.TemporaryDirectory() as scratch:
        logs = Path(log_dir or scratch)
        with LocalServing(model_dir, spec.model_name, spec.serving, logs,
                          decision_threshold=spec.decision_threshold, model_version=version) as serving:
            answers = smoke_test(serving, records)
            url = serving.url
    predictions = answers["v1"]["predictions"]
    return {"deployer": LOCAL, "version": version, "outcome": "served", "live": f"{spec.model_name} v{version}",
            "url": url, "detail": f"smoke test passed on loopback (v1 and v2, {len(predictions)} rows); "
                                  f"`flywheel serve --env {spec.env}` keeps the champion up",
            # what a client sent and got back: `flywheel run` shows it instead of serving the model again
            "smoke": {"records": records, **answers}}


# --- the InferenceService path ---------------------------------------------------------------


def _render(settings, model: ServedModel, *, canary: bool = True):
    """`render_for(settings, ...)`; a `specs.DeploySpec` (what the deploy task receives) carries
    the same pieces under its own names and renders through `render` directly."""
    if isinstance(settings, DeploySpec):
        return render(settings.serving, image=settings.image, namespace=settings.namespace, env=settings.env,
                      model=model, object_store_endpoint=settings.object_store_endpoint, canary=canary,
                      decision_threshold=settings.decision_threshold)
    return render_for(settings, model, canary=canary)


def plan(settings, model: ServedModel, *, canary: bool = True) -> dict:
    """The validated InferenceService `deploy` would apply for `settings` (a pipelines.config
    Settings, or a specs.DeploySpec), as a dict: print it for --dry-run. Raises InferenceServiceInvalid."""
    return validate_inferenceservice(_render(settings, model, canary=canary))


def _deployer(settings, options: dict) -> InferenceServiceDeployer:
    options.setdefault("timeout", settings.serving.ready_timeout_seconds)
    return InferenceServiceDeployer(settings.namespace, **options)


def deploy(settings, model: ServedModel, smoke_test: SmokeTest | None = None, **options) -> Rollout:
    """Serve `model` in `settings`' environment: create, or roll out (canary in Knative mode with
    canary_percent > 0, else a rolling update), smoke-test, promote or roll back. `options` go to
    InferenceServiceDeployer (client, client_configuration, timeout, poll_interval, log)."""
    return _deployer(settings, options).deploy(_render(settings, model), smoke_test)


def rollback(settings, previous: ServedModel, smoke_test: SmokeTest | None = None, **options) -> Rollout:
    """Serve `previous` (the registry's previous champion) again, at once: no canary, since the
    live model is the one being abandoned. A failed smoke test is reported, not undone."""
    deployer = _deployer(settings, options)
    result = deployer.deploy(_render(settings, previous, canary=False), smoke_test, canary=False, revert=False)
    if result.outcome == "updated":
        result.outcome = "rolled_back"
    return result


def registry_model(tracking_uri: str, registered_model: str, alias: str | None = None) -> ServedModel | None:
    """The model version behind `alias` (default `champion`; `previous-champion` for a rollback)
    and the storage URI of the flywheel model directory inside it, or None when there is none."""
    from stages import versions

    version = versions.version_behind(tracking_uri, registered_model, alias or versions.CHAMPION)
    if version is None:
        return None
    return ServedModel(registered_model, version, versions.model_dir_uri(tracking_uri, registered_model, version))
