"""`flywheel submit scoring` goes through the catalog: the compiled scoring pipeline is published
as `flywheel-<env>-scoring` and a run starts with its config-derived arguments (fake KFP API server)."""
import pytest

from pipelines.catalog import pipeline_arguments
from pipelines.config import load_settings
from pipelines.submit import submit_pipeline
from tests.fakes.kfp_api_server import FakeKfpServer, isolated, server  # noqa: F401

pytestmark = pytest.mark.usefixtures("isolated")


def test_submit_scoring_publishes_the_pipeline_and_starts_a_run(server):
    settings = load_settings("dev", overrides={"kfp": {"host": server.url}})
    result = submit_pipeline(settings, "scoring", poll_s=0.01)
    assert result.pipeline_name == "flywheel-dev-scoring" and result.run_id
    (create,) = server.find("POST", "/runs")
    sent = create.body["runtime_config"]["parameters"]
    assert sent == pipeline_arguments(settings, "scoring")
    assert sent["scoring_spec"]["max_quarantine_share"] == settings.scoring.max_quarantine_share
