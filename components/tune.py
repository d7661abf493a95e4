"""Tuning: proposed trials trained in parallel (dsl.ParallelFor), successive halving's second rung,
the winner picked on the validation split and logged to MLflow. Thin wrappers over `stages.tuning`."""
from typing import NamedTuple, Optional

from kfp.dsl import Dataset, Input


def propose_op(tuning_spec: dict, train_spec: dict) -> list:
    """Propose the first rung of trials from the search space.

    Args:
        tuning_spec: Strategy (grid, random, successive_halving), trial count and search space.
        train_spec: The environment's training section; its hyperparameter seed drives the proposals.

    Returns:
        Output: The trials to run, each a dict {trial, params}.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    from specs import TrainSpec, TuningSpec
    from stages.tuning import proposals

    return proposals(TuningSpec.model_validate(tuning_spec), TrainSpec.model_validate(train_spec).hyperparameters.seed)


def promote_op(trials: list) -> list:
    """Successive halving: carry the best third of the first rung into the second.

    Args:
        trials: The first rung's results.

    Returns:
        Output: The trials to run again on the larger budget, each a dict {trial, params}.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    from stages.tuning import normalise, promote

    results = normalise(trials)
    chosen = promote(results)
    print(f"promoting trials {[c['trial'] for c in chosen]} of {len(results)} to the next rung")
    return chosen


def trial_op(train_data: Input[Dataset], train_spec: dict, dataset_spec: dict, tuning_spec: dict, trial: dict,
             run_id: str, budget_factor: int = 1) -> dict:
    """Train one trial's hyperparameters on the tuning budget; its model is scratch, its metrics the result.

    Args:
        train_data: Training rows from split (the test split never reaches tuning).
        train_spec: The environment's training section plus image, namespace and staging URI.
        dataset_spec: The dataset section of the environment's config (target, features).
        tuning_spec: Budget (epochs_per_trial) and search space.
        trial: The trial to run: {trial, params}.
        run_id: The pipeline run's id, hashed into the job name.
        budget_factor: Multiplies the epoch budget on a later successive-halving rung.

    Returns:
        Output: {trial, params, epochs, val_roc_auc, val_loss, history}.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    from specs import DatasetSpec, TrainSpec, TuningSpec
    from stages.tuning import trial_spec, typed
    from training.backends import backend_for, build_job

    params = typed(trial["params"])
    spec = trial_spec(TrainSpec.model_validate(train_spec), TuningSpec.model_validate(tuning_spec), params,
                      int(budget_factor))
    number = int(trial["trial"])
    # No model_dir: a trial's model is scratch, its metrics are the result.
    job = build_job(spec, DatasetSpec.model_validate(dataset_spec), kind="trial", run_id=run_id,
                    data_path=train_data.path, data_uri=train_data.uri, data_metadata=dict(train_data.metadata),
                    parts=(number, f"r{int(budget_factor)}"))
    metadata = backend_for(spec).train(job)
    return {"trial": number, "params": params, "epochs": spec.hyperparameters.epochs,
            **{k: metadata["metrics"][k] for k in ("val_roc_auc", "val_loss")}, "history": metadata.get("history", [])}


def select_op(trials: list, train_spec: dict, tracking: dict, env: str, run_id: str,
              screened: Optional[list] = None) -> NamedTuple("SelectOutputs", [("train_spec", dict), ("best", dict)]):
    """Pick the best trial of the last rung, log every trial to MLflow, hand the winner to training.

    Args:
        trials: The last rung's results.
        train_spec: The environment's training section plus image, namespace and staging URI.
        tracking: MLflow tracking URI and experiment.
        env: The environment's name, recorded as a tag.
        run_id: The pipeline run's id, recorded as a tag.
        screened: The first rung's results under successive halving, logged too.

    Returns:
        train_spec: The train spec with the winning hyperparameters.
        best: The winning trial.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import os
    from collections import namedtuple

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from specs import TrainSpec
    from stages.tuning import best_trial, log_trials, normalise, trial_table, with_best

    results, first_rung = normalise(trials), normalise(screened or [])
    best = best_trial(results)
    rungs = [first_rung, results] if first_rung else [results]
    log_trials(tracking["tracking_uri"], tracking["experiment"], env, run_id, rungs, best)
    print("\n".join(trial_table(rungs, best)))
    spec = with_best(TrainSpec.model_validate(train_spec), best).model_dump(mode="json", exclude_none=True)
    best = {k: v for k, v in best.items() if k != "history"}
    return namedtuple("SelectOutputs", ["train_spec", "best"])(spec, best)
