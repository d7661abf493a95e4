"""The local deployer (`deployment/loopback.py`) per `serving.topology`: one process for `single`,
predictor + transformer for a chain, the same answers through the entry either way, and every
process stopped after."""
import httpx
import pytest

from deployment.loopback import LocalServing, smoke_test
from specs import ServingSpec
from tests.serving.servers import COLUMNS, NAME, expected, records


@pytest.mark.parametrize("topology, processes", [("single", ["server"]), ("collocated", ["predictor", "transformer"])])
def test_the_local_deployer_starts_the_topologys_processes(trained, tmp_path, topology, processes):
    model_dir, frame = trained
    rows = records(frame, 3)
    spec = ServingSpec(deployer="local", topology=topology)
    # Given the topology, When the local deployer serves the model
    with LocalServing(str(model_dir), NAME, spec, tmp_path, model_version="7") as serving:
        # Then it runs that many processes, each logging to its own file
        assert [p.name for p in serving.processes] == processes
        assert all(p.alive() for p in serving.processes)
        assert sorted(f.name for f in tmp_path.glob("*.log")) == sorted(f"{p}.log" for p in processes)
        # ... the entry answers raw records (v1 and v2, the smoke test) with the model's probabilities
        answers = smoke_test(serving, rows)
        assert answers["v1"]["probabilities"] == pytest.approx(expected(trained, rows).tolist(), abs=1e-6)
        assert answers["v1"]["model_version"] == "7"
        # ... and the model runs in the entry itself (single) or in a predictor behind it (a chain)
        declared = httpx.get(f"{serving.predictor_url}/v2/models/{NAME}").json()["inputs"]
        single = topology == "single"
        assert (serving.predictor_url == serving.url) == single
        assert ([t["name"] for t in declared] == COLUMNS) == single
    # And when it stops, every process is gone
    assert not any(p.alive() for p in serving.processes)
