"""Train: launch the DDP entry point through the configured backend and hand the model back to
the pipeline as a KFP Model artifact carrying its lineage."""

from kfp.dsl import Dataset, Input, Model, Output

# The Training Operator names pods and services `<job>-<replica type>-<index>` and Kubernetes caps
# them at 63 characters: 52 leaves room for `-worker-<index>` up to index 9999.
JOB_NAME_MAX = 52
RUN_HASH_CHARS = 10
ATTEMPT_CHARS = 5


def job_name(kind: str, run_id: str, *parts) -> str:
    """A PyTorchJob name for one attempt of one task: `flywheel-<kind>-<hash>[-<parts>]-<attempt>`.

    DNS-1035 (lower-case alphanumerics and '-', starts with a letter, ends alphanumeric) and at
    most JOB_NAME_MAX characters whatever the inputs. `hash` is sha1(run_id)[:10], so a KFP run id
    (a 36-character UUID) never eats the room the parts need; `parts` (trial number, rung) keep
    parallel tasks of one run apart; `attempt` is random, so running the same task again after a
    failure never collides (409 AlreadyExists) with the failed job that keep_job=on_failure kept.
    """
    import hashlib
    import re
    import secrets
    import string

    def label(value) -> str:
        return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", str(value).lower())).strip("-")

    run_hash = hashlib.sha1(str(run_id).encode()).hexdigest()[:RUN_HASH_CHARS]
    attempt = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(ATTEMPT_CHARS))
    readable = "-".join(p for p in (label(kind) or "job", run_hash, *map(label, parts)) if p)
    room = JOB_NAME_MAX - len("flywheel-") - len(attempt) - 1
    if len(readable) > room:
        # Over-long parts: keep what fits and a hash of the whole, so the name stays unique per input.
        digest = hashlib.sha1(readable.encode()).hexdigest()[:8]
        readable = f"{readable[:room - len(digest) - 1].rstrip('-')}-{digest}"
    return f"flywheel-{readable}-{attempt}"


def collect_model(staging: str, model_dir: str) -> None:
    """Copy the model files the pods wrote under `staging` (an object-store prefix) flat into
    `model_dir` (a local directory, the KFP artifact's path), then delete the staging prefix.

    Neither `fs.get(dir, model_dir, recursive=True)` form is right here: it lands the files flat
    only while `model_dir` does not exist (KFP creates just its parent), and nests them in
    `model_dir/<name>/` when it does. Only the files directly under `staging` are the model;
    anything below it (checkpoints kept by keep_checkpoints) is the job's scratch.
    """
    import os
    import shutil

    from training import storage
    from training.artifact import METADATA_FILE

    fs, path = storage.filesystem(staging)
    files = [entry["name"] for entry in fs.ls(path, detail=True) if entry["type"] == "file"]
    shutil.rmtree(model_dir, ignore_errors=True)  # a stale attempt's files must not mix in
    os.makedirs(model_dir)
    for source in files:
        fs.get_file(source, os.path.join(model_dir, source.rstrip("/").rsplit("/", 1)[-1]))
    if not os.path.isfile(os.path.join(model_dir, METADATA_FILE)):
        raise RuntimeError(f"no {METADATA_FILE} in the model copied from {staging} to {model_dir} "
                           f"(found {sorted(os.listdir(model_dir))}): the training job did not write a complete model")


def train_op(train_data: Input[Dataset], train_spec: dict, dataset_spec: dict, run_id: str,
             model: Output[Model]) -> float:
    """Returns the best validation ROC AUC (the tuning stage compares trials on it)."""
    from components.train import launch

    return launch(train_data, train_spec, dataset_spec, run_id, model)


def train_where_configured(train_data, spec: dict, dataset_spec: dict, name: str, lineage: dict,
                           model_dir: str | None) -> dict:
    """Run one training job on the configured backend and return its metadata; the model ends up
    in `model_dir`, or nowhere when None (a tuning trial keeps only its metrics).

    pytorchjob: pods read and write the object store, never this task pod's disk; the model is
    copied from the job's staging prefix, which then goes (a failed attempt's prefix stays beside
    its kept job). torchrun: the job runs here and writes straight to the local path."""
    import shutil
    import tempfile

    from components.train import collect_model
    from training import storage
    from training.launchers import train_model

    if spec["backend"] == "pytorchjob":
        job_prefix = storage.join(spec["staging_uri"], name)
        staging = storage.join(job_prefix, "model")
        metadata = train_model(spec, dataset_spec, train_data.uri, staging, name, lineage)
        if model_dir is not None:
            collect_model(staging, model_dir)
        storage.remove(job_prefix)
        return metadata
    if model_dir is None:
        with tempfile.TemporaryDirectory() as scratch:
            return train_model(spec, dataset_spec, train_data.path, scratch, name, lineage)
    shutil.rmtree(model_dir, ignore_errors=True)
    return train_model(spec, dataset_spec, train_data.path, model_dir, name, lineage)


def launch(train_data, train_spec: dict, dataset_spec: dict, run_id: str, model) -> float:
    from components.train import job_name, train_where_configured
    from pipelines.config import Dataset, TrainSpec

    # KFP passes STRUCT parameters through protobuf, where every number is a double: re-validate.
    train_spec = TrainSpec.model_validate(train_spec).model_dump()
    dataset_spec = Dataset.model_validate(dataset_spec).model_dump()

    name = job_name("train", run_id)
    lineage = {"data_hash": train_data.metadata.get("content_hash", ""),
               "source_hash": train_data.metadata.get("source_hash", ""), "pipeline_run": run_id}
    metadata = train_where_configured(train_data, train_spec, dataset_spec, name, lineage, model.path)
    model.metadata.update({
        "framework": "pytorch",
        "job_name": name,
        "data_hash": lineage["data_hash"],
        "hyperparameters": metadata["hyperparameters"],
        "metrics": metadata["metrics"],
        "world_size": metadata["world_size"],
        "backend": train_spec["backend"],
    })
    return float(metadata["metrics"]["val_roc_auc"])
