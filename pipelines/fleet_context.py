"""Settings -> one FleetContext per cluster of an environment (what fleet/ builders read)."""
from __future__ import annotations

from urllib.parse import urlsplit

from fleet.context import MODEL_URI_PLACEHOLDER, Endpoint, FleetContext
from pipelines.arguments import deploy_spec, monitor_config
from pipelines.config import Settings

_DEFAULT_PORTS = {"http": 80, "https": 443, "s3": 443, "minio": 9000, "gs": 443}


def _endpoint(key: str, uri: str | None) -> Endpoint | None:
    if not uri or "://" not in uri:
        return None
    parts = urlsplit(uri)
    if parts.scheme in ("s3", "gs", "minio"):
        return None  # a bucket, not a host: the object store's endpoint is kfp.object_store_endpoint
    host = parts.hostname or ""
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)
    in_cluster = host.endswith((".svc", ".svc.cluster.local")) or "." not in host
    return Endpoint(key=key, host=host, port=port, in_cluster=in_cluster)


def endpoints(settings: Settings) -> tuple[Endpoint, ...]:
    """The services the lifecycle's pods call, from config: MLflow, KFP and the object store."""
    found = (_endpoint("mlflow.tracking_uri", settings.mlflow.tracking_uri),
             _endpoint("kfp.host", settings.kfp.host),
             _endpoint("kfp.object_store_endpoint", settings.kfp.object_store_endpoint))
    return tuple(e for e in found if e is not None)


def fleet_contexts(settings: Settings) -> list[FleetContext]:
    """One context per cluster of the env, in config order; [] for an embedded env."""
    deploy = deploy_spec(settings)
    common = dict(env=settings.env, namespace=settings.namespace, image=settings.image.ref, fleet=settings.fleet,
                  serving=settings.serving, training=settings.training, tuning=settings.tuning,
                  retraining=settings.retraining, monitoring=settings.monitoring,
                  model_name=settings.mlflow.registered_model, deploy=deploy, monitor_config=monitor_config(settings),
                  endpoints=endpoints(settings), kfp_task_cpu=settings.kfp.task_cpu,
                  kfp_task_memory=settings.kfp.task_memory,
                  labels={"app.kubernetes.io/part-of": "flywheel", "flywheel/env": settings.env},
                  shadow=settings.evaluation.shadow is not None)
    return [FleetContext(cluster=cluster, **common) for cluster in settings.fleet.clusters]


__all__ = ["MODEL_URI_PLACEHOLDER", "endpoints", "fleet_contexts"]
