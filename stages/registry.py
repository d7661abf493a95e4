"""The MLflow model registry: register a model directory as a pyfunc, the `champion`,
`previous-champion` and `challenger` aliases, and loading the champion back for the gate.

`challenger` is a candidate that passed the gate of an env with `evaluation.shadow`: registered,
not served to clients, shadowing the champion on mirrored traffic until `promote_challenger`
makes it the champion (after its shadow report passed)."""
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
from gateways.mlflow_api import Registry, is_unreachable, log_pyfunc
from model.artifact import PROFILE_KEY, feature_columns, read_metadata, reference_profile
from specs import TrackingSpec
from stages.metrics import predict_scores
from stages.tracking import experiment_id
from stages.versions import CHAMPION, MODEL_DIR_ARTIFACT, PREVIOUS_CHAMPION, set_champion
from storage.tables import content_hash

# What the registered pyfunc needs at inference; pinned to what is installed here (letting MLflow
# infer requirements costs ~4.8 s per log_model). The flywheel package itself (model.*) comes
# with the serving image.
CHALLENGER = "challenger"
PYFUNC_CODE = str(Path(model.__file__).parent / "pyfunc.py")  # not imported: it imports mlflow
RUNTIME_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "fsspec", "cloudpickle")


def register_candidate(model_dir: str, test_frame: pd.DataFrame, tracking: TrackingSpec, evaluation_run_id: str,
                       lineage: Mapping, *, challenger: bool = False) -> str:
    """Register a promoted model with its lineage (training data and test data hashes, the
    evaluation run) and an input example from the test data; returns the new version. With
    `challenger`, the alias `challenger` moves to it and the champion stays as it is."""
    metadata = read_metadata(model_dir)
    lineage = {"data_hash": metadata.get("data_hash"), "test_data_hash": content_hash(test_frame),
               "evaluation_run_id": evaluation_run_id, "training_run_id": metadata.get("mlflow_run_id"), **lineage}
    version = register_model(tracking.tracking_uri, tracking.registered_model, model_dir, evaluation_run_id or None,
                             lineage, input_example(test_frame, feature_columns(metadata)),
                             experiment=tracking.experiment, make_champion=not challenger)
    if challenger:
        Registry(tracking.tracking_uri, tracking.registered_model).set_alias(CHALLENGER, version)
    return version


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
    if not run_id and not experiment:
        raise ValueError("register_model needs run_id or experiment")
    from model.loader import load_model  # torch: not imported by the ops that only read the registry

    model = load_model(model_dir)
    tags = {k: str(v)[:5000] for k, v in lineage.items() if v not in (None, "")}
    profile = reference_profile(model.metadata)  # what monitoring compares this version's traffic with
    run_id, model_uri = log_pyfunc(
        tracking_uri,
        # Models from code: MLflow stores this file with the version and runs it to load the
        # model, so a registered version never depends on where an op or class lives.
        python_model=PYFUNC_CODE,
        artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
        input_example=input_example,
        output_example=predict_scores(model, input_example),
        pip_requirements=pip_requirements(),
        metadata={"flywheel": {"features": feature_columns(model.metadata)}},
        dicts={f"{PROFILE_KEY}.json": profile} if profile else {},
        run_id=run_id or None,
        experiment_id=None if run_id else experiment_id(tracking_uri, experiment),
    )
    registry = Registry(tracking_uri, registered_model)
    version = registry.register(model_uri, tags)
    registry.describe(version, f"flywheel model from run {run_id}; lineage: {json.dumps(tags, sort_keys=True)}")
    if make_champion:
        previous = set_champion(registry, version)
        if previous:
            registry.tag(version, PREVIOUS_TAG, previous)
    return version


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
    registry = Registry(tracking_uri, registered_model)
    number = (registry.aliases() or {}).get(alias)
    if number is None:
        return None
    info = {**registry.version(number), "alias": alias}
    try:
        return Champion(info, _PyfuncScorer(registry.load_pyfunc(info["version"])))
    except Exception as err:
        if is_unreachable(err):
            raise
        return Champion(info, None, f"{registered_model} v{info['version']} could not be loaded: "
                                    f"{type(err).__name__}: {str(err)[:300]}")


# ---- rollback and roll forward ------------------------------------------------------------------
# Each version promoted by `register_model` carries a `previous_champion` tag (the champion it
# replaced): that chain is the champion history. `roll_back` walks it and never re-promotes a
# version tagged `rolled_back`, so rolling back twice goes further back, never in a circle;
# `promote_version` (roll forward, or any explicit choice) is the only way to bring such a version
# back, and it clears the tag.

ROLLED_BACK, PREVIOUS_TAG = "rolled_back", "previous_champion"


class NothingToRollBack(ValueError):
    """The champion has no earlier champion that was not rolled back."""


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
    registry = Registry(tracking_uri, registered_model)
    aliases, tags = registry.aliases() or {}, registry.versions()
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
    registry = Registry(tracking_uri, registered_model)
    registry.set_alias(CHAMPION, target)  # never without a champion
    registry.tag(current, ROLLED_BACK, "true")
    tags = registry.versions()
    previous = _earlier(tags, tags.get(target, {}).get(PREVIOUS_TAG), {target, current})
    if previous is None:
        registry.delete_alias(PREVIOUS_CHAMPION)
    else:
        registry.set_alias(PREVIOUS_CHAMPION, previous)
    return previous


def check_version(tracking_uri: str, registered_model: str, version: str) -> str:
    """`version` as the registry spells it; ValueError naming the versions there are when it is not one."""
    tags = Registry(tracking_uri, registered_model).versions()
    if str(version) not in tags:
        known = ", ".join(sorted(tags, key=int)) or "none"
        raise ValueError(f"{registered_model} has no version {version!r} (versions: {known})")
    return str(version)


def promote_version(tracking_uri: str, registered_model: str, version: str) -> str | None:
    """Make `version` the champion (roll forward, or back to a version of your choice): the old
    champion becomes `previous-champion` and the history records it; a `rolled_back` tag on
    `version` is cleared. Returns the old champion (None when `version` already was)."""
    version = check_version(tracking_uri, registered_model, version)
    registry = Registry(tracking_uri, registered_model)
    previous = set_champion(registry, version)
    if previous is not None:
        registry.tag(version, PREVIOUS_TAG, previous)
    if ROLLED_BACK in registry.version(version)["tags"]:
        registry.untag(version, ROLLED_BACK)
    return previous


def promote_challenger(tracking_uri: str, registered_model: str) -> tuple[str, str | None]:
    """Make the `challenger` the champion (the old one becomes `previous-champion`, as any
    promotion) and drop the `challenger` alias; (the version, the old champion). LookupError when
    there is no challenger."""
    registry = Registry(tracking_uri, registered_model)
    version = (registry.aliases() or {}).get(CHALLENGER)
    if version is None:
        raise LookupError(f"{registered_model} has no challenger")
    previous = promote_version(tracking_uri, registered_model, version)
    registry.delete_alias(CHALLENGER)
    return str(version), previous


def drop_challenger(tracking_uri: str, registered_model: str) -> str | None:
    """Remove the `challenger` alias (a challenger refused after its shadow run); the version it named."""
    registry = Registry(tracking_uri, registered_model)
    version = (registry.aliases() or {}).get(CHALLENGER)
    if version is not None:
        registry.delete_alias(CHALLENGER)
    return version
