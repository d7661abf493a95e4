"""Everything a fleet builder may read about one environment on one cluster.

Built from the env's Settings by `pipelines/gitops.py` (layer 5); the builders in this package
take only this, so they stay below the config layer and are testable with a hand-made context.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from specs import (
    ClusterSpec,
    DeploySpec,
    FleetSpec,
    MonitoringSpec,
    RetrainingSpec,
    ServingSpec,
    TrainingSpec,
    TuningSpec,
)

MONITOR = "flywheel-monitor"  # the monitor service's Deployment, Service, ServiceAccount and config
MONITOR_PORT = 8080  # /events, /ground_truth, /alerts and /metrics (monitoring/service.py)
PIPELINE_RUNNER = "flywheel-pipeline-runner"  # the ServiceAccount of the pipeline run's pods (manifests/base)
MODEL_URI_PLACEHOLDER = "s3://set-by-the-deploy-step/model"  # the InferenceService's storageUri in the tree


@dataclass(frozen=True)
class Endpoint:
    """A service the lifecycle's pods call, parsed from a config URI (for egress rules)."""

    key: str  # the config key it came from, e.g. "mlflow.tracking_uri"
    host: str
    port: int
    in_cluster: bool  # a *.svc[.cluster.local] name: reachable by namespace selector, not an IP block


@dataclass(frozen=True)
class FleetContext:
    env: str
    namespace: str
    image: str  # the env's image reference (repository@digest or repository:tag)
    cluster: ClusterSpec
    fleet: FleetSpec  # auth, queue and pod security of the env (fleet.clusters lists every cluster)
    serving: ServingSpec
    training: TrainingSpec
    tuning: TuningSpec
    retraining: RetrainingSpec
    monitoring: MonitoringSpec
    model_name: str
    deploy: DeploySpec  # what `flywheel deploy` would render, with MODEL_URI_PLACEHOLDER as the model
    monitor_config: dict  # pipelines.arguments.monitor_config(settings): the monitor service's --config file
    endpoints: tuple[Endpoint, ...] = field(default=())  # MLflow, KFP, the object store
    kfp_task_cpu: str = "1"  # kfp.task_cpu: each pipeline task pod's limit (the namespace quota counts them)
    kfp_task_memory: str = "2G"  # kfp.task_memory
    labels: dict[str, str] = field(default_factory=dict)  # common labels: app.kubernetes.io/part-of, flywheel/env
    shadow: bool = False  # evaluation.shadow set: a challenger InferenceService may serve beside the champion

    def runs(self, part: str) -> bool:
        """True when this cluster runs `part` (training, serving or monitoring)."""
        return part in self.cluster.runs
