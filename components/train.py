"""Train: run the DDP entry point through the configured backend and hand the model back to the
pipeline as a KFP Model artifact carrying its lineage."""

from typing import Optional

from kfp.dsl import Dataset, Input, Model, Output


def train_op(train_data: Input[Dataset], train_spec: dict, dataset_spec: dict, run_id: str,
             model: Output[Model], tracking: Optional[dict] = None) -> float:
    """Train the model on the configured backend (torchrun here, a PyTorchJob or TrainJob on a cluster).

    Args:
        train_data: Training rows from split, with their content hash and label mapping.
        train_spec: The environment's training section plus image, namespace and staging URI.
        dataset_spec: The dataset section of the environment's config (target, features).
        run_id: The pipeline run's id, recorded as lineage and hashed into the job name.
        tracking: MLflow tracking URI and experiment: the training run (params, learning curves,
            the training data as a dataset input) is logged there. None logs nothing.

    Returns:
        model: The trained model directory (weights, preprocessing, label mapping, metrics); its
            metadata names the MLflow training run (`mlflow_run_id`).
        Output: The best validation ROC AUC of the run.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    from specs import DatasetSpec, TrackingSpec, TrainSpec
    from stages.tracking import DatasetRef, log_training_run, record_run
    from training.backends import backend_for, build_job

    # KFP passes STRUCT parameters through protobuf, where every number is a double: re-validate.
    spec, dataset = TrainSpec.model_validate(train_spec), DatasetSpec.model_validate(dataset_spec)
    job = build_job(spec, dataset, kind="train", run_id=run_id, data_path=train_data.path, data_uri=train_data.uri,
                    data_metadata=dict(train_data.metadata), model_dir=model.path)
    name, lineage = job.name, job.entry_spec["lineage"]
    metadata = backend_for(spec).train(job)
    model.metadata.update({"framework": "pytorch", "job_name": name, "data_hash": lineage.get("data_hash", ""),
                           "hyperparameters": metadata["hyperparameters"], "metrics": metadata["metrics"],
                           "labels": metadata.get("labels"), "world_size": metadata["world_size"],
                           "backend": spec.backend})
    if tracking:
        data = DatasetRef(train_data.uri, lineage.get("data_hash", ""), context="training", name="train",
                          path=train_data.path, rows=train_data.metadata.get("rows"),
                          source_hash=lineage.get("source_hash", ""))
        mlflow_run = log_training_run(TrackingSpec.model_validate(tracking), spec.env, metadata, [data], model.uri,
                                      backend=spec.backend)
        record_run(model.path, mlflow_run)
        model.metadata["mlflow_run_id"] = mlflow_run
        print(f"training run logged to MLflow: {mlflow_run}")
    return float(metadata["metrics"]["val_roc_auc"])
