"""Waiting through a Kueue queue: a queued (suspended) job is waiting, not failing.

A job labelled `kueue.x-k8s.io/queue-name` is created suspended by Kueue's webhook (PyTorchJob
`spec.runPolicy.suspend`, TrainJob `spec.suspend`; kueue v0.19.2
pkg/controller/jobframework/defaults.go ApplyDefaultForSuspend) and unsuspended when its
ClusterQueue admits it; preemption (another env reclaiming its quota) suspends it again. The
operators then report a `Suspended` condition (True while suspended, reason
`PyTorchJobSuspended`/`Suspended`; False after, reason `PyTorchJobResumed`/`Resumed`: Training
Operator v1.9 pkg/controller.v1/common/job.go, Trainer v2.3 trainjob_controller.go). Neither
operator starts the active deadline before admission (the Training Operator sets `startTime` on
resume, Trainer counts from the Suspended condition's flip to False), so our wait timeout must not
either: queued time is bounded separately by QUEUE_WAIT_MAX_SECONDS.
"""
from __future__ import annotations

import time
from collections.abc import Callable

# How long a job may wait in its queue (suspended, not admitted) before the task gives up on it.
QUEUE_WAIT_MAX_SECONDS = 24 * 3600

WaitFor = Callable[[Callable[[dict], bool], float, Callable[[dict], None]], dict]


def suspended(job: dict) -> bool:
    """True while the job is suspended. The spec's flag is what Kueue toggles, so it decides; the
    operator's `Suspended` condition (which lags it by a reconcile) only when the flag is absent."""
    spec = job.get("spec") or {}
    flag = spec.get("suspend", (spec.get("runPolicy") or {}).get("suspend"))
    if flag is not None:
        return flag is True
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") == "Suspended"]
    return bool(conditions) and conditions[-1].get("status") == "True"


class QueueWatch:
    """Says once when a job starts waiting in its queue and once when it is admitted."""

    def __init__(self, kind: str, name: str, queue: str | None, say: Callable[[str], None]):
        self.kind, self.name, self.queue, self.say = kind, name, queue, say
        self.queued = False

    def see(self, job: dict) -> None:
        now = suspended(job)
        if now and not self.queued:
            where = f"queued in {self.queue} (waiting for quota)" if self.queue else "suspended (waiting to be resumed)"
            self.say(f"{self.kind} {self.name}: {where}")
        elif self.queued and not now:
            source = f" from {self.queue}" if self.queue else ""
            self.say(f"{self.kind} {self.name}: admitted{source}; starting")
        self.queued = now


def wait_through_queue(wait_for: WaitFor, terminal: Callable[[dict], bool], timeout: float,
                       watch: QueueWatch, on_poll: Callable[[dict], None],
                       queue_timeout: float = QUEUE_WAIT_MAX_SECONDS) -> dict:
    """Poll until `terminal(job)`; time spent queued counts against `queue_timeout`, the rest
    against `timeout`.

    Args:
        wait_for: `wait_for(done, timeout, on_poll)` polls the job until `done(job)` and returns
            it (TimeoutError after `timeout`), as `gateways.kube_api.KubeApi.wait_for` does.
        terminal: Whether the job succeeded or failed.
        timeout: Seconds the job may run (not counting queued time).
        watch: Tracks and announces queued/admitted.
        on_poll: Called with each polled job.
        queue_timeout: Seconds one stay in the queue may last.

    Raises:
        TimeoutError: Running for longer than `timeout` in all, or queued for longer than
            `queue_timeout` at once; the message says which.
    """
    left = float(timeout)

    def seen(job: dict) -> None:
        watch.see(job)
        on_poll(job)

    while True:
        queued = watch.queued  # one segment per state: it ends when the job ends or changes state
        started = time.monotonic()
        try:
            job = wait_for(lambda j, q=queued: terminal(j) or suspended(j) != q,
                           queue_timeout if queued else max(left, 0.0), seen)
        except TimeoutError as err:
            if queued:
                raise TimeoutError(f"{watch.kind} {watch.name} still queued in {watch.queue or 'its queue'} "
                                   f"after {queue_timeout:.0f}s (no quota freed)") from err
            # The poll's own message names only this segment's share of `timeout`.
            raise TimeoutError(f"{watch.kind} {watch.name} not done after running {timeout:.0f}s") from err
        if not queued:
            left -= time.monotonic() - started
        if terminal(job):
            return job
        if left <= 0 and not watch.queued:
            raise TimeoutError(f"{watch.kind} {watch.name} not done after running {timeout:.0f}s")
