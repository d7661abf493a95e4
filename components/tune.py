"""Tuning: propose trials from the env's search space, train each with a small budget in
parallel (dsl.ParallelFor), pick the best on the validation split, and log every trial to MLflow
as a child run. The held-out test split never reaches this stage.

Successive halving runs two rungs: every trial on the small budget, then the best third again on
`HALVING_ETA` times the budget, so most of the compute goes to the promising configurations."""
import itertools
import random
from typing import NamedTuple, Optional

from kfp.dsl import Dataset, Input


HALVING_ETA = 3


def promote(results: list[dict], eta: int = HALVING_ETA) -> list[dict]:
    """The top 1/eta of a rung (at least one), by validation score, for the next rung."""
    keep = max(1, -(-len(results) // eta))
    ranked = sorted((r for r in results if r.get("val_roc_auc") == r.get("val_roc_auc")),
                    key=lambda r: (-r["val_roc_auc"], r.get("val_loss", 0.0), r["trial"]))
    return [{"trial": r["trial"], "params": r["params"]} for r in ranked[:keep]]


def propose(search_space: dict, strategy: str, trials: int, seed: int) -> list[dict]:
    """Grid enumerates the space (capped at `trials`, evenly spread); random samples it
    without repeats. Both are deterministic for a seed."""
    keys = sorted(search_space)
    grid = [dict(zip(keys, values)) for values in itertools.product(*(search_space[k] for k in keys))]
    if not grid or not keys:
        return [{}]
    if strategy == "grid":
        step = max(1, len(grid) // trials)
        return grid[::step][:trials]
    return random.Random(seed).sample(grid, min(trials, len(grid)))


def best_trial(results: list[dict], metric: str = "val_roc_auc") -> dict:
    """Highest validation score wins; ties go to the lower validation loss, then to trial order."""
    usable = [r for r in results if r.get(metric) == r.get(metric)]  # drop NaN scores
    if not usable:
        raise RuntimeError(f"no tuning trial produced a {metric}: {results}")
    return max(usable, key=lambda r: (round(r[metric], 6), -r.get("val_loss", 0.0), -r["trial"]))


def typed(params: dict) -> dict:
    """Hyperparameters as their declared types (KFP hands every number back as a float)."""
    from pipelines.config import Hyperparameters

    return {k: getattr(Hyperparameters.model_validate({k: v}), k) for k, v in params.items()}


def propose_op(tuning_spec: dict, train_spec: dict) -> list:
    """The trials to run: each a dict {trial, params}."""
    from components.tune import propose
    from pipelines.config import Tuning

    tuning = Tuning.model_validate(tuning_spec)
    space = {k: list(v) for k, v in tuning.search_space.items()}
    seed = int(train_spec["hyperparameters"]["seed"])
    return [{"trial": i, "params": p} for i, p in enumerate(propose(space, tuning.strategy, tuning.trials, seed))]


def promote_op(trials: list) -> list:
    """Successive halving: carry the best third of the first rung into the second."""
    from components.tune import promote, typed

    results = [{**t, "trial": int(t["trial"]), "params": typed(t["params"])} for t in trials]
    chosen = promote(results)
    print(f"promoting trials {[c['trial'] for c in chosen]} of {len(results)} to the next rung")
    return chosen


def trial_op(train_data: Input[Dataset], train_spec: dict, dataset_spec: dict, tuning_spec: dict, trial: dict,
             run_id: str, budget_factor: int = 1) -> dict:
    """One real training run with the trial's hyperparameters and the tuning budget
    (times `budget_factor` on a later successive-halving rung)."""
    from components.train import job_name, train_where_configured
    from components.tune import typed
    from pipelines.config import Dataset as DatasetConfig
    from pipelines.config import TrainSpec, Tuning

    spec = TrainSpec.model_validate(train_spec).model_dump()
    budget = Tuning.model_validate(tuning_spec).epochs_per_trial * int(budget_factor)
    spec["hyperparameters"] = {**spec["hyperparameters"], **trial["params"], "epochs": budget}
    spec = TrainSpec.model_validate(spec).model_dump()  # a search space value must be a valid hyperparameter
    number = int(trial["trial"])
    name = job_name("trial", run_id, number, f"r{int(budget_factor)}")
    lineage = {"data_hash": train_data.metadata.get("content_hash", ""), "pipeline_run": run_id}
    dataset = DatasetConfig.model_validate(dataset_spec).model_dump()
    # A trial's model is scratch: only its metrics leave this task.
    metadata = train_where_configured(train_data, spec, dataset, name, lineage, model_dir=None)
    return {"trial": number, "params": typed(trial["params"]), "epochs": budget,
            **{k: metadata["metrics"][k] for k in ("val_roc_auc", "val_loss")}}


def select_op(trials: list, train_spec: dict, tracking: dict, env: str, run_id: str,
              screened: Optional[list] = None) -> NamedTuple("SelectOutputs", [("train_spec", dict), ("best", dict)]):
    """Pick the best trial of the last rung, log every trial of every rung to MLflow (a parent run
    with one child per trial) and return the train spec with the winning hyperparameters for the
    full-budget training. `screened` holds the first rung's trials under successive halving."""
    import os
    from collections import namedtuple

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from components.evaluation import experiment_id
    from components.tune import best_trial, typed

    def normalise(items):
        return sorted(({**t, "trial": int(t["trial"]), "epochs": int(t.get("epochs", 0)), "params": typed(t["params"])}
                       for t in items), key=lambda t: t["trial"])

    results, first_rung = normalise(trials), normalise(screened or [])
    best = best_trial(results)
    mlflow.set_tracking_uri(tracking["tracking_uri"])
    # created with its artifacts beside the SQLite store, not in ./mlruns of whatever cwd
    mlflow.set_experiment(experiment_id=experiment_id(tracking["tracking_uri"], tracking["experiment"]))
    with mlflow.start_run(run_name=f"tuning-{run_id}", tags={"flywheel.stage": "tuning", "flywheel.env": env,
                                                            "flywheel.pipeline_run": run_id}):
        mlflow.log_params({f"best.{k}": v for k, v in best["params"].items()})
        mlflow.log_metric("best_val_roc_auc", best["val_roc_auc"])
        for rung, rung_results in enumerate((first_rung, results) if first_rung else (results,), start=1):
            for result in rung_results:
                with mlflow.start_run(run_name=f"trial-{result['trial']}-rung{rung}", nested=True,
                                      tags={"flywheel.stage": "tuning-trial", "flywheel.rung": str(rung)}):
                    mlflow.log_params({**result["params"], "epochs": result["epochs"]})
                    mlflow.log_metrics({"val_roc_auc": result["val_roc_auc"], "val_loss": result["val_loss"]})
    width = max(len(str(r["params"])) for r in first_rung + results)
    for r in first_rung + results:
        marker = "  <- best" if r is best else ""
        print(f"trial {r['trial']:>2}  {str(r['params']):<{width}}  epochs {r['epochs']:>2}  "
              f"val_roc_auc {r['val_roc_auc']:.4f}  val_loss {r['val_loss']:.4f}{marker}")
    spec = dict(train_spec)
    spec["hyperparameters"] = {**train_spec["hyperparameters"], **best["params"]}
    return namedtuple("SelectOutputs", ["train_spec", "best"])(spec, best)
