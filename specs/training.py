"""How a model is trained: backend, replicas, resources (GPUs or MIG slices), hyperparameters."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from specs.base import Strict
from specs.quantity import Cpu, Memory

BACKENDS = ("torchrun", "pytorchjob", "trainjob")
CLUSTER_BACKENDS = ("pytorchjob", "trainjob")


class Gpu(Strict):
    count: Annotated[int, Field(ge=0)] = 0
    resource: Annotated[str, Field(pattern=r"^nvidia\.com/(gpu|mig-\d+g\.\d+gb)$")] = "nvidia.com/gpu"
    product: str | None = Field(None, description="node selector value for nvidia.com/gpu.product")


class Toleration(Strict):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Resources(Strict):
    cpu: Cpu = "1"
    memory: Memory = "2Gi"
    gpu: Gpu = Gpu()


class Elastic(Strict):
    min_replicas: Annotated[int, Field(ge=1)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    max_restarts: Annotated[int, Field(ge=0)] = 3


class Hyperparameters(Strict):
    epochs: Annotated[int, Field(gt=0)] = 8
    batch_size: Annotated[int, Field(gt=0)] = 256
    learning_rate: Annotated[float, Field(gt=0.0)] = 3e-3
    hidden: Annotated[int, Field(gt=0)] = 64
    depth: Annotated[int, Field(ge=1, le=8)] = 2
    embedding_dim: Annotated[int, Field(gt=0)] = 4
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4
    patience: Annotated[int, Field(ge=1)] = 3
    validation_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    seed: int = 7


class TrainingSpec(Strict):
    backend: Literal["torchrun", "pytorchjob", "trainjob"] = Field(
        description="torchrun on this machine; pytorchjob (Training Operator v1) or trainjob (Kubeflow Trainer v2) "
                    "on a cluster")
    workers: Annotated[int, Field(ge=1)] = Field(2, description="torchrun processes, or job replicas (nodes)")
    runtime: str = Field("torch-distributed",
                         description="trainjob: the ClusterTrainingRuntime the TrainJob references")
    resources: Resources = Resources()
    tolerations: list[Toleration] = []
    elastic: Elastic = Elastic()
    active_deadline_seconds: Annotated[int, Field(gt=0)] = 3600
    backoff_limit: Annotated[int, Field(ge=0)] = 3
    checkpoint_every_epochs: Annotated[int, Field(ge=1)] = 1
    keep_job: Literal["always", "on_failure", "never"] = "on_failure"
    hyperparameters: Hyperparameters = Hyperparameters()

    @model_validator(mode="after")
    def _elastic_range(self):
        if self.elastic.max_replicas < self.elastic.min_replicas:
            raise ValueError("training.elastic.max_replicas must be >= training.elastic.min_replicas")
        return self

    @property
    def on_cluster(self) -> bool:
        return self.backend in CLUSTER_BACKENDS


class TrainSpec(TrainingSpec):
    """What the train task receives: the env's training section plus where the job runs."""

    image: str
    namespace: str
    env: str = "local"
    object_store_endpoint: str | None = None
    staging_uri: str = Field(
        description="object-store prefix for cluster jobs' outputs before they become KFP artifacts")
    queue_name: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="the Kueue LocalQueue cluster jobs wait in (label kueue.x-k8s.io/queue-name); "
                    "null: no queue, the job starts at once")
