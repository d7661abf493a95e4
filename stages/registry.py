"""The MLflow model registry: register a model directory as a pyfunc, the `champion` and
`previous-champion` aliases, and loading the champion back for the gate."""
from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import model
from model.artifact import PROFILE_KEY, feature_columns, read_metadata, reference_profile
from model.loader import load_model
from specs import TrackingSpec
from stages.metrics import predict_scores
from stages.tracking import _client, _mlflow, experiment_id, mlflow_at
from stages.versions import CHAMPION, _set_champion
from storage.tables import content_hash

# What the registered pyfunc needs at inference; pinned to what is installed here (letting MLflow
# infer requirements costs ~4.8 s per log_model). The flywheel package itself (model.*) comes
# with the serving image.
PYFUNC_CODE = str(Path(model.__file__).parent / "pyfunc.py")  # not imported: it imports mlflow
RUNTIME_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "fsspec", "cloudpickle")


def register_candidate(model_dir: str, test_frame: pd.DataFrame, tracking: TrackingSpec, evaluation_run_id: str,
                       lineage: Mapping) -> str:
    """Register a promoted model with its lineage (training data and test data hashes, the
    evaluation run) and an input example from the test data; returns the new version."""
    metadata = read_metadata(model_dir)
    lineage = {"data_hash": metadata.get("data_hash"), "test_data_hash": content_hash(test_frame),
               "evaluation_run_id": evaluation_run_id, "training_run_id": metadata.get("mlflow_run_id"), **lineage}
    return register_model(tracking.tracking_uri, tracking.registered_model, model_dir, evaluation_run_id or None,
                          lineage, input_example(test_frame, feature_columns(metadata)),
                          experiment=tracking.experiment)


def input_example(frame: pd.DataFrame, columns: list[str], rows: int = 5) -> pd.DataFrame:
    """A few feature rows for the MLflow signature, including a missing value of every column that
    has them, so that the signature marks those columns optional and serving accepts nulls."""
    columns = [c for c in columns if c in frame.columns] or list(frame.columns)
    picked = list(frame.index[:rows])
    for column in columns:
        missing = frame.index[frame[column].isna()]
        if len(missing) and not frame.loc[picked, column].isna().any():
            picked.append(missing[0])
    return frame.loc[picked, columns].reset_index(drop=True)


def pip_requirements() -> list[str]:
    """Exact pins of what the pyfunc imports, from this environment (the image's lock)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in RUNTIME_PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{package}=={version(package)}")
    return pins


def register_model(tracking_uri: str, registered_model: str, model_dir: str, run_id: str | None,
                   lineage: Mapping, input_example: pd.DataFrame, *, experiment: str | None = None,
                   make_champion: bool = True) -> str:
    """Log `model_dir` as an MLflow pyfunc into run `run_id` (a new run in `experiment` when None),
    register it with lineage tags, move `champion` to it (old one -> `previous-champion`), and
    return the new version number."""
    mlflow = _mlflow()
    from mlflow.models import infer_signature

    model = load_model(model_dir)
    signature = infer_signature(input_example, predict_scores(model, input_example))
    tags = {k: str(v)[:5000] for k, v in lineage.items() if v not in (None, "")}
    with mlflow_at(tracking_uri):
        if run_id:
            run = mlflow.start_run(run_id=run_id)
        else:
            if not experiment:
                raise ValueError("register_model needs run_id or experiment")
            run = mlflow.start_run(experiment_id=experiment_id(tracking_uri, experiment), run_name="register")
        with run:
            info = mlflow.pyfunc.log_model(
                name="model",
                # Models from code: MLflow stores this file with the version and runs it to load the
                # model, so a registered version never depends on where an op or class lives.
                python_model=PYFUNC_CODE,
                artifacts={"model_dir": str(model_dir)},
                signature=signature,
                input_example=input_example,
                pip_requirements=pip_requirements(),
                metadata={"flywheel": {"features": feature_columns(model.metadata)}},
            )
            if reference_profile(model.metadata):  # what monitoring compares this version's traffic with
                mlflow.log_dict(reference_profile(model.metadata), f"{PROFILE_KEY}.json")
            run_id = run.info.run_id
        version = mlflow.register_model(info.model_uri, registered_model, tags=tags)
    client = _client(tracking_uri)
    client.update_model_version(registered_model, version.version,
                                description=f"flywheel model from run {run_id}; "
                                            f"lineage: {json.dumps(tags, sort_keys=True)}")
    if make_champion:
        previous = _set_champion(client, registered_model, version.version)
        if previous:
            client.set_model_version_tag(registered_model, version.version, "previous_champion", previous)
    return str(version.version)


@dataclass
class Champion:
    """The registry's current champion. `model` has `predict_proba(frame)`; when it could not be
    loaded, `model` is None and `error` says why (the gate then judges on thresholds alone)."""

    version: dict
    model: Any = None
    error: str | None = None

    @property
    def readable(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str:
        return f"{self.version.get('name')} v{self.version.get('version')}"


class _PyfuncScorer:
    """A loaded MLflow pyfunc seen through our `predict_proba` contract (schema enforced, as in serving)."""

    def __init__(self, pyfunc):
        self.pyfunc = pyfunc
        self.metadata = getattr(getattr(pyfunc.unwrap_python_model(), "model", None), "metadata", {})

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.pyfunc.predict(frame), dtype=np.float64).reshape(-1)


def load_champion(tracking_uri: str, registered_model: str, alias: str = CHAMPION) -> Champion | None:
    """The model behind `alias`, or None when there is none yet (no registered model, no alias).

    A champion whose artifacts cannot be loaded comes back with `error` set rather than raising:
    that is a property of the registry's content the gate must decide on. A registry that cannot
    be reached raises (MlflowException), so the task fails and nothing is promoted by accident.
    """
    from mlflow.exceptions import MlflowException

    mlflow = _mlflow()
    client = _client(tracking_uri)
    try:
        registered = client.get_registered_model(registered_model)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    number = registered.aliases.get(alias)
    if number is None:
        return None
    mv = client.get_model_version(registered_model, str(number))
    info = {"name": registered_model, "alias": alias, "version": str(mv.version), "run_id": mv.run_id,
            "source": mv.source, "tags": dict(mv.tags), "status": mv.status}
    with mlflow_at(tracking_uri):
        try:
            pyfunc = mlflow.pyfunc.load_model(f"models:/{registered_model}/{mv.version}")
            return Champion(info, _PyfuncScorer(pyfunc))
        except Exception as err:
            if _unreachable(err):
                raise
            return Champion(info, None, f"{registered_model} v{mv.version} could not be loaded: "
                                        f"{type(err).__name__}: {str(err)[:300]}")


def _unreachable(err: BaseException) -> bool:
    """True when a failure (or what caused it) is a network problem, not the champion's content:
    MLflow wraps requests/urllib3/botocore errors, so walk the chain and look at the types."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = type(err).__name__
        if isinstance(err, (ConnectionError, TimeoutError)) or "Connection" in name or "Timeout" in name:
            return True
        err = err.__cause__ or err.__context__
    return False


# ---- rollback and roll forward ------------------------------------------------------------------
# Each version promoted by `register_model` carries a `previous_champion` tag (the champion it
# replaced): that chain is the champion history. `roll_back` walks it and never re-promotes a
# version tagged `rolled_back`, so rolling back twice goes further back, never in a circle;
# `promote_version` (roll forward, or any explicit choice) is the only way to bring such a version
# back, and it clears the tag.

ROLLED_BACK, PREVIOUS_TAG = "rolled_back", "previous_champion"


class NothingToRollBack(ValueError):
    """The champion has no earlier champion that was not rolled back."""


def _versions(client, registered_model: str) -> tuple[dict, dict]:
    """(aliases, {version: tags}) of a registered model, version numbers as strings."""
    aliases = {alias: str(v) for alias, v in client.get_registered_model(registered_model).aliases.items()}
    tags = {str(mv.version): dict(mv.tags) for mv in client.search_model_versions(f"name='{registered_model}'")}
    return aliases, tags


def _earlier(tags: dict, start: str | None, skip: set[str]) -> str | None:
    """The first version along the `previous_champion` chain from `start` (itself included) that
    exists, is not rolled back and is not in `skip`; None when the chain ends first."""
    seen = set(skip)
    while start is not None and start not in seen:
        seen.add(start)
        if start in tags and tags[start].get(ROLLED_BACK) != "true":
            return start
        start = (tags.get(start) or {}).get(PREVIOUS_TAG)
    return None


def rollback_target(tracking_uri: str, registered_model: str) -> tuple[str, str]:
    """(version a rollback would serve, the current champion); NothingToRollBack when there is none."""
    from stages.versions import PREVIOUS_CHAMPION

    aliases, tags = _versions(_client(tracking_uri), registered_model)
    current = aliases.get(CHAMPION)
    if current is None:
        raise NothingToRollBack(f"{registered_model} has no champion: nothing to roll back")
    target = _earlier(tags, aliases.get(PREVIOUS_CHAMPION), {current})
    if target is None:
        raise NothingToRollBack(
            f"nothing older to roll back to: {registered_model} v{current} is the champion and no earlier champion "
            "is left that was not rolled back; `flywheel rollback --to N` serves a version you choose")
    return target, current


def roll_back(tracking_uri: str, registered_model: str, target: str, current: str) -> str | None:
    """Make `target` the champion instead of `current` (tagged rolled_back); `previous-champion`
    moves to the next earlier champion along the history, or goes when there is none. Returns it."""
    from stages.versions import PREVIOUS_CHAMPION

    client = _client(tracking_uri)
    client.set_registered_model_alias(registered_model, CHAMPION, target)  # never without a champion
    client.set_model_version_tag(registered_model, current, ROLLED_BACK, "true")
    _, tags = _versions(client, registered_model)
    previous = _earlier(tags, tags.get(target, {}).get(PREVIOUS_TAG), {target, current})
    if previous is None:
        client.delete_registered_model_alias(registered_model, PREVIOUS_CHAMPION)
    else:
        client.set_registered_model_alias(registered_model, PREVIOUS_CHAMPION, previous)
    return previous


def check_version(tracking_uri: str, registered_model: str, version: str) -> str:
    """`version` as the registry spells it; ValueError naming the versions there are when it is not one."""
    _, tags = _versions(_client(tracking_uri), registered_model)
    if str(version) not in tags:
        known = ", ".join(sorted(tags, key=int)) or "none"
        raise ValueError(f"{registered_model} has no version {version!r} (versions: {known})")
    return str(version)


def promote_version(tracking_uri: str, registered_model: str, version: str) -> str | None:
    """Make `version` the champion (roll forward, or back to a version of your choice): the old
    champion becomes `previous-champion` and the history records it; a `rolled_back` tag on
    `version` is cleared. Returns the old champion (None when `version` already was)."""
    client = _client(tracking_uri)
    version = check_version(tracking_uri, registered_model, version)
    previous = _set_champion(client, registered_model, version)
    if previous is not None:
        client.set_model_version_tag(registered_model, version, PREVIOUS_TAG, previous)
    if ROLLED_BACK in client.get_model_version(registered_model, version).tags:
        client.delete_model_version_tag(registered_model, version, ROLLED_BACK)
    return previous
