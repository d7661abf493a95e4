"""Settings to what the pipelines and the gateways receive, in one place: each pipeline's parameter
values (its compiled defaults), the specs the train and deploy tasks get, the stored pipelines'
names, the KFP target runs are started at, and the retraining trigger's rendered config.

Plain functions of `Settings`; nothing here compiles or talks to a server, so every other module
of `pipelines/` may import it without a circle.
"""
from __future__ import annotations

from pathlib import Path

from fleet.queues import LOCAL_QUEUE
from gateways.kfp_api import KfpTarget
from pipelines.config import CONFIG_DIR, Settings
from specs import DeploySpec, TrainSpec

TRAINING = "training"
MONITORING = "monitoring"


def without_none(value):
    """KFP parameters are protobuf Values, which have no null: drop unset keys at any depth."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value if v is not None]
    return value


def as_parameter(model) -> dict:
    """A config section as a STRUCT parameter (KFP structs cannot hold null: unset keys are omitted)."""
    return model.model_dump(mode="json", exclude_none=True)


def train_spec(settings: Settings) -> TrainSpec:
    """What the train task (and `flywheel train`) receives: the env's training section plus where
    its jobs run and stage their outputs."""
    return TrainSpec.model_validate({
        **settings.training.model_dump(), "image": settings.image.ref, "namespace": settings.namespace,
        "env": settings.env, "object_store_endpoint": settings.kfp.object_store_endpoint,
        "staging_uri": f"{settings.kfp.pipeline_root or 'runs'}/flywheel-jobs",
        "queue_name": _queue_name(settings),
    })


def _queue_name(settings: Settings) -> str | None:
    """The Kueue LocalQueue a cluster env's training jobs wait in (fleet/queues.py renders it);
    None on this machine or with fleet.queue.enabled false (jobs then start at once)."""
    if settings.embedded or not settings.training.on_cluster or not settings.fleet.queue.enabled:
        return None
    return LOCAL_QUEUE


def deploy_spec(settings: Settings) -> DeploySpec:
    """What the deploy task (and `flywheel deploy`) receives: the env's serving section plus where
    the model is served."""
    return DeploySpec(serving=settings.serving, model_name=settings.mlflow.registered_model, image=settings.image.ref,
                      namespace=settings.namespace, env=settings.env,
                      object_store_endpoint=settings.kfp.object_store_endpoint,
                      decision_threshold=settings.evaluation.decision_threshold)


def kfp_pipeline_name(settings: Settings, pipeline: str) -> str:
    """The stored KFP pipeline of the env: `flywheel-<env>-<pipeline>`."""
    return f"flywheel-{settings.env}-{pipeline}"


def kfp_target(settings: Settings, pipeline: str = TRAINING) -> KfpTarget | None:
    """Where the env's runs of PIPELINE start (None on this machine: no KFP host)."""
    if not settings.kfp.host:
        return None
    return KfpTarget(host=settings.kfp.host, experiment=settings.kfp.experiment,
                     pipeline=kfp_pipeline_name(settings, pipeline), namespace=settings.kfp.namespace,
                     pipeline_root=settings.kfp.pipeline_root, service_account=settings.kfp.service_account)


def kfp_target_parameter(settings: Settings) -> dict:
    """The training pipeline's target as the monitoring pipeline's STRUCT parameter (no nulls;
    no host on this machine, where the trigger op is compiled but never runs)."""
    target = {"host": settings.kfp.host, "experiment": settings.kfp.experiment,
              "pipeline": kfp_pipeline_name(settings, TRAINING), "namespace": settings.kfp.namespace,
              "pipeline_root": settings.kfp.pipeline_root, "service_account": settings.kfp.service_account}
    return {k: v for k, v in target.items() if v is not None}


def _suite(settings: Settings, config_dir: Path | None) -> dict:
    from stages.validation import load_suite

    return without_none(load_suite(settings.dataset, config_dir or CONFIG_DIR))


def training_arguments(settings: Settings, config_dir: Path | None = None) -> dict:
    """The training pipeline's parameter values for an environment (see `check`)."""
    return {
        "env": settings.env,
        "dataset_spec": as_parameter(settings.dataset),
        "suite": _suite(settings, config_dir),
        "train_spec": as_parameter(train_spec(settings)),
        "tuning_spec": as_parameter(settings.tuning),
        "evaluation_spec": as_parameter(settings.evaluation),
        "tracking": as_parameter(settings.mlflow),
        "deploy_spec": as_parameter(deploy_spec(settings)),
    }


def monitoring_arguments(settings: Settings, config_dir: Path | None = None) -> dict:
    """The monitoring pipeline's parameter values for an environment (see `check`)."""
    return {
        "env": settings.env,
        "tracking": as_parameter(settings.mlflow),
        "dataset_spec": as_parameter(settings.dataset),
        "suite": _suite(settings, config_dir),
        "monitoring_spec": as_parameter(settings.monitoring),
        "retraining_spec": as_parameter(settings.retraining),
        "kfp_target": kfp_target_parameter(settings),
    }


def monitor_config(settings: Settings) -> dict:
    """The monitor service's one config file (`python -m monitoring.service --config FILE`): the
    sink's settings and what `monitoring.trigger.trigger_from_file` reads, the env's retraining
    trigger. No secrets: credentials come from the pod (the KFP ServiceAccount token, the object
    store's secret)."""
    target = kfp_target(settings)
    return {"env": settings.env, "sink": settings.monitoring.sink.model_dump(mode="json"),
            "retraining": as_parameter(settings.retraining), "kfp": target.as_dict() if target else None,
            "sink_root": settings.monitoring.sink.root, "tracking": as_parameter(settings.mlflow)}


def scoring_arguments(settings: Settings, config_dir: Path | None = None) -> dict:
    """The batch scoring pipeline's parameter values for an environment (see `check`): the input
    defaults to the env's file dataset, the output to `<pipeline root>/scoring/predictions.parquet`;
    `flywheel score --data --out` overrides both."""
    return {
        "env": settings.env,
        "tracking": as_parameter(settings.mlflow),
        "dataset_spec": as_parameter(settings.dataset),
        "suite": _suite(settings, config_dir),
        "scoring_spec": as_parameter(settings.scoring),
        "monitoring_spec": as_parameter(settings.monitoring),
        "decision_threshold": settings.evaluation.decision_threshold,
        "data_uri": settings.dataset.uri if settings.dataset.source == "file" and settings.dataset.uri else "",
        "out_uri": f"{settings.kfp.pipeline_root or 'runs'}/scoring/predictions.parquet",
    }
