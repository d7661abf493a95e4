"""Environments as data: `config/base.yaml` deep-merged with `config/<env>.yaml`, validated.

Errors name the file that set the bad key, the key path and what is allowed.
"""
from __future__ import annotations

import os
from urllib.parse import urlsplit
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(os.environ.get("FLYWHEEL_CONFIG_DIR") or Path(__file__).resolve().parent.parent / "config")
ENVIRONMENTS = ("local", "dev", "staging", "prod")


class ConfigError(ValueError):
    """A config file is missing, unreadable or invalid; the message says where and why."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Image(Strict):
    repository: str
    tag: str | None = None
    digest: Annotated[str | None, Field(pattern=r"^sha256:[0-9a-f]{64}$")] = None

    @model_validator(mode="after")
    def _tag_or_digest(self):
        if not (self.tag or self.digest):
            raise ValueError("set image.tag or image.digest")
        return self

    @property
    def ref(self) -> str:
        return f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"


class Kfp(Strict):
    host: str | None = Field(None, description="KFP API endpoint; None on the local environment")
    experiment: str
    namespace: str | None = None
    pipeline_root: str | None = Field(None, description="object store for artifacts, e.g. s3://bucket/pipelines")
    object_store_endpoint: str | None = Field(
        None, description="S3 API endpoint for pipeline_root when it is not AWS (MinIO, Ceph): AWS_ENDPOINT_URL "
                          "for tasks and training pods")
    service_account: str | None = Field(
        None, description="ServiceAccount the run's task pods use (manifests/ grants it PyTorchJob rights)")
    task_cpu: str = Field("1", description="CPU limit of each pipeline task's pod")
    task_memory: str = Field("2G", description="memory limit of each pipeline task's pod")


class Tracking(Strict):
    tracking_uri: str
    experiment: str
    registered_model: str


class Drift(Strict):
    income_scale: float = 1.0
    utilization_shift: float = 0.0
    late_payment_rate: float = 1.0
    unemployment_boost: Annotated[float, Field(ge=0.0)] = 0.0
    missing_rate_scale: Annotated[float, Field(ge=0.0)] = 1.0


class Features(Strict):
    numeric: list[str]
    categorical: list[str] = []


class Dataset(Strict):
    source: Literal["reference", "file"]
    uri: str | None = Field(None, description="CSV or Parquet path/URI when source is 'file'")
    rows: Annotated[int, Field(gt=0)] = 20_000
    seed: int = 7
    drift: Drift = Drift()
    target: str
    id_column: str | None = None
    features: Features
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    expectation_suite: str | None = Field(
        "credit_default", description="config/expectations/<name>.yaml; None derives one from the features"
    )

    @model_validator(mode="after")
    def _file_needs_uri(self):
        if self.source == "file" and not self.uri:
            raise ValueError("dataset.source 'file' needs dataset.uri (a .csv or .parquet path or URI)")
        if self.uri and not self.uri.endswith((".csv", ".csv.gz", ".parquet", ".pq")):
            raise ValueError(f"dataset.uri {self.uri!r} must end in .csv, .csv.gz or .parquet")
        overlap = set(self.features.numeric) & set(self.features.categorical)
        if overlap:
            raise ValueError(f"columns listed as both numeric and categorical: {sorted(overlap)}")
        if self.target in self.features.numeric + self.features.categorical:
            raise ValueError(f"target {self.target!r} is also listed as a feature")
        return self


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
    cpu: str = "1"
    memory: str = "2Gi"
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


class Training(Strict):
    backend: Literal["torchrun", "pytorchjob"]
    workers: Annotated[int, Field(ge=1)] = Field(2, description="torchrun processes, or PyTorchJob replicas (master + workers)")
    resources: Resources = Resources()
    tolerations: list[Toleration] = []
    elastic: Elastic = Elastic()
    active_deadline_seconds: Annotated[int, Field(gt=0)] = 3600
    backoff_limit: Annotated[int, Field(ge=0)] = 3
    checkpoint_every_epochs: Annotated[int, Field(ge=1)] = 1
    keep_job: Literal["always", "on_failure", "never"] = "on_failure"
    hyperparameters: Hyperparameters = Hyperparameters()


class TrainSpec(Training):
    """What the train task receives: the env's training section plus where the job runs."""

    image: str
    namespace: str
    env: str = "local"
    object_store_endpoint: str | None = None
    staging_uri: str = Field(description="object-store prefix for PyTorchJob outputs before they become KFP artifacts")


class Thresholds(Strict):
    roc_auc: Annotated[float, Field(ge=0.0, le=1.0)] = 0.70
    pr_auc: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    f1: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    brier: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0


class Evaluation(Strict):
    thresholds: Thresholds = Thresholds()
    decision_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    slice_column: str | None = None
    promotion_margin: Annotated[float, Field(ge=0.0)] = 0.002


SearchValue = list[float] | list[int] | list[str]


class Tuning(Strict):
    enabled: bool = True
    strategy: Literal["grid", "random", "successive_halving"] = "random"
    trials: Annotated[int, Field(ge=1)] = 4
    parallelism: Annotated[int, Field(ge=1)] = 2
    epochs_per_trial: Annotated[int, Field(ge=1)] = 3
    search_space: dict[str, SearchValue] = {}

    @field_validator("search_space")
    @classmethod
    def _known_hyperparameters(cls, space):
        allowed = set(Hyperparameters.model_fields) - {"seed"}
        unknown = sorted(set(space) - allowed)
        if unknown:
            raise ValueError(f"unknown hyperparameters {unknown}; allowed: {sorted(allowed)}")
        empty = [k for k, v in space.items() if not v]
        if empty:
            raise ValueError(f"empty search lists for {empty}")
        return space


class Serving(Strict):
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    canary_percent: Annotated[int, Field(ge=0, le=100)] = 0
    cpu: str = "1"
    memory: str = "1Gi"

    @model_validator(mode="after")
    def _replicas(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("serving.max_replicas must be >= serving.min_replicas")
        return self


class Monitoring(Strict):
    psi_threshold: Annotated[float, Field(gt=0.0)] = 0.2
    missing_rate_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    min_roc_auc: Annotated[float, Field(ge=0.0, le=1.0)] = 0.65
    window_rows: Annotated[int, Field(gt=0)] = 5000


CRON = r"^(\S+\s+){4}\S+$"


class Retraining(Strict):
    enabled: bool = False
    schedule: Annotated[str, Field(pattern=CRON, description="5-field cron, e.g. '0 3 * * 1'")] = "0 3 * * 1"
    max_concurrency: Annotated[int, Field(ge=1, le=10)] = Field(1, description="KFP allows 1-10 concurrent runs")


class Settings(Strict):
    """One environment's whole configuration."""

    env: Literal["local", "dev", "staging", "prod"]
    namespace: str
    image: Image
    kfp: Kfp
    mlflow: Tracking
    dataset: Dataset
    training: Training
    evaluation: Evaluation = Evaluation()
    tuning: Tuning = Tuning()
    serving: Serving = Serving()
    monitoring: Monitoring = Monitoring()
    retraining: Retraining = Retraining()

    @model_validator(mode="after")
    def _consistent(self):
        for key, uri in (("kfp.host", self.kfp.host), ("kfp.pipeline_root", self.kfp.pipeline_root),
                         ("kfp.object_store_endpoint", self.kfp.object_store_endpoint),
                         ("mlflow.tracking_uri", self.mlflow.tracking_uri), ("dataset.uri", self.dataset.uri)):
            if uri and "://" in uri and (urlsplit(uri).username or urlsplit(uri).password):
                raise ValueError(f"{key} embeds credentials; config and compiled pipelines must not hold secrets "
                                 "(use the namespace secret or MLFLOW_TRACKING_TOKEN)")
        if self.training.backend == "pytorchjob" and "://" not in (self.kfp.pipeline_root or ""):
            raise ValueError("training.backend 'pytorchjob' needs kfp.pipeline_root on an object store "
                             "(s3://, minio://, gs://): training pods cannot see the pipeline task's disk")
        if self.env != "local" and self.training.backend == "torchrun":
            raise ValueError("training.backend 'torchrun' is only for the local environment; use 'pytorchjob'")
        if self.env != "local" and not self.kfp.host:
            raise ValueError("kfp.host is required outside the local environment")
        if self.training.elastic.max_replicas < self.training.elastic.min_replicas:
            raise ValueError("training.elastic.max_replicas must be >= training.elastic.min_replicas")
        return self


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _sets_key(data: Any, loc: tuple) -> bool:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return False
    return True


def _describe(err: dict, sources: list[tuple[Path, dict]]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list["))))
    key = ".".join(str(p) for p in loc) or "(top level)"
    # The file that set the key last is the one to fix; if no file sets it, it is missing from all.
    origin = next((path for path, data in reversed(sources) if _sets_key(data, loc)), sources[-1][0])
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "literal_error":
        message = f"got {err.get('input')!r}; allowed: {err['ctx']['expected']}"
    elif err["type"] == "missing":
        message = "required key is missing"
    return f"{origin}: {key}: {message}"


def load_settings(env: str, config_dir: Path | str | None = None, overrides: dict | None = None) -> Settings:
    """Merge base.yaml and <env>.yaml (and optional overrides), then validate."""
    config_dir = Path(config_dir or CONFIG_DIR)
    if env not in ENVIRONMENTS:
        raise ConfigError(f"unknown environment {env!r}; allowed: {', '.join(ENVIRONMENTS)}")
    sources = [(config_dir / "base.yaml", _read_yaml(config_dir / "base.yaml"))]
    sources.append((config_dir / f"{env}.yaml", _read_yaml(config_dir / f"{env}.yaml")))
    if overrides:
        sources.append((Path("<overrides>"), overrides))
    merged: dict = {"env": env}
    for _, data in sources:
        merged = deep_merge(merged, data)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as err:
        raise ConfigError("\n".join(_describe(e, sources) for e in err.errors())) from None
    return _resolve_local_paths(settings, config_dir.parent)


def _resolve_local_paths(settings: Settings, root: Path) -> Settings:
    """Relative local paths in config are relative to the project root, whatever the cwd."""
    updates = {}
    uri = settings.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = (root / uri.removeprefix("sqlite:///")).resolve()
        updates["mlflow"] = settings.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{path}"})
    data_uri = settings.dataset.uri
    if data_uri and "://" not in data_uri and not os.path.isabs(data_uri):
        updates["dataset"] = settings.dataset.model_copy(update={"uri": str((root / data_uri).resolve())})
    return settings.model_copy(update=updates) if updates else settings


def load_all(config_dir: Path | str | None = None) -> dict[str, Settings]:
    return {env: load_settings(env, config_dir) for env in ENVIRONMENTS}
