"""torchrun on this machine: N processes over gloo (nccl on GPUs), restarting the worker group from
the last checkpoint when a worker dies."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

from training.backends.jobs import (
    ENTRY_MODULE,
    TrainingBackend,
    TrainingFailed,
    TrainingJob,
    entry_args,
    read_model_metadata,
)
from training.pods import TORCHRUN_ENV

ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception|Failed)[A-Za-z]*: \S")


def torchrun_command(workers: int, max_restarts: int, args: list[str]) -> list[str]:
    # --standalone: torchrun binds its own rendezvous port and draws a unique rendezvous id, so two
    # jobs started side by side (parallel tuning trials) can never meet in one rendezvous. A port
    # picked beforehand and a shared default id did exactly that: the second job joined the first
    # job's closed rendezvous and torchrun died with "'NoneType' object has no attribute 'is_failed'".
    # training.launch is torch.distributed.run, exiting without the interpreter's last GC
    return [
        sys.executable, "-m", "training.launch", "--standalone",
        "--nnodes", "1", "--nproc-per-node", str(workers),
        "--max-restarts", str(max_restarts),
        "--module", ENTRY_MODULE, *args,
    ]


def run_torchrun(workers: int, max_restarts: int, args: list[str], log=print) -> None:
    """Run the entry point under torchrun and stream its output; raise TrainingFailed on failure."""
    command = torchrun_command(workers, max_restarts, args)
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


class TorchrunBackend(TrainingBackend):
    """The job runs here and writes straight to the model directory (or to scratch)."""

    name = "torchrun"

    def train(self, job: TrainingJob) -> dict:
        if job.model_dir is None:
            with tempfile.TemporaryDirectory() as scratch:
                return self._run(job, scratch)
        shutil.rmtree(job.model_dir, ignore_errors=True)  # a stale attempt's files must not mix in
        return self._run(job, job.model_dir)

    def _run(self, job: TrainingJob, model_dir: str) -> dict:
        run_torchrun(self.spec.workers, self.spec.elastic.max_restarts,
                     entry_args(job.data_path, model_dir, job.entry_spec), log=self.log)
        return read_model_metadata(model_dir)
