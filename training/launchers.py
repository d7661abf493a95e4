"""Launchers, chosen by config (`training.backend`): the same entry point, two places to run.

- torchrun: `torch.distributed.run` on this machine, N processes over gloo (or nccl on GPUs),
  restarting the worker group from the last checkpoint when a worker dies.
- pytorchjob: a Kubeflow Training Operator PyTorchJob (training.pytorchjob).
"""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

from training import storage

ENTRY_MODULE = "training.train"
# Every torchrun launch gets this (locally, and in PyTorchJob pods). By default torchrun's workers
# share the agent's rendezvous TCPStore, and a restarted worker group then reads the previous
# group's gloo/nccl addresses from it: restarts die with `connectFullMesh ... Connection refused`
# (pytorch/pytorch#135712). Opting out gives each restarted group a fresh store on rank 0.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception|Failed)[A-Za-z]*: \S")


class TrainingFailed(RuntimeError):
    """The training job failed; the message carries its reason and the tail of its log."""


def entry_args(data_uri: str, model_dir: str, spec: dict) -> list[str]:
    return ["--data", data_uri, "--model-dir", model_dir, "--spec", json.dumps(spec, sort_keys=True)]


def training_spec(train_spec: dict, dataset_spec: dict, lineage: dict | None = None) -> dict:
    """What the entry point needs: the data's schema, hyperparameters and checkpoint policy."""
    return {
        "dataset": {k: dataset_spec[k] for k in ("target", "features")},
        "hyperparameters": train_spec["hyperparameters"],
        "checkpoint_every_epochs": train_spec.get("checkpoint_every_epochs", 1),
        "expect_gpu": train_spec["resources"]["gpu"]["count"] > 0,
        "lineage": lineage or {},
    }


def torchrun_command(workers: int, max_restarts: int, args: list[str]) -> list[str]:
    # --standalone: torchrun binds its own rendezvous port and draws a unique rendezvous id, so two
    # jobs started side by side (parallel tuning trials) can never meet in one rendezvous. A port
    # picked beforehand and a shared default id did exactly that: the second job joined the first
    # job's closed rendezvous and torchrun died with "'NoneType' object has no attribute 'is_failed'".
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nnodes", "1", "--nproc-per-node", str(workers),
        "--max-restarts", str(max_restarts),
        "--module", ENTRY_MODULE, *args,
    ]


def run_torchrun(train_spec: dict, args: list[str], log=print) -> None:
    """Run the entry point under torchrun and stream its output; raise TrainingFailed on failure."""
    command = torchrun_command(train_spec["workers"], train_spec["elastic"]["max_restarts"], args)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
           **TORCHRUN_ENV}
    errors: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            log(line)
            if ERROR_LINE.match(line.strip()):
                errors.append(line.strip())
    if proc.returncode != 0:
        reason = errors[-1] if errors else "no error message (see the log above)"
        raise TrainingFailed(f"training failed (torchrun exit {proc.returncode}): {reason}")


def _pod_env(train_spec: dict) -> dict[str, str]:
    """Plain (non-secret) settings the training pods need besides the credentials secret."""
    endpoint = train_spec.get("object_store_endpoint")
    return {"AWS_ENDPOINT_URL": endpoint} if endpoint else {}


def train_model(train_spec: dict, dataset_spec: dict, data_uri: str, model_dir: str, job_name: str,
                lineage: dict | None = None, log=print) -> dict:
    """Launch training per `train_spec["backend"]`, wait for it, and return the model's metadata.

    `train_spec` is Settings.training as a dict plus `image` and `namespace` for the cluster.
    """
    spec = training_spec(train_spec, dataset_spec, {**(lineage or {}), "job_name": job_name})
    args = entry_args(data_uri, model_dir, spec)
    backend = train_spec["backend"]
    if backend == "torchrun":
        run_torchrun(train_spec, args, log=log)
    elif backend == "pytorchjob":
        from training.pytorchjob import PyTorchJobLauncher

        # Pods run `torchrun --module training.train` themselves (PET_* env from the operator).
        run = (lineage or {}).get("pipeline_run")  # job names are hashed: kubectl finds the run here
        PyTorchJobLauncher(train_spec, namespace=train_spec["namespace"], image=train_spec["image"],
                           annotations={"flywheel/pipeline-run": run} if run else None).run(
            job_name, args, env=_pod_env(train_spec)
        )
    else:
        raise ValueError(f"unknown training backend {backend!r}; allowed: torchrun, pytorchjob")
    metadata_uri = storage.join(model_dir, "metadata.json")
    if not storage.exists(metadata_uri):
        raise TrainingFailed(f"training finished but wrote no model to {model_dir}")
    with storage.open_uri(metadata_uri) as handle:  # not training.artifact: launchers stay torch-free
        return json.load(handle)
