"""Train: launch the DDP entry point through the configured backend and hand the model back to
the pipeline as a KFP Model artifact carrying its lineage."""

from kfp.dsl import Dataset, Input, Model, Output


def train_op(train_data: Input[Dataset], train_spec: dict, dataset_spec: dict, run_id: str,
             model: Output[Model]) -> float:
    """Returns the best validation ROC AUC (the tuning stage compares trials on it)."""
    from components.train import launch

    return launch(train_data, train_spec, dataset_spec, run_id, model)


def launch(train_data, train_spec: dict, dataset_spec: dict, run_id: str, model) -> float:
    import re
    import shutil

    from pipelines.config import Dataset, TrainSpec
    from training import storage
    from training.launchers import train_model

    # KFP passes STRUCT parameters through protobuf, where every number is a double: re-validate.
    train_spec = TrainSpec.model_validate(train_spec).model_dump()
    dataset_spec = Dataset.model_validate(dataset_spec).model_dump()

    job_name = re.sub(r"[^a-z0-9-]", "-", f"flywheel-train-{run_id}".lower())[:52].strip("-")
    lineage = {"data_hash": train_data.metadata.get("content_hash", ""),
               "source_hash": train_data.metadata.get("source_hash", ""), "pipeline_run": run_id}
    if train_spec["backend"] == "pytorchjob":
        # Pods read and write the object store directly, never this launcher pod's disk; the
        # model is then copied into the Model artifact so KFP owns it from here on.
        staging = storage.join(train_spec["staging_uri"], job_name, "model")
        metadata = train_model(train_spec, dataset_spec, train_data.uri, staging, job_name, lineage)
        fs, path = storage.filesystem(staging)
        fs.get(path, model.path, recursive=True)
    else:
        shutil.rmtree(model.path, ignore_errors=True)
        metadata = train_model(train_spec, dataset_spec, train_data.path, model.path, job_name, lineage)
    model.metadata.update({
        "framework": "pytorch",
        "job_name": job_name,
        "data_hash": lineage["data_hash"],
        "hyperparameters": metadata["hyperparameters"],
        "metrics": metadata["metrics"],
        "world_size": metadata["world_size"],
        "backend": train_spec["backend"],
    })
    return float(metadata["metrics"]["val_roc_auc"])
