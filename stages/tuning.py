"""Tuning as plain Python: propose trials from the search space, carry the best of a rung into the
next, pick the winner on the validation split, log every trial to MLflow as a child run. The
held-out test split never reaches this stage.

Successive halving runs two rungs: every trial on the small budget, then the best third again on
`HALVING_ETA` times the budget, so most of the compute goes to the promising configurations."""
import itertools
import random

from specs import Hyperparameters, TrainSpec, TuningSpec

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
    return {k: getattr(Hyperparameters.model_validate({k: v}), k) for k, v in params.items()}


def proposals(tuning: TuningSpec, seed: int) -> list[dict]:
    """The first rung's trials: each a dict {trial, params}."""
    space = {k: list(v) for k, v in tuning.search_space.items()}
    return [{"trial": i, "params": p} for i, p in enumerate(propose(space, tuning.strategy, tuning.trials, seed))]


def normalise(trials: list[dict]) -> list[dict]:
    """Trial results as they come back from KFP (numbers as floats) with their declared types."""
    return sorted(({**t, "trial": int(t["trial"]), "epochs": int(t.get("epochs", 0)), "params": typed(t["params"])}
                   for t in trials), key=lambda t: t["trial"])


def trial_spec(spec: TrainSpec, tuning: TuningSpec, params: dict, budget_factor: int = 1) -> TrainSpec:
    """The train spec for one trial: its hyperparameters on the tuning budget (times
    `budget_factor` on a later rung); a search-space value must be a valid hyperparameter."""
    epochs = tuning.epochs_per_trial * int(budget_factor)
    hyperparameters = {**spec.hyperparameters.model_dump(), **params, "epochs": epochs}
    return TrainSpec.model_validate({**spec.model_dump(), "hyperparameters": hyperparameters})


def with_best(spec: TrainSpec, best: dict) -> TrainSpec:
    """The full-budget train spec with the winning trial's hyperparameters."""
    return TrainSpec.model_validate({**spec.model_dump(),
                                     "hyperparameters": {**spec.hyperparameters.model_dump(), **best["params"]}})


def log_trials(tracking_uri: str, experiment: str, env: str, run_id: str, rungs: list[list[dict]], best: dict) -> str:
    """One MLflow parent run for the search, a child per trial of every rung; returns the parent's id."""
    from gateways import mlflow_api
    from gateways.mlflow_api import Point
    from stages.tracking import experiment_id

    experiment = experiment_id(tracking_uri, experiment)
    with mlflow_api.run(tracking_uri, experiment, f"tuning-{run_id}",
                        {"flywheel.stage": "tuning", "flywheel.env": env, "flywheel.pipeline_run": run_id}) as parent:
        parent.log(params={f"best.{k}": v for k, v in best["params"].items()},
                   metrics=[Point("best_val_roc_auc", best["val_roc_auc"])])
        for rung, results in enumerate(rungs, start=1):
            for result in results:
                with mlflow_api.run(tracking_uri, experiment, f"trial-{result['trial']}-rung{rung}",
                                    {"flywheel.stage": "tuning-trial", "flywheel.rung": str(rung)},
                                    parent_run_id=parent.run_id) as trial:
                    curves = [Point(k, point[k], step) for step, point in enumerate(result.get("history") or [], 1)
                              for k in ("train_loss", "val_loss", "val_roc_auc") if k in point]
                    # The trial's result (its best epoch's) under its own names: logged as
                    # val_roc_auc at step 0 it would add a point to the curve, and the run
                    # would still show the last epoch's value (MLflow's latest = highest step).
                    trial.log(params={**result["params"], "epochs": result["epochs"]},
                              metrics=[*curves, Point("best_val_roc_auc", result["val_roc_auc"]),
                                       Point("best_val_loss", result["val_loss"])])
        return parent.run_id


def trial_table(rungs: list[list[dict]], best: dict) -> list[str]:
    """One line per trial of every rung, the winner marked."""
    trials = [r for rung in rungs for r in rung]
    width = max(len(str(r["params"])) for r in trials)
    return [f"trial {r['trial']:>2}  {str(r['params']):<{width}}  epochs {r['epochs']:>2}  "
            f"val_roc_auc {r['val_roc_auc']:.4f}  val_loss {r['val_loss']:.4f}{'  <- best' if r is best else ''}"
            for r in trials]
