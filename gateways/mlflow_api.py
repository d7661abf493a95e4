"""MLflow, the one way Flywheel reaches it: a client at a tracking URI (probed first, so a server
that is not there fails in seconds), experiments, runs (params, metrics, tags, artifacts, dataset
inputs, child runs), the model registry (versions, their tags, aliases) and downloads.

Only this module imports `mlflow.tracking`, `MlflowClient` and `mlflow.entities`
(tests/project/test_layers.py checks it). It uses MLflow's public API alone, with one documented
extension point: `DatasetSource`'s abstract methods, whose names start with an underscore
(pinned by tests/stages/test_tracking.py). MLflow is imported lazily so that importing this module stays
cheap for the pipeline compiler and the CLI.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from storage.endpoints import probe

# MLflow's limits (mlflow/utils/validation.py): a tag's and a param's value, a batch's params and
# metrics, a dataset digest (the full content hash goes in an input tag).
MAX_TAG, MAX_PARAM, MAX_PARAMS_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_DIGEST = 5000, 6000, 100, 1000, 36
# What MLflow answers for a registered model, version or alias that is not there.
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def mlflow_module():
    """The `mlflow` package, imported on first use with telemetry off (MLflow 3 sends telemetry
    unless told not to: MLFLOW_DISABLE_TELEMETRY, mlflow/environment_variables.py)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def reach(tracking_uri: str) -> None:
    """Fail at once, with `storage.endpoints.Unreachable`, when a remote tracking server does not
    take a connection: MLflow's own HTTP retries would spend about 4 minutes on it first (see
    storage/endpoints.py). Local stores (sqlite:, file paths) are not probed."""
    probe("MLflow", tracking_uri)


def client(tracking_uri: str):
    """An `MlflowClient` for tracking and registry at `tracking_uri`, after the reachability probe."""
    reach(tracking_uri)
    from mlflow import MlflowClient

    mlflow_module()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextlib.contextmanager
def mlflow_at(tracking_uri: str) -> Iterator[Any]:
    """MLflow's fluent API (the `mlflow` module: model logging, model loading) pointed at
    `tracking_uri` for a block; afterwards the process's tracking and registry URIs and MLFLOW_*
    variables are as they were. Nothing here calls `mlflow.set_experiment` (runs name their
    experiment), so no active experiment is left behind to break a later `start_run(run_id=...)`
    in another experiment (mlflow/tracking/fluent.py, start_run)."""
    reach(tracking_uri)
    mlflow = mlflow_module()
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_unreachable(err: BaseException) -> bool:
    """True when a failure (or what caused it) is a network problem, not the content asked for:
    MLflow wraps requests/urllib3/botocore errors, so walk the chain and look at the types."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = type(err).__name__
        if isinstance(err, (ConnectionError, TimeoutError)) or "Connection" in name or "Timeout" in name:
            return True
        err = err.__cause__ or err.__context__
    return False


def _not_found(err: BaseException, codes: Sequence[str] = NOT_FOUND) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code in codes


# ---- experiments ---------------------------------------------------------------------------------


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """A local SQLite store keeps artifacts beside the database, not in ./mlruns of whatever the
    current directory happens to be; a tracking server manages its own artifact store."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_absolute():
            db = Path.cwd() / db
        return (db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)).as_uri()
    return None


def ensure_experiment(tracking_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """The id of experiment `name`, created with `tags` on first use (two tasks racing to create
    it is fine); an existing one gets each of `tags` it lacks (one someone set is left alone)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow_client.create_experiment(name, artifact_location=artifact_location(tracking_uri, name),
                                                   tags=dict(tags))
        except MlflowException:
            found = mlflow_client.get_experiment_by_name(name)
            if found is None:
                raise
    for key, value in tags.items():
        if key not in found.tags:
            mlflow_client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


# ---- runs ----------------------------------------------------------------------------------------


class Point(NamedTuple):
    """One metric value: `step` 0 for a final metric, the epoch for a curve's point; logged at
    `timestamp_ms` (milliseconds since the epoch) when given, else now."""

    key: str
    value: float
    step: int = 0
    timestamp_ms: int | None = None


def param_text(value: Any) -> str:
    """A param as MLflow keeps it: text (lists and dicts as JSON), cut to MLflow's limit."""
    return (json.dumps(value) if isinstance(value, (list, dict)) else str(value))[:MAX_PARAM]


def tag_texts(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags as MLflow keeps them: text cut to MLflow's limit; None values are left out."""
    return {k: str(v)[:MAX_TAG] for k, v in tags.items() if v is not None}


class Run:
    """An MLflow run being logged (see `run`): its id, and what can be logged into it."""

    def __init__(self, mlflow_client, run_id: str, experiment_id: str, tracking_uri: str):
        self.client, self.run_id = mlflow_client, run_id
        self.experiment_id, self.tracking_uri = experiment_id, tracking_uri

    def log(self, *, params: Mapping[str, Any] | None = None, metrics: Sequence[Point] = (),
            tags: Mapping[str, Any] | None = None) -> None:
        """Params (see `param_text`), metric points and tags, in as few batches as MLflow allows."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        params = [Param(k, param_text(v)) for k, v in (params or {}).items()]
        points = [Metric(p.key, float(p.value), now if p.timestamp_ms is None else int(p.timestamp_ms), int(p.step))
                  for p in metrics]
        tags = [RunTag(k, v) for k, v in tag_texts(tags or {}).items()]
        if not (params or points or tags):
            return
        self.client.log_batch(self.run_id, metrics=points[:MAX_METRICS_PER_BATCH],
                              params=params[:MAX_PARAMS_PER_BATCH], tags=tags)
        for start in range(MAX_PARAMS_PER_BATCH, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MAX_PARAMS_PER_BATCH])
        for start in range(MAX_METRICS_PER_BATCH, len(points), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=points[start:start + MAX_METRICS_PER_BATCH])

    def log_dict(self, value: Mapping, name: str) -> None:
        """A JSON-able dict as the artifact `name` (a path in the run)."""
        self.client.log_dict(self.run_id, dict(value), name)

    def log_file(self, path: str, name: str) -> None:
        """The local file `path` as the artifact `name` (a path in the run, its own file name or another)."""
        directory = os.path.dirname(name) or None
        if os.path.basename(name) == os.path.basename(path):
            self.client.log_artifact(self.run_id, path, directory)
            return
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, os.path.basename(name))
            shutil.copyfile(path, copy)
            self.client.log_artifact(self.run_id, copy, directory)

    def log_datasets(self, inputs: Sequence[Any]) -> None:
        """Dataset inputs made by `dataset_input`."""
        self.client.log_inputs(self.run_id, datasets=list(inputs))


@contextlib.contextmanager
def run(tracking_uri: str, experiment_id: str, run_name: str, tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None) -> Iterator[Run]:
    """A new run in `experiment_id` (a child of `parent_run_id` when given) for a block: it ends
    FINISHED, or FAILED if the block raises."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    mlflow_client = client(tracking_uri)
    tags = tag_texts(tags or {})
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    created = mlflow_client.create_run(experiment_id, run_name=run_name, tags=tags)
    logging = Run(mlflow_client, created.info.run_id, experiment_id, tracking_uri)
    try:
        yield logging
    except BaseException:
        mlflow_client.set_terminated(logging.run_id, "FAILED")
        raise
    mlflow_client.set_terminated(logging.run_id, "FINISHED")


def _dataset_source(uri: str):
    """MLflow's source for `uri` (local path, s3://, gs://, ...); a scheme MLflow has no artifact
    repository for (KFP's minio://) is recorded as it is, by a `DatasetSource` of our own. Its
    methods are the ones MLflow declares abstract (mlflow/data/dataset_source.py), underscores
    included: tests/stages/test_tracking.py fails when that list changes."""
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
        warnings.simplefilter("ignore", UserWarning)
        try:
            return resolve_dataset_source(uri)
        except MlflowException:
            pass

    class UriDatasetSource(DatasetSource):
        @staticmethod
        def _get_source_type() -> str:
            return "uri"

        def load(self, **kwargs):
            raise NotImplementedError(f"read {uri} with storage.open_uri")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            raise NotImplementedError

        def to_dict(self) -> dict:
            return {"uri": uri}

        @classmethod
        def from_dict(cls, source_dict):
            raise NotImplementedError

    return UriDatasetSource()


def _schema(head):
    """The MLflow schema of a table's first rows (a DataFrame), or None when there is none."""
    if head is None:
        return None
    from mlflow.models import infer_signature

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return infer_signature(head).inputs
    except Exception:  # a schema is a nicety; the reference and digest are what count
        return None


def dataset_input(uri: str, *, name: str, digest: str, context: str, head=None, rows: int | None = None,
                  tags: Mapping[str, Any] | None = None):
    """An MLflow DatasetInput by reference (nothing uploaded): the source URI, `digest` (cut to
    MLflow's limit), the schema of `head` (a few rows, when readable), the row count, tagged with
    its `context` (training, testing) and `tags` (empty values left out)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    config = MetaDataset(_dataset_source(uri), name=name, digest=digest[:MAX_DIGEST], schema=_schema(head)).to_dict()
    entity = Dataset(name=config["name"], digest=config["digest"], source_type=config["source_type"],
                     source=config["source"], schema=config.get("schema"),
                     profile=json.dumps({"num_rows": int(rows)}) if rows is not None else None)
    tags = {MLFLOW_DATASET_CONTEXT: context, **(tags or {})}
    return DatasetInput(entity, [InputTag(k, str(v)[:500]) for k, v in tags.items() if v])


# ---- the model registry --------------------------------------------------------------------------


class Registry:
    """One registered model at a tracking URI: its aliases, its versions and their tags, where each
    version's files are. Creating one probes the server (see `reach`)."""

    def __init__(self, tracking_uri: str, name: str):
        self.tracking_uri, self.name = tracking_uri, name
        self.client = client(tracking_uri)

    def aliases(self) -> dict[str, str] | None:
        """{alias: version} (versions as text), or None when no model of that name is registered."""
        try:
            registered = self.client.get_registered_model(self.name)
        except Exception as err:
            if _not_found(err, ("RESOURCE_DOES_NOT_EXIST",)):
                return None
            raise
        return {alias: str(version) for alias, version in registered.aliases.items()}

    def version_behind(self, alias: str) -> str | None:
        """The version `alias` points at, or None when the model or the alias is not there."""
        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except Exception as err:
            if _not_found(err):
                return None
            raise

    def version(self, version: str) -> dict:
        """A version as a dict: name, version, run_id, source, tags, status."""
        mv = self.client.get_model_version(self.name, str(version))
        return {"name": self.name, "version": str(mv.version), "run_id": mv.run_id, "source": mv.source,
                "tags": dict(mv.tags), "status": mv.status}

    def versions(self) -> dict[str, dict[str, str]]:
        """{version: its tags} of every version (the champion history is in these tags)."""
        return {str(mv.version): dict(mv.tags) for mv in self.client.search_model_versions(f"name='{self.name}'")}

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        self.client.delete_registered_model_alias(self.name, alias)

    def tag(self, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.name, str(version), key, value)

    def untag(self, version: str, key: str) -> None:
        self.client.delete_model_version_tag(self.name, str(version), key)

    def describe(self, version: str, description: str) -> None:
        self.client.update_model_version(self.name, str(version), description=description)

    def register(self, model_uri: str, tags: Mapping[str, Any]) -> str:
        """A new version of this model from a logged model's URI, with `tags`; its number."""
        with mlflow_at(self.tracking_uri) as mlflow:
            return str(mlflow.register_model(model_uri, self.name, tags=tag_texts(tags)).version)

    def pyfunc_artifacts_uri(self, version: str, artifact: str) -> str:
        """The storage URI of artifact `artifact` logged with a pyfunc version (`artifacts=` of
        `log_pyfunc`); ValueError when the version has no such artifact."""
        base = self.client.get_model_version_download_uri(self.name, str(version))
        with mlflow_at(self.tracking_uri) as mlflow:
            info = mlflow.models.get_model_info(f"models:/{self.name}/{version}")
        artifacts = (info.flavors.get("python_function") or {}).get("artifacts") or {}
        if artifact not in artifacts:
            raise ValueError(f"{self.name} v{version} has no {artifact} artifact: not a Flywheel model")
        return base.rstrip("/") + "/" + artifacts[artifact]["path"]

    def load_pyfunc(self, version: str):
        """The version loaded as an MLflow pyfunc (its `predict` enforces the logged signature)."""
        with mlflow_at(self.tracking_uri) as mlflow:
            return mlflow.pyfunc.load_model(f"models:/{self.name}/{version}")

    def input_example(self, version: str):
        """The input example logged with the version (a DataFrame for a pyfunc logged with one), or
        None; only MLmodel and the example file are downloaded (mlflow.models.Model.load_input_example)."""
        uri = f"models:/{self.name}/{version}"
        with mlflow_at(self.tracking_uri) as mlflow:
            return mlflow.models.Model.load(uri).load_input_example(uri)


def download(tracking_uri: str, artifact_uri: str, dst: str) -> str:
    """Artifacts at `artifact_uri` (a run's, a model version's) downloaded under `dst`; the local path."""
    with mlflow_at(tracking_uri):
        from mlflow.artifacts import download_artifacts

        return download_artifacts(artifact_uri=artifact_uri, dst_path=dst)


def log_pyfunc(tracking_uri: str, *, python_model: str, artifacts: Mapping[str, str], input_example,
               output_example, pip_requirements: Sequence[str], metadata: Mapping, dicts: Mapping[str, Mapping],
               run_id: str | None = None, experiment_id: str | None = None) -> tuple[str, str]:
    """Log a models-from-code pyfunc (`python_model`: the file's path) into run `run_id`, or a new
    run `register` in `experiment_id`, with its signature inferred from the examples and `dicts`
    ({artifact name: JSON-able dict}) beside it; returns (run id, model URI). MLflow's fluent API
    is its public way to log a model into a run (mlflow.pyfunc.log_model needs an active run)."""
    with mlflow_at(tracking_uri) as mlflow:
        from mlflow.models import infer_signature

        signature = infer_signature(input_example, output_example)
        if run_id:
            active = mlflow.start_run(run_id=run_id)
        elif experiment_id:
            active = mlflow.start_run(experiment_id=experiment_id, run_name="register")
        else:
            raise ValueError("log_pyfunc needs run_id or experiment_id")
        with active:
            info = mlflow.pyfunc.log_model(name="model", python_model=python_model, artifacts=dict(artifacts),
                                           signature=signature, input_example=input_example,
                                           pip_requirements=list(pip_requirements), metadata=dict(metadata))
            for name, value in dicts.items():
                mlflow.log_dict(dict(value), name)
            return active.info.run_id, info.model_uri
