"""Environments as data: `config/base.yaml` deep-merged with `config/<env>.yaml`, validated.

Every `config/<name>.yaml` other than `base.yaml` is an environment. Errors name the file that set
the bad key, the key path and what is allowed, all of a file's mistakes at once.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, model_validator

from specs import (
    Cpu,
    DatasetSpec,
    EvaluationSpec,
    FleetSpec,
    Memory,
    MonitoringSpec,
    RetrainingSpec,
    ServingSpec,
    Strict,
    TrackingSpec,
    TrainingSpec,
    TuningSpec,
)
from specs.scoring import ScoringSpec

CONFIG_DIR = Path(os.environ.get("FLYWHEEL_CONFIG_DIR") or Path(__file__).resolve().parent.parent / "config")
BASE_FILE = "base.yaml"


class ConfigError(ValueError):
    """A config file is missing, unreadable or invalid; the message says where and why."""


class Image(Strict):
    repository: str
    tag: str | None = None
    digest: Annotated[str | None, Field(pattern=r"^sha256:[0-9a-f]{64}$")] = None
    require_digest: bool = Field(
        False, description="render only a pinned digest (never the tag, never the all-zero placeholder "
                           "sha256:000...: pipelines.images.image_problems); `make image ENV=<env>` pins it")

    @model_validator(mode="after")
    def _tag_or_digest(self):
        if not (self.tag or self.digest):
            raise ValueError("set image.tag or image.digest")
        if self.require_digest and not self.digest:
            # The placeholder digest still loads (a fresh checkout must validate); rendering refuses it.
            raise ValueError("image.require_digest is true but image.digest is not set; build and pin it: "
                             "make image ENV=<env>")
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
    task_cpu: Cpu = Field("1", description="CPU limit of each pipeline task's pod")
    task_memory: Memory = Field("2G", description="memory limit of each pipeline task's pod")


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
    scoring: ScoringSpec = ScoringSpec()
    fleet: FleetSpec = FleetSpec()

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
        self._fleet_fits()
        if (self.evaluation.shadow is not None and not self.embedded
                and self.serving.deployment_mode != "Standard"):
            raise ValueError(f"evaluation.shadow needs serving.deployment_mode Standard on a cluster (an Istio route "
                             f"mirrors to the challenger); in {self.serving.deployment_mode} mode Knative owns the "
                             "InferenceService's routes: remove it here")
        if (self.serving.deployer == "local") != self.embedded:
            fits = "local (no kfp.host: this machine)" if self.embedded else "inferenceservice (kfp.host: a cluster)"
            raise ValueError(f"serving.deployer {self.serving.deployer!r} does not fit this environment; use {fits}")
        return self


    def _fleet_fits(self) -> None:
        clusters = self.fleet.clusters
        if self.embedded:
            if clusters:
                raise ValueError("fleet.clusters is for cluster environments (kfp.host set); this one runs here")
            return
        if not clusters:
            raise ValueError("fleet.clusters is empty: a cluster environment names the clusters it runs on")
        for part in ("training", "serving", "monitoring"):
            if not any(part in c.runs for c in clusters):
                raise ValueError(f"fleet.clusters: no cluster runs {part}")
        want = self.training.resources.gpu
        for c in clusters:
            if "training" in c.runs and want.count and c.gpu.resource != want.resource:
                raise ValueError(f"fleet.clusters[{c.name}].gpu.resource {c.gpu.resource!r} is not what training "
                                 f"asks for (training.resources.gpu.resource {want.resource!r})")
            if c.predictor_replicas == 0 and self.serving.deployment_mode != "Knative":
                raise ValueError(f"fleet.clusters[{c.name}].predictor_replicas 0 (scale to zero) needs "
                                 "serving.deployment_mode 'Knative'")


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _duplicate_keys(node: yaml.Node, path: tuple = ()) -> list[str]:
    """'<key path>: duplicate key at line N (first at line M)' for every key given twice in one
    mapping. PyYAML keeps the last value silently (yaml/pyyaml#165); YAML 1.2 (3.2.1.1) requires
    unique keys, and a silently dropped block is a setting that never applies."""
    found: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                ident = (key.tag, key.value)
                if ident in first:
                    found.append(f"{'.'.join((*path, key.value))}: duplicate key at line {key.start_mark.line + 1} "
                                 f"(first at line {first[ident] + 1}); YAML would keep only the last one")
                else:
                    first[ident] = key.start_mark.line
            found += _duplicate_keys(value, (*path, str(getattr(key, "value", "?"))))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found += _duplicate_keys(item, (*path, str(index)))
    return found


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        duplicates = _duplicate_keys(node) if node is not None else []
        if duplicates:
            raise ConfigError("\n".join(f"{path}: {line}" for line in duplicates))
        data = (loader.construct_document(node) if node is not None else None) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    finally:
        loader.dispose()
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
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "literal_error":
        message = f"got {err.get('input')!r}; allowed: {err['ctx']['expected']}"
    elif err["type"] == "missing":
        message = "required key is missing"
    elif err["type"] == "value_error" and err.get("ctx", {}).get("error"):
        message = str(err["ctx"]["error"])  # without pydantic's "Value error, " prefix
    return f"{origin(sources, loc)}: {key}: {message}"


def environments(config_dir: Path | str | None = None) -> list[str]:
    """Every `<name>.yaml` beside base.yaml is an environment, sorted by name."""
    config_dir = Path(config_dir or CONFIG_DIR)
    return sorted(p.stem for p in config_dir.glob("*.yaml") if p.name != BASE_FILE)


# Defaults that belong to the generated reference task (stages.dataset.ReferenceTask): its id and
# slice columns, its hand-written suite and its names. A file dataset gets none of them.
REFERENCE_NAME = "credit-default"
REFERENCE_DEFAULTS = {"evaluation": {"slice_column": "employment"},
                      "dataset": {"expectation_suite": "credit_default", "id_column": "customer_id"}}


def dataset_name(uri: str) -> str:
    """A name for a file dataset: its file name without the table suffix, e.g. 's3://b/loans_2024.parquet'
    -> 'loans_2024' (characters MLflow and KFP names might trip on become '-')."""
    name = PurePosixPath(urlsplit(uri).path if "://" in uri else uri.replace(os.sep, "/")).name
    for suffix in (".csv.gz", ".csv", ".parquet", ".pq"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "dataset"


def task_defaults(merged: dict, env: str) -> dict:
    """The defaults that depend on which task the env trains: the reference task's id and slice
    columns, suite and names, or, for a file dataset, no id column (rows split by content), no
    slice, a suite derived from the features and names derived from the file. Merged under the
    config, so a value any file sets still wins."""
    dataset = merged.get("dataset") if isinstance(merged.get("dataset"), dict) else {}
    uri = dataset.get("uri")
    if dataset.get("source") == "file" and isinstance(uri, str) and uri:
        name = dataset_name(uri)
        task: dict = {"evaluation": {"slice_column": None}, "dataset": {"expectation_suite": None, "id_column": None}}
    else:
        name, task = REFERENCE_NAME, REFERENCE_DEFAULTS
    return deep_merge(task, {"mlflow": {"experiment": name, "registered_model": name},
                             "kfp": {"experiment": f"{name}-{env}"}})


def config_sources(env: str, config_dir: Path, overrides: dict | None = None) -> list[tuple[Path, dict]]:
    """[(file, its data)] in merge order: base.yaml, <env>.yaml, then the overrides."""
    known = environments(config_dir)
    if env not in known:
        raise ConfigError(f"unknown environment {env!r}: no {config_dir / (env + '.yaml')}; "
                          f"environments: {', '.join(known) or 'none'}")
    sources = [(config_dir / BASE_FILE, _read_yaml(config_dir / BASE_FILE))]
    sources.append((config_dir / f"{env}.yaml", _read_yaml(config_dir / f"{env}.yaml")))
    if overrides:
        sources.append((Path("<overrides>"), overrides))
    return sources


def origin(sources: list[tuple[Path, dict]], loc: tuple) -> Path:
    """The file that set the key last (the one to fix); the env's file when none sets it."""
    return next((path for path, data in reversed(sources) if _sets_key(data, loc)), sources[-1][0])


def column_problems(settings: Settings, config_dir: Path | str | None = None,
                    overrides: dict | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes): every column config names (target, id, features, slice) checked against
    a file dataset's header, read without the rows; a note instead when the header cannot be read
    from here (an object store without credentials or network)."""
    from stages.dataset import read_columns

    dataset = settings.dataset
    if dataset.source != "file":
        return [], []
    try:
        columns = read_columns(dataset.uri)
    except FileNotFoundError:
        sources = config_sources(settings.env, Path(config_dir or CONFIG_DIR), overrides)
        return [f"{origin(sources, ('dataset', 'uri'))}: dataset.uri: file not found: {dataset.uri}"], []
    except Exception as err:  # any reader or network error: the run will say more; check must not crash
        if "://" in dataset.uri:
            return [], [f"dataset.uri {dataset.uri}: columns not checked, the header could not be read from here "
                        f"({type(err).__name__})"]
        sources = config_sources(settings.env, Path(config_dir or CONFIG_DIR), overrides)
        return [f"{origin(sources, ('dataset', 'uri'))}: dataset.uri: cannot read the header of {dataset.uri}: "
                f"{err}".splitlines()[0]], []
    named = [(("dataset", "target"), dataset.target), (("dataset", "id_column"), dataset.id_column),
             *((("dataset", "features", "numeric"), c) for c in dataset.features.numeric),
             *((("dataset", "features", "categorical"), c) for c in dataset.features.categorical),
             (("evaluation", "slice_column"), settings.evaluation.slice_column)]
    missing = [(loc, column) for loc, column in named if column is not None and column not in columns]
    if not missing:
        return [], []
    sources = config_sources(settings.env, Path(config_dir or CONFIG_DIR), overrides)
    shown = ", ".join(columns[:30]) + (f", ... ({len(columns)} columns)" if len(columns) > 30 else "")
    return [f"{origin(sources, loc)}: {'.'.join(loc)}: column {column!r} is not in {dataset.uri} (columns: {shown})"
            for loc, column in missing], []


def load_settings(env: str, config_dir: Path | str | None = None, overrides: dict | None = None) -> Settings:
    """Merge base.yaml and <env>.yaml (and optional overrides), then validate."""
    config_dir = Path(config_dir or CONFIG_DIR)
    sources = config_sources(env, config_dir, overrides)
    merged: dict = {"env": env}
    for _, data in sources:
        merged = deep_merge(merged, data)
    merged = deep_merge(task_defaults(merged, env), merged)  # what config sets wins
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
