"""Training backends, chosen once by `training.backend`; nothing else branches on the name.

    torchrun     this machine: torchrun processes (training.backends.torchrun)
    pytorchjob   Kubeflow Training Operator v1 PyTorchJob (training.backends.pytorchjob)
    trainjob     Kubeflow Trainer v2 TrainJob (training.backends.trainjob)
"""
from __future__ import annotations

from importlib import import_module

from specs import TrainSpec
from training.backends.jobs import TrainingBackend, TrainingFailed, TrainingJob, build_job, entry_spec, job_name

_BACKENDS = {
    "torchrun": ("training.backends.torchrun", "TorchrunBackend"),
    "pytorchjob": ("training.backends.pytorchjob", "PyTorchJobBackend"),
    "trainjob": ("training.backends.trainjob", "TrainJobBackend"),
}


def backend_for(spec: TrainSpec, log=print, **options) -> TrainingBackend:
    """The backend `spec.backend` names, imported on demand (the cluster SDKs are heavy)."""
    module, cls = _BACKENDS[spec.backend]
    return getattr(import_module(module), cls)(spec, log, **options)


__all__ = ["TrainingBackend", "TrainingFailed", "TrainingJob", "backend_for", "build_job", "entry_spec", "job_name"]
