"""The fake KFP API's recurring runs (what `flywheel schedule` creates): created with the checks
the backend makes on any run (kfp_runs.py) plus its own (max_concurrency 1-10, exactly one trigger,
a cron robfig/cron can parse), listed by experiment or namespace, read and deleted.
"""
from __future__ import annotations

import re

from kfp_server_api import models

from tests.fakes.kfp_contract import ApiError, now, to_json
from tests.fakes.kfp_core import Recorded, Route
from tests.fakes.kfp_runs import Runs

CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-LW#]+$")


def robfig_cron_errors(cron: str) -> str | None:
    """robfig/cron v1 `Parse`: 6 fields (seconds first), or 5 when day-of-week is left out."""
    fields = cron.split()
    if cron.startswith("@"):
        return None
    if len(fields) not in (5, 6) or not all(CRON_FIELD.match(f) for f in fields):
        return f"Expected 5 or 6 fields, found {len(fields)}: {cron}"
    return None


class RecurringRuns(Runs):
    """Recurring runs in `recurring_runs` (by id)."""

    def __init__(self, multi_user: bool = False):
        super().__init__(multi_user)
        self.recurring_runs: dict[str, models.V2beta1RecurringRun] = {}

    def routes(self) -> list[Route]:
        return [
            *super().routes(),
            Route(r"/recurringruns", "POST",
                  lambda rec, m, raw, ct: self._create_recurring_run(self._json(rec, raw, "V2beta1RecurringRun"))),
            Route(r"/recurringruns", "GET", self._list_recurring_runs),
            Route(r"/recurringruns/([^/:]+)", "GET",
                  lambda rec, m, raw, ct: (200, to_json(self._get(self.recurring_runs, m[1], "RecurringRun")))),
            Route(r"/recurringruns/([^/:]+)", "DELETE", self._delete_recurring_run),
        ]

    def _list_recurring_runs(self, rec: Recorded, match, raw: bytes, content_type: str) -> tuple[int, dict]:
        q = rec.query
        found = list(self.recurring_runs.values())
        if q.get("experiment_id"):
            found = [r for r in found if r.experiment_id == q["experiment_id"]]
        elif q.get("namespace"):
            found = [r for r in found if r.namespace == q["namespace"]]
        return self._list(found, q, "recurring_runs", models.V2beta1ListRecurringRunsResponse)

    def _delete_recurring_run(self, rec: Recorded, match, raw: bytes, content_type: str) -> tuple[int, dict]:
        self._get(self.recurring_runs, match[1], "RecurringRun")
        del self.recurring_runs[match[1]]
        return 200, {}

    def _create_recurring_run(self, job) -> tuple[int, dict]:
        self._check_job(job)
        concurrency = int(job.max_concurrency or 0)
        if not 1 <= concurrency <= 10:
            raise ApiError(400, "Invalid input error: The max concurrency of the recurring run is out of range. "
                                f"Support 1-10. Received {concurrency}.")
        trigger = job.trigger
        if trigger is None or (trigger.cron_schedule is None) == (trigger.periodic_schedule is None):
            raise ApiError(400, "Invalid input error: exactly one of cron_schedule or periodic_schedule is required")
        if trigger.cron_schedule is not None:
            problem = robfig_cron_errors(trigger.cron_schedule.cron or "")
            if problem:
                raise ApiError(400, "Invalid input error: Schedule cron is not a supported "
                                    f"format(https://godoc.org/github.com/robfig/cron). Error: {problem}")
        job.recurring_run_id = self._new_id()
        job.max_concurrency = str(concurrency)
        job.mode = job.mode or "ENABLE"
        job.status = "ENABLED" if job.mode == "ENABLE" else "DISABLED"
        job.created_at = job.updated_at = now()
        if job.experiment_id:
            job.namespace = self.experiments[job.experiment_id].namespace
        if job.pipeline_version_reference:
            job.pipeline_version_id = job.pipeline_version_reference.pipeline_version_id
        self.recurring_runs[job.recurring_run_id] = job
        return 200, to_json(job)
