"""What every cluster backend shares: staging through the object store, submit, log streaming,
waiting for a terminal condition, failure reasons, collecting the model and keep_job clean-up.

A subclass speaks one API (PyTorchJob through `kubeflow-training`, TrainJob through the
Kubernetes custom-objects API): `build`, `validate`, `create`, `wait`, `follow_log`, `delete`.
Pods read data and write the model through object-store URIs, never this task pod's disk.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
from abc import abstractmethod
from collections.abc import Callable

import storage
from model.artifact import METADATA_FILE
from specs import TrainSpec
from training.backends.jobs import TrainingBackend, TrainingFailed, TrainingJob, entry_args, read_model_metadata
from training.pods import pod_env

KEEP_JOB = ("always", "on_failure", "never")


class TrainingJobInvalid(ValueError):
    """A rendered job breaks its API's schema or our rules; each line names the JSON path."""

    def __init__(self, kind: str, problems: list[str]):
        self.kind, self.problems = kind, problems
        super().__init__(f"invalid {kind}:\n  " + "\n  ".join(problems))


class TrainingJobFailed(TrainingFailed):
    """The cluster job failed, timed out or could not be created; carries the operator's reason."""

    def __init__(self, kind: str, job_name: str, namespace: str, reason: str, message: str,
                 status: dict | None = None):
        self.kind, self.job_name, self.namespace, self.reason, self.message = kind, job_name, namespace, reason, message
        self.status = status or {}
        super().__init__(f"{kind} {namespace}/{job_name} failed: {reason}: {message}")


def collect_model(staging: str, model_dir: str) -> None:
    """Copy the model files the pods wrote under `staging` (an object-store prefix) flat into
    `model_dir` (a local directory, the KFP artifact's path).

    Neither `fs.get(dir, model_dir, recursive=True)` form is right here: it lands the files flat
    only while `model_dir` does not exist (KFP creates just its parent), and nests them in
    `model_dir/<name>/` when it does. Only the files directly under `staging` are the model;
    anything below it (checkpoints) is the job's scratch.
    """
    fs, path = storage.filesystem(staging)
    files = [entry["name"] for entry in fs.ls(path, detail=True) if entry["type"] == "file"]
    shutil.rmtree(model_dir, ignore_errors=True)  # a stale attempt's files must not mix in
    os.makedirs(model_dir)
    for source in files:
        fs.get_file(source, os.path.join(model_dir, source.rstrip("/").rsplit("/", 1)[-1]))
    if not os.path.isfile(os.path.join(model_dir, METADATA_FILE)):
        raise RuntimeError(f"no {METADATA_FILE} in the model copied from {staging} to {model_dir} "
                           f"(found {sorted(os.listdir(model_dir))}): the training job did not write a complete model")


def one_line(err: BaseException, limit: int = 500) -> str:
    """`Type: message` on one line, so a failed submit reads as one line in the task log. The API's
    multi-line errors keep status, reason and body; response headers are noise and dropped."""
    lines = [line for line in str(err).splitlines() if not line.startswith("HTTP response headers")]
    text = " ".join(" ".join(lines).split()) or "no message"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


def condition(status: dict, kind: str) -> dict | None:
    matches = [c for c in status.get("conditions") or [] if c.get("type") == kind and c.get("status") == "True"]
    return matches[-1] if matches else None


class ClusterBackend(TrainingBackend):
    """`wait_timeout` defaults to the job's active deadline plus a grace period: the operator
    enforces the deadline itself, our timeout only catches a stuck operator."""

    kind: str
    GRACE_SECONDS = 300
    SUCCEEDED, FAILED = "Succeeded", "Failed"

    def __init__(self, spec: TrainSpec, log=print, *, wait_timeout: float | None = None, poll_interval: float = 10.0,
                 log_drain_timeout: float = 30.0, out=None):
        super().__init__(spec, log)
        self.namespace = spec.namespace
        self.wait_timeout = wait_timeout or spec.active_deadline_seconds + self.GRACE_SECONDS
        self.poll_interval = min(poll_interval, self.wait_timeout)
        self.log_drain_timeout = log_drain_timeout
        self.out = out or sys.stdout

    # -- what a subclass implements ----------------------------------------------------------

    @abstractmethod
    def build(self, name: str, args: list[str], env: dict[str, str], annotations: dict) -> dict:
        """The job object as the API receives it (a plain dict), not yet validated."""

    @abstractmethod
    def validate(self, obj: dict) -> None:
        """Raise TrainingJobInvalid listing every problem with its JSON path."""

    @abstractmethod
    def create(self, obj: dict) -> None: ...

    @abstractmethod
    def wait(self, name: str, timeout: float, poll: float, on_poll: Callable[[dict], None]) -> dict:
        """Block until the job is Succeeded or Failed and return its status; TimeoutError after
        `timeout`, RuntimeError when the API stops answering about it."""

    @abstractmethod
    def follow_log(self, name: str) -> bool:
        """Stream the first node's log once its pod started; False while it has not."""

    @abstractmethod
    def delete(self, name: str) -> None: ...

    # -- the job's life ----------------------------------------------------------------------

    def prefix(self, job: TrainingJob) -> str:
        return storage.join(self.spec.staging_uri, job.name)

    def staging(self, job: TrainingJob) -> tuple[str, str]:
        """(data URI the pods read, model URI they write): data already on the object store is read
        where it is; a local file is uploaded beside the job's model."""
        prefix = self.prefix(job)
        data = job.data_uri if "://" in job.data_uri else storage.join(prefix, "data.parquet")
        return data, storage.join(prefix, "model")

    def manifest(self, job: TrainingJob) -> dict:
        data, model = self.staging(job)
        obj = self.build(job.name, entry_args(data, model, job.entry_spec), pod_env(self.spec), job.annotations)
        self.validate(obj)
        return obj

    def train(self, job: TrainingJob) -> dict:
        data, model = self.staging(job)
        try:
            obj = self.manifest(job)  # validated before anything reaches the cluster
        except TrainingJobInvalid:
            raise
        except Exception as err:  # a missing CRD schema, a bad env: one line, as a failed create
            raise TrainingJobFailed(self.kind, job.name, self.namespace, "CreateFailed", one_line(err)) from err
        if data != job.data_uri:
            with open(job.data_path, "rb") as src, storage.open_uri(data, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        self.run(obj)
        metadata = read_model_metadata(model)
        if job.model_dir is not None:
            collect_model(model, job.model_dir)
        storage.remove(self.prefix(job))  # a failed attempt's prefix stays beside its kept job
        return metadata

    def _say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    def _follow_logs(self, name: str, finished: threading.Event) -> None:
        try:
            while True:
                done = finished.is_set()  # read before looking, so a finished job gets one last look
                if self.follow_log(name) or done:
                    return
                finished.wait(self.poll_interval)
        except Exception as err:  # logs are a convenience; the job's outcome comes from its status
            print(f"warning: could not stream logs of {name}: {err}", file=sys.stderr, flush=True)

    def run(self, obj: dict) -> dict:
        """Create the job, stream its log, wait for it and clean up; return its final status or
        raise TrainingJobFailed."""
        name = obj["metadata"]["name"]
        try:
            self.create(obj)
        except Exception as err:  # API errors, a bad client config: one line, not a traceback
            raise TrainingJobFailed(self.kind, name, self.namespace, "CreateFailed", one_line(err)) from err
        self._say(f"{self.kind} {self.namespace}/{name} created; waiting up to {self.wait_timeout:.0f}s")

        seen: set[tuple] = set()

        def on_poll(status: dict) -> None:
            for cond in status.get("conditions") or []:
                key = (cond.get("type"), cond.get("status"), cond.get("reason"))
                if cond.get("status") == "True" and key not in seen:
                    seen.add(key)
                    self._say(f"{self.kind} {name}: {cond.get('type')} ({cond.get('reason')}) "
                              f"{cond.get('message') or ''}".rstrip())

        finished = threading.Event()
        logs = threading.Thread(target=self._follow_logs, args=(name, finished), daemon=True, name=f"logs-{name}")
        logs.start()
        outcome, status, why = "interrupted", {}, ""
        try:
            try:
                status = self.wait(name, self.wait_timeout, self.poll_interval, on_poll)
                outcome = "succeeded" if condition(status, self.SUCCEEDED) else "failed"
            except TimeoutError as err:  # its message says why: still running, or still queued
                outcome, why = "timeout", str(err)
            except RuntimeError as err:  # the API stopped answering about the job (or it vanished)
                outcome, status = "lost", {"error": str(err)}
            finally:
                finished.set()
            if outcome in ("succeeded", "failed"):  # the log ends with the container: let it drain
                logs.join(self.log_drain_timeout)
        finally:
            # A job we stopped waiting on is deleted first, which also ends its log stream.
            self._clean_up(name, outcome)
        if outcome == "failed":
            cond = condition(status, self.FAILED) or {}
            raise TrainingJobFailed(self.kind, name, self.namespace, cond.get("reason") or "Failed",
                                    cond.get("message") or "no message from the operator", status)
        if outcome == "timeout":
            raise TrainingJobFailed(self.kind, name, self.namespace, "Timeout",
                                    why or f"not finished after {self.wait_timeout:.0f}s", status)
        if outcome == "lost":
            raise TrainingJobFailed(self.kind, name, self.namespace, "WatchFailed", status["error"], status)
        return status

    def _clean_up(self, name: str, outcome: str) -> None:
        """keep_job: always | on_failure (keep a failed job and its pods to read) | never.
        A job we stopped waiting on (timeout, interrupt, lost watch) may still hold GPUs, so it
        goes unless keep_job is always."""
        keep = self.spec.keep_job
        if not (keep == "never" or (keep == "on_failure" and outcome != "failed")):
            self._say(f"{self.kind} {self.namespace}/{name} kept (keep_job={keep}, {outcome})")
            return
        try:
            self.delete(name)
            self._say(f"{self.kind} {self.namespace}/{name} deleted (keep_job={keep}, {outcome})")
        except Exception as err:  # never hide the job's own outcome behind a clean-up error
            print(f"warning: could not delete {name}: {err}", file=sys.stderr, flush=True)
