"""Environments as data: `config/base.yaml` deep-merged with `config/<env>.yaml`, validated.

Every `config/<name>.yaml` other than `base.yaml` is an environment. Errors name the file that set
the bad key, the key path and what is allowed, all of a file's mistakes at once.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, model_validator

from specs import (
    DatasetSpec,
    EvaluationSpec,
    MonitoringSpec,
    RetrainingSpec,
    ServingSpec,
    Strict,
    TrackingSpec,
    TrainingSpec,
    TuningSpec,
)

CONFIG_DIR = Path(os.environ.get("FLYWHEEL_CONFIG_DIR") or Path(__file__).resolve().parent.parent / "config")
BASE_FILE = "base.yaml"


class ConfigError(ValueError):
    """A config file is missing, unreadable or invalid; the message says where and why."""


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
    host: str | None = Field(None, description="KFP API endpoint; null for the embedded environment (kfp.local)")
    experiment: str
    namespace: str | None = None
    pipeline_root: str | None = Field(None, description="object store for artifacts, e.g. s3://bucket/pipelines")
    object_store_endpoint: str | None = Field(
        None, description="S3 API endpoint for pipeline_root when it is not AWS (MinIO, Ceph): AWS_ENDPOINT_URL "
                          "for tasks and training pods")
    service_account: str | None = Field(
        None, description="ServiceAccount the run's task pods use (manifests/ grants it training-job rights)")
    task_cpu: str = Field("1", description="CPU limit of each pipeline task's pod")
    task_memory: str = Field("2G", description="memory limit of each pipeline task's pod")


class Settings(Strict):
    """One environment's whole configuration."""

    env: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$")]
    namespace: str
    image: Image
    kfp: Kfp
    mlflow: TrackingSpec
    dataset: DatasetSpec
    training: TrainingSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    tuning: TuningSpec = TuningSpec()
    serving: ServingSpec = ServingSpec()
    monitoring: MonitoringSpec = MonitoringSpec()
    retraining: RetrainingSpec = RetrainingSpec()

    @property
    def embedded(self) -> bool:
        """True for an environment that runs on this machine (kfp.local), not on a cluster."""
        return self.kfp.host is None

    @model_validator(mode="after")
    def _consistent(self):
        for key, uri in (("kfp.host", self.kfp.host), ("kfp.pipeline_root", self.kfp.pipeline_root),
                         ("kfp.object_store_endpoint", self.kfp.object_store_endpoint),
                         ("mlflow.tracking_uri", self.mlflow.tracking_uri), ("dataset.uri", self.dataset.uri),
                         ("monitoring.sink.url", self.monitoring.sink.url),
                         ("monitoring.sink.root", self.monitoring.sink.root),
                         ("serving.payload_logging.url", self.serving.payload_logging.url)):
            if uri and "://" in uri and (urlsplit(uri).username or urlsplit(uri).password):
                raise ValueError(f"{key} embeds credentials; config and compiled pipelines must not hold secrets "
                                 "(use the namespace secret or MLFLOW_TRACKING_TOKEN)")
        if self.training.on_cluster and "://" not in (self.kfp.pipeline_root or ""):
            raise ValueError(f"training.backend {self.training.backend!r} needs kfp.pipeline_root on an object store "
                             "(s3://, minio://, gs://): training pods cannot see the pipeline task's disk")
        if self.training.on_cluster and self.embedded:
            raise ValueError(f"training.backend {self.training.backend!r} runs on a cluster: set kfp.host, or use "
                             "'torchrun' for an environment that runs on this machine")
        if not self.training.on_cluster and not self.embedded:
            raise ValueError("training.backend 'torchrun' trains on this machine, but kfp.host sends the pipeline to "
                             "a cluster; use 'pytorchjob' or 'trainjob'")
        if not self.embedded and "://" not in self.monitoring.sink.root:
            raise ValueError(f"monitoring.sink.root {self.monitoring.sink.root!r} is a local path, but a cluster's "
                             "monitoring tasks and the monitor service run in separate pods: use an object store "
                             "(s3://bucket/monitoring)")
        if (self.serving.deployer == "local") != self.embedded:
            fits = "local (no kfp.host: this machine)" if self.embedded else "inferenceservice (kfp.host: a cluster)"
            raise ValueError(f"serving.deployer {self.serving.deployer!r} does not fit this environment; use {fits}")
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
        if ((isinstance(data, dict) and part in data)
                or (isinstance(data, list) and isinstance(part, int) and part < len(data))):
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


def environments(config_dir: Path | str | None = None) -> list[str]:
    """Every `<name>.yaml` beside base.yaml is an environment, sorted by name."""
    config_dir = Path(config_dir or CONFIG_DIR)
    return sorted(p.stem for p in config_dir.glob("*.yaml") if p.name != BASE_FILE)


def load_settings(env: str, config_dir: Path | str | None = None, overrides: dict | None = None) -> Settings:
    """Merge base.yaml and <env>.yaml (and optional overrides), then validate."""
    config_dir = Path(config_dir or CONFIG_DIR)
    known = environments(config_dir)
    if env not in known:
        raise ConfigError(f"unknown environment {env!r}: no {config_dir / (env + '.yaml')}; "
                          f"environments: {', '.join(known) or 'none'}")
    sources = [(config_dir / BASE_FILE, _read_yaml(config_dir / BASE_FILE))]
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
    sink = settings.monitoring.sink
    if "://" not in sink.root and not os.path.isabs(sink.root):
        resolved = sink.model_copy(update={"root": str((root / sink.root).resolve())})
        updates["monitoring"] = settings.monitoring.model_copy(update={"sink": resolved})
    return settings.model_copy(update=updates) if updates else settings


def load_all(config_dir: Path | str | None = None) -> dict[str, Settings]:
    return {env: load_settings(env, config_dir) for env in environments(config_dir)}
