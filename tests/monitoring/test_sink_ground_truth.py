"""Ground truth joined to the payload sink's windows in `read_window`: by request id (and instance,
the latest file winning), by an entity id where the request id gives none, through the service's
POST /ground_truth, and on S3 through `storage` (a moto server)."""
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from monitoring.sink import PayloadSink
from monitoring.windows import read_window, write_ground_truth
from specs.monitoring import SinkSpec
from tests.monitoring.payloads import VERSION
from tests.monitoring.sink_fixtures import frame, traffic  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def test_ground_truth_is_joined_by_request_id_in_read_window(tmp_path, traffic):
    root = str(tmp_path / "windows")
    sink = PayloadSink(root, SinkSpec(root=root), start=False)
    # Given three calls written by the sink, one of them of two rows
    for request_id, n in (("a", 1), ("b", 2), ("c", 1)):
        for event in traffic.call(request_id, traffic.records(n)):
            assert sink.accept(*event).status == 202
    assert sink.flush() == 4
    # When ground truth arrives for a, for b's second row only, then corrects a
    write_ground_truth(root, pd.DataFrame({"request_id": ["a"], "truth": ["0"]}))
    write_ground_truth(root, pd.DataFrame({"request_id": ["b"], "truth": [1], "instance": [1]}))
    write_ground_truth(root, pd.DataFrame({"request_id": ["a"], "truth": ["1"]}))
    # Then read_window joins it by request id (and instance), the latest file winning
    window = read_window(root)
    truth = dict(zip(zip(window["request_id"], window["instance"]), window["truth"]))
    assert truth == {("a", 0): "1", ("b", 0): None, ("b", 1): "1", ("c", 0): None}
    # And rows / model_version / since select the most recent rows
    assert read_window(root, rows=2)["request_id"].tolist() == ["b", "c"]
    assert read_window(root, model_version="other").empty
    assert len(read_window(root, model_version=VERSION)) == 4
    assert read_window(root, since=datetime.now(UTC) + timedelta(hours=2)).empty
    assert len(read_window(root, since=datetime.now(UTC) - timedelta(hours=2))) == 4
    # And the service's POST /ground_truth writes the same files
    from starlette.testclient import TestClient

    from monitoring.service import create_app

    with TestClient(create_app(sink)) as client:
        assert client.post("/ground_truth", json=[{"request_id": "c", "truth": 0}]).status_code == 202
        assert client.post("/ground_truth", json=[{"request_id": "", "truth": 0}]).status_code == 422
        assert client.post("/ground_truth", content=b"[").status_code == 400
    assert read_window(root).set_index("request_id").loc["c", "truth"] == "0"


def test_ground_truth_joins_by_entity_id_where_the_request_id_gives_none(tmp_path, traffic):
    # Clients send the dataset's id column with each record (the transformer echoes it and the
    # sink logs it): labels known per customer, not per request, still reach the window
    root = str(tmp_path / "windows")
    sink = PayloadSink(root, SinkSpec(root=root), start=False)
    for request_id, customer in (("a", "c-1"), ("b", 7), ("c", "c-3")):
        rows = [{**traffic.records(1)[0], "customer_id": customer}]
        for event in traffic.call(request_id, rows):
            assert sink.accept(*event).status == 202
    assert sink.flush() == 3
    from starlette.testclient import TestClient

    from monitoring.service import create_app

    with TestClient(create_app(sink)) as client:
        assert client.post("/ground_truth", json=[{"entity_column": "customer_id", "entity_id": "c-1", "truth": 1},
                                                   {"entity_column": "customer_id", "entity_id": 7, "truth": 0},
                                                   {"request_id": "c", "truth": 0}]).status_code == 202
        # A request id wins over an entity's label; a bad entity row is a 422 naming it
        assert client.post("/ground_truth", json=[{"entity_column": "customer_id", "entity_id": "c-3",
                                                    "truth": 1}]).status_code == 202
        bad = client.post("/ground_truth", json=[{"entity_column": "customer_id", "truth": 1}])
        assert bad.status_code == 422 and "rows[0].entity_id" in bad.text
    truth = dict(zip(read_window(root)["request_id"], read_window(root)["truth"]))
    assert truth == {"a": "1", "b": "0", "c": "0"}


def test_windows_and_ground_truth_go_through_storage_to_s3(tmp_path, traffic, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t",
               "AWS_DEFAULT_REGION": "us-east-1"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
            Bucket="monitor")
        root = "s3://monitor/windows"
        # Given a sink writing to S3, two pairs and a lone request
        sink = PayloadSink(root, SinkSpec(root=root), start=False)
        for request_id in ("s1", "s2"):
            for event in traffic.call(request_id, traffic.records(1)):
                assert sink.accept(*event).status == 202
        assert sink.accept(*traffic.call("s3-lone", traffic.records(1))[0]).status == 202
        assert sink.close()
        write_ground_truth(root, pd.DataFrame({"request_id": ["s2"], "truth": ["1"]}))
        # Then read_window reads them back from the bucket, truth joined
        window = read_window(root)
        assert sorted(window["request_id"]) == ["s1", "s2"]
        assert window.set_index("request_id").loc["s2", "truth"] == "1"
        # And the lone request is kept in _pending/ and restored by the next sink
        again = PayloadSink(root, SinkSpec(root=root), start=False)
        assert again.stats()["pending"] == 1
        assert again.accept(*traffic.call("s3-lone", traffic.records(1))[1]).status == 202
        assert again.close() and len(read_window(root)) == 3
    finally:
        server.stop()

