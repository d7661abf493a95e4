"""Train: run the DDP entry point through the configured backend and hand the model back to the
pipeline as a KFP Model artifact carrying its lineage."""

from kfp.dsl import Dataset, Input, Model, Output


def train_op(train_data: Input[Dataset], train_spec: dict, dataset_spec: dict, run_id: str,
             model: Output[Model]) -> float:
    """Train the model on the configured backend (torchrun here, a PyTorchJob or TrainJob on a cluster).

    Args:
        train_data: Training rows from split, with their content hash and label mapping.
        train_spec: The environment's training section plus image, namespace and staging URI.
        dataset_spec: The dataset section of the environment's config (target, features).
        run_id: The pipeline run's id, recorded as lineage and hashed into the job name.
        model: The trained model directory (weights, preprocessing, label mapping, metrics).

    Returns:
        The best validation ROC AUC of the run.
    """
    from specs import DatasetSpec, TrainSpec
    from training.backends import TrainingJob, backend_for, entry_spec, job_name

    # KFP passes STRUCT parameters through protobuf, where every number is a double: re-validate.
    spec, dataset = TrainSpec.model_validate(train_spec), DatasetSpec.model_validate(dataset_spec)
    name = job_name("train", run_id)
    lineage = {"data_hash": train_data.metadata.get("content_hash", ""),
               "source_hash": train_data.metadata.get("source_hash", ""), "pipeline_run": run_id, "job_name": name}
    job = TrainingJob(name, train_data.path, train_data.uri, entry_spec(spec, dataset, train_data.metadata.get("labels"),
                                                                        lineage),
                      model_dir=model.path, annotations={"flywheel/pipeline-run": run_id})
    metadata = backend_for(spec).train(job)
    model.metadata.update({"framework": "pytorch", "job_name": name, "data_hash": lineage["data_hash"],
                           "hyperparameters": metadata["hyperparameters"], "metrics": metadata["metrics"],
                           "labels": metadata.get("labels"), "world_size": metadata["world_size"],
                           "backend": spec.backend})
    return float(metadata["metrics"]["val_roc_auc"])
