"""The fake KFP API's experiments and runs, with the checks the backend makes on them: names
required, an experiment required in multi-user mode, exactly one pipeline source, and the run's
parameters against the pipeline's root inputs (the backend's own messages).

Tests choose how runs end: a run reaches `run_outcome` once polled `polls_to_finish` times
(failing with `run_error` when the outcome is FAILED).
"""
from __future__ import annotations

from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from kfp_server_api import models

from tests.fakes.kfp_contract import ApiError, now, to_json
from tests.fakes.kfp_core import FakeKfpCore, Recorded, Route

_VALUE_KINDS = {
    "NUMBER_DOUBLE": ((int, float), "double or integer", "number"),
    "NUMBER_INTEGER": ((int, float), "double or integer", "number"),
    "STRING": ((str,), "string", "string"),
    "BOOLEAN": ((bool,), "bool", "bool"),
    "LIST": ((list,), "list", "list"),
    "STRUCT": ((dict,), "struct", "struct"),
}


def parameter_errors(spec: dict, parameters: dict | None) -> str | None:
    """The backend's validatePipelineJobInputs (backend/src/apiserver/template/v2_template.go)."""
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    parameters = parameters or {}
    for name, definition in sorted(declared.items()):
        if name not in parameters:
            if not definition.get("isOptional") and "defaultValue" not in definition:
                return f"parameter {name} is not optional, yet has neither default value nor user provided value"
            continue
        value, kind = parameters[name], definition.get("parameterType")
        if kind not in _VALUE_KINDS:
            return f"input parameter {name} requires type unknown"
        types, label, noun = _VALUE_KINDS[kind]
        if not isinstance(value, types) or (kind != "BOOLEAN" and isinstance(value, bool)):
            return f"input parameter {name} requires type {label}, but the input parameter is not of {noun} value type"
    extra = sorted(set(parameters) - set(declared))
    if extra:
        return f"parameter(s) provided are not required by pipeline: {', '.join(extra)}"
    return None


class Runs(FakeKfpCore):
    """Experiments in `experiments`, runs in `runs` (both by id); reads `versions` (kfp_pipelines.py)."""

    versions: dict

    def __init__(self, multi_user: bool = False):
        super().__init__(multi_user)
        self.run_outcome = "SUCCEEDED"  # state runs reach once polled `polls_to_finish` times
        self.run_error = "task 'train' failed: exit code 1"
        self.polls_to_finish = 1
        self.experiments: dict[str, models.V2beta1Experiment] = {}
        self.runs: dict[str, models.V2beta1Run] = {}
        self._polls: dict[str, int] = {}

    def routes(self) -> list[Route]:
        return [
            Route(r"/experiments", "POST",
                  lambda rec, m, raw, ct: self._create_experiment(self._json(rec, raw, "V2beta1Experiment"))),
            Route(r"/experiments", "GET", self._list_experiments),
            Route(r"/experiments/([^/]+)", "GET",
                  lambda rec, m, raw, ct: (200, to_json(self._get(self.experiments, m[1], "Experiment")))),
            Route(r"/runs", "POST", lambda rec, m, raw, ct: self._create_run(self._json(rec, raw, "V2beta1Run"))),
            Route(r"/runs", "GET", self._list_runs),
            Route(r"/runs/([^/:]+)", "GET", lambda rec, m, raw, ct: (200, to_json(self._poll_run(m[1])))),
            *super().routes(),
        ]

    def _list_experiments(self, rec: Recorded, match, raw: bytes, content_type: str) -> tuple[int, dict]:
        q = rec.query
        if self.multi_user and not q.get("namespace"):
            raise ApiError(400, "Invalid input error: In multi-user mode, "
                                "ListExperiment requires filtering by namespace")
        found = [e for e in self.experiments.values() if (e.namespace or "") == (q.get("namespace") or "")]
        return self._list(found, q, "experiments", models.V2beta1ListExperimentsResponse)

    def _list_runs(self, rec: Recorded, match, raw: bytes, content_type: str) -> tuple[int, dict]:
        found = list(self.runs.values())
        if rec.query.get("experiment_id"):
            found = [r for r in found if r.experiment_id == rec.query["experiment_id"]]
        return self._list(found, rec.query, "runs", models.V2beta1ListRunsResponse)

    def _create_experiment(self, experiment) -> tuple[int, dict]:
        if not experiment.display_name:
            raise ApiError(400, "Invalid input error: Experiment name is empty. Please specify a valid experiment name")
        if self.multi_user and not experiment.namespace:
            raise ApiError(400, "Invalid input error: In multi-user mode, experiment namespace is required")
        for other in self.experiments.values():
            if other.display_name == experiment.display_name and other.namespace == experiment.namespace:
                raise ApiError(409, f"Already exist error: Experiment {experiment.display_name} already exists")
        experiment.experiment_id = self._new_id()
        experiment.created_at = now()
        experiment.storage_state = "AVAILABLE"
        self.experiments[experiment.experiment_id] = experiment
        return 200, to_json(experiment)

    def _pipeline_source(self, job) -> dict:
        """The spec a run or recurring run executes: inline, or a stored pipeline version."""
        ref = job.pipeline_version_reference
        if (job.pipeline_spec is None) == (ref is None):
            raise ApiError(400, "Invalid input error: exactly one of pipeline_spec or pipeline_version_reference "
                                "is required")
        if job.pipeline_spec is not None:
            try:
                json_format.ParseDict(job.pipeline_spec.get("pipeline_spec", job.pipeline_spec),
                                      pipeline_spec_pb2.PipelineSpec())
            except json_format.ParseError as err:
                raise ApiError(400, f"Invalid input error: pipeline_spec: {err}") from None
            return job.pipeline_spec.get("pipeline_spec", job.pipeline_spec)
        if not ref.pipeline_id or not ref.pipeline_version_id:
            raise ApiError(400, "Invalid input error: pipeline_version_reference needs pipeline_id and "
                                "pipeline_version_id")
        version = self._get(self.versions, ref.pipeline_version_id, "PipelineVersion")
        if version.pipeline_id != ref.pipeline_id:
            raise ApiError(400, f"Invalid input error: version {ref.pipeline_version_id} is not a version of "
                                f"pipeline {ref.pipeline_id}")
        return version.pipeline_spec

    def _check_job(self, job) -> None:
        """What the backend checks in a run or a recurring run before it stores one."""
        if not job.display_name:
            raise ApiError(400, "Invalid input error: The run name is empty. Please specify a valid name")
        if job.experiment_id:
            self._get(self.experiments, job.experiment_id, "Experiment")
        elif self.multi_user:
            raise ApiError(400, "Invalid input error: In multi-user mode, experiment_id is required")
        spec = self._pipeline_source(job)
        runtime = job.runtime_config or models.V2beta1RuntimeConfig()
        problem = parameter_errors(spec, runtime.parameters)
        if problem:
            raise ApiError(400, f"Invalid input error: {problem}")

    def _create_run(self, run) -> tuple[int, dict]:
        self._check_job(run)
        run.run_id = self._new_id()
        run.state = "PENDING"
        run.storage_state = "AVAILABLE"
        run.created_at = now()
        if run.pipeline_version_reference:
            run.pipeline_version_id = run.pipeline_version_reference.pipeline_version_id
        self.runs[run.run_id] = run
        self._polls[run.run_id] = 0
        return 200, to_json(run)

    def _poll_run(self, run_id: str):
        run = self._get(self.runs, run_id, "Run")
        self._polls[run_id] += 1
        if run.state in ("PENDING", "RUNNING"):
            if self._polls[run_id] >= self.polls_to_finish:
                run.state = self.run_outcome
                run.finished_at = now()
                if self.run_outcome == "FAILED":
                    run.error = models.GoogleRpcStatus(code=2, message=self.run_error)
            else:
                run.state = "RUNNING"
        return run
