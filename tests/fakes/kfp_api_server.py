"""A fake KFP v2beta1 API server, held to the real contract; what gateways/kfp_api.py talks to in
tests, over real HTTP, for the real `kfp.Client`.

The KFP API server cannot run here (it needs Kubernetes, MySQL, Argo), so this stands in for it,
strict where the real one is. It is put together from one file per concern:

    kfp_contract.py        request bodies and list filters checked field by field against the
                           `kfp_server_api` models; `ApiError`; responses serialized as models
    kfp_core.py            the HTTP server, routes, recorded requests, credentials required
                           (`bearer_token`, `cookie`), injected failures (`fail_next`), error shapes
    kfp_pipelines.py       pipelines and versions; uploads must parse as a `PipelineSpec`
    kfp_runs.py            experiments and runs; parameters vs the pipeline's root inputs; how runs
                           end (`run_outcome`, `polls_to_finish`)
    kfp_recurring_runs.py  recurring runs; max_concurrency 1-10, robfig/cron schedules

Tests use the fixtures `server` (a started `FakeKfpServer`) and `isolated` (no kfp credentials or
context of this machine).
"""
from __future__ import annotations

import pytest

from tests.fakes.kfp_contract import ApiError, model_errors, parse_model
from tests.fakes.kfp_core import Recorded
from tests.fakes.kfp_pipelines import Pipelines, parse_pipeline_package
from tests.fakes.kfp_recurring_runs import RecurringRuns, robfig_cron_errors
from tests.fakes.kfp_runs import parameter_errors

__all__ = ["KFP_ENV_VARS", "ApiError", "FakeKfpServer", "Recorded", "isolate_kfp_client", "isolated",
           "model_errors", "parameter_errors", "parse_model", "parse_pipeline_package", "robfig_cron_errors",
           "server"]


class FakeKfpServer(RecurringRuns, Pipelines):
    """Pipelines, versions, experiments, runs and recurring runs; `start()` serves them on 127.0.0.1
    at a free port. `FakeKfpServer(multi_user=True)` keeps to the backend's multi-user rules."""


KFP_ENV_VARS = ("KFP_BEARER_TOKEN", "KFP_BEARER_TOKEN_FILE", "KFP_COOKIE", "KF_PIPELINES_SA_TOKEN_PATH",
                "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
                "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME", "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID")


def isolate_kfp_client(monkeypatch, tmp_path) -> None:
    """No credentials or kfp context from this machine leak into a test, and none are written."""
    import kfp.client.client as kfp_client

    for name in KFP_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-sa-token"))
    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))


@pytest.fixture
def server():
    """A fake KFP API server on a free loopback port, for one test."""
    fake = FakeKfpServer().start()
    yield fake
    fake.stop()


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """kfp.Client with no host config, credentials or home directory of the machine it runs on."""
    isolate_kfp_client(monkeypatch, tmp_path)
