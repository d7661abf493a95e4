"""What the fake's training operators share: a test's script for a job (the conditions it walks
through, one per GET, and what its master pod logs), a job on its way along it, and the logs of the
pods the operators create. The Training Operator's PyTorchJobs (kube_pytorchjobs.py) and Kubeflow
Trainer's TrainJobs (kube_trainjobs.py) each script their jobs with these.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tests.fakes.kube_core import FakeApiServer


@dataclass
class JobScript:
    """What the 'operator' does with a job: the conditions it walks through, one per GET."""

    steps: list[str] = field(default_factory=lambda: ["Created", "Running", "Succeeded"])
    reason: str = ""  # of the terminal condition; defaults to the operator's PyTorchJob<Type>
    message: str = ""
    master_log: list[str] = field(default_factory=lambda: ["epoch 1 loss 0.61", "epoch 2 loss 0.52", "done"])
    line_delay: float = 0.01


@dataclass
class ScriptedJob:
    """A created job and how far along its script the operator has moved it (-1: not yet)."""

    obj: dict
    script: JobScript
    step: int = -1


class TrainingOperators(FakeApiServer):
    """The scripts a test sets per job name (`scripts`), and the logs of the operators' pods."""

    def __init__(self):
        super().__init__()
        self.scripts: dict[str, JobScript] = {}

    def pod_script(self, ns: str, labels: dict) -> tuple[JobScript, bool] | None:
        """(the script of the job that owns a pod, whether the pod is its master), or None when no
        operator made it; each operator's fake answers for the pods it labels."""
        return None

    def pod_log(self, ns: str, pod_name: str, labels: dict) -> tuple[list[str], float]:
        found = self.pod_script(ns, labels)
        if found is None:
            return super().pod_log(ns, pod_name, labels)
        script, is_master = found
        return (script.master_log if is_master else [f"{pod_name} ready"]), script.line_delay
