"""The training-backend seam: one job description, one interface, whichever place runs it.

A backend owns everything between "train this data with this spec" and "here is the model":
staging the data, launching, waiting, logs, collecting the model and cleaning up.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import storage
from model.artifact import METADATA_FILE
from specs import DatasetSpec, TrainSpec

ENTRY_MODULE = "training.train"
# Kueue admits a job that carries this label through the LocalQueue it names; its webhook creates
# the job suspended (PyTorchJob spec.runPolicy.suspend, TrainJob spec.suspend) and unsuspends it
# once the ClusterQueue has quota (kueue v0.19.2 pkg/controller/constants QueueLabel,
# pkg/controller/jobframework/defaults.go ApplyDefaultForSuspend). We never set suspend ourselves:
# without Kueue installed the label is inert and the job starts at once.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The operators name pods and services `<job>-<replica type>-<index>` (TrainJob: `<job>-node-0-<index>`)
# and Kubernetes caps them at 63 characters: 52 leaves room for the suffix up to index 9999.
JOB_NAME_MAX = 52
RUN_HASH_CHARS = 10
ATTEMPT_CHARS = 5


class TrainingFailed(RuntimeError):
    """The training job failed; the message carries its reason and the tail of its log."""


@dataclass(frozen=True)
class TrainingJob:
    """One training job. `data_path` is the training table readable here; `data_uri` is where it
    already lives (the same path locally, an object-store URI for a KFP artifact on a cluster).
    `model_dir` is where the model must end up on this machine (a KFP Model artifact's path), or
    None for a job whose model is scratch (a tuning trial keeps only its metrics)."""

    name: str
    data_path: str
    data_uri: str
    entry_spec: dict
    model_dir: str | None = None
    annotations: dict = field(default_factory=dict)


def job_name(kind: str, run_id: str, *parts) -> str:
    """A job name for one attempt of one task: `flywheel-<kind>-<hash>[-<parts>]-<attempt>`.

    DNS-1035 (lower-case alphanumerics and '-', starts with a letter, ends alphanumeric) and at
    most JOB_NAME_MAX characters whatever the inputs. `hash` is sha1(run_id)[:10], so a KFP run id
    (a 36-character UUID) never eats the room the parts need; `parts` (trial number, rung) keep
    parallel tasks of one run apart; `attempt` is random, so running the same task again after a
    failure never collides (409 AlreadyExists) with the failed job that keep_job=on_failure kept.
    """
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


def queue_labels(spec: TrainSpec) -> dict[str, str]:
    """The job object's Kueue label when the spec names a queue ({} otherwise): it goes on the
    job's metadata.labels (Kueue reads the job's, not its pods')."""
    return {QUEUE_LABEL: spec.queue_name} if spec.queue_name else {}


def entry_spec(spec: TrainSpec, dataset: DatasetSpec, labels: dict | None, lineage: dict | None = None) -> dict:
    """What the entry point needs: the data's schema and label mapping, hyperparameters and the
    checkpoint policy."""
    return {
        "dataset": {"target": dataset.target, "features": dataset.features.model_dump(), "labels": labels,
                    "id_column": dataset.id_column},
        "hyperparameters": spec.hyperparameters.model_dump(),
        "checkpoint_every_epochs": spec.checkpoint_every_epochs,
        "expect_gpu": spec.resources.gpu.count > 0,
        "lineage": lineage or {},
    }


def build_job(spec: TrainSpec, dataset: DatasetSpec, *, kind: str, run_id: str, data_path: str, data_uri: str,
              data_metadata: dict, parts: tuple = (), model_dir: str | None = None,
              name_seed: str | None = None) -> TrainingJob:
    """The one way a training job is described: the train op, each tuning trial and `flywheel train`.

    `run_id` is the pipeline run (lineage and the `flywheel/pipeline-run` annotation);
    `name_seed` (default `run_id`) is what the job name's hash is drawn from. `data_metadata` is
    the training table's artifact metadata: its `labels` (the mapping split saved), and the
    `content_hash`/`source_hash` recorded as lineage when present (a table the CLI wrote has none).
    """
    name = job_name(kind, name_seed or run_id, *parts)
    hashes = {"data_hash": "content_hash", "source_hash": "source_hash"}
    lineage = {key: data_metadata[source] for key, source in hashes.items() if source in data_metadata}
    lineage.update({"pipeline_run": run_id, "job_name": name})
    return TrainingJob(name, data_path, data_uri, entry_spec(spec, dataset, data_metadata.get("labels"), lineage),
                       model_dir=model_dir, annotations={"flywheel/pipeline-run": run_id})


def entry_args(data_uri: str, model_dir: str, spec: dict) -> list[str]:
    return ["--data", data_uri, "--model-dir", model_dir, "--spec", json.dumps(spec, sort_keys=True)]


def read_model_metadata(model_dir: str) -> dict:
    uri = storage.join(model_dir, METADATA_FILE)
    if not storage.exists(uri):
        raise TrainingFailed(f"training finished but wrote no model to {model_dir}")
    with storage.open_uri(uri) as handle:
        return json.load(handle)


class TrainingBackend(ABC):
    """Runs a TrainingJob to completion and returns the model's metadata (metrics, history)."""

    name: str

    def __init__(self, spec: TrainSpec, log=print):
        self.spec, self.log = spec, log

    @abstractmethod
    def train(self, job: TrainingJob) -> dict:
        """Run `job`, leave the model in `job.model_dir` (if set) and return its metadata."""

    def manifest(self, job: TrainingJob) -> dict:
        """The cluster object `train(job)` would submit; only cluster backends have one."""
        raise TrainingFailed(f"training.backend {self.name!r} runs on this machine and submits no cluster object")
