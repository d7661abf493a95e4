"""The transformer's readiness tied to its predictor's, as real processes: 503 while the predictor is
down, ready and answering once it is up, 503 again when it goes (the one-process server has no
predictor to wait for: its readiness is its model's, tests/serving/test_serving_surface.py)."""
import time

import httpx

from tests.serving.servers import NAME, Server, records
from tests.support import free_port


def test_readiness_follows_the_predictor(trained, tmp_path):
    model_dir, frame = trained
    grpc_port = free_port()
    # Given a transformer whose predictor is not running
    transformer = Server("serving.transformer", tmp_path / "transformer.log", "--model_dir", str(model_dir),
                         "--predictor_host", f"127.0.0.1:{grpc_port}")
    predictor = None
    try:
        transformer.wait("/v2/health/live")
        # Then it answers 503 on every readiness endpoint and for inference
        for path in ("/v2/health/ready", f"/v2/models/{NAME}/ready", f"/v1/models/{NAME}"):
            answer = httpx.get(transformer.url + path)
            assert answer.status_code == 503, (path, answer.text)
        answer = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json={"instances": records(frame, 1)})
        assert answer.status_code == 503 and answer.json()["error"]["status"] == 503
        # When the predictor comes up, Then the transformer becomes ready and answers
        predictor = Server("serving.predictor", tmp_path / "predictor.log", "--model_dir", str(model_dir),
                           grpc_port=grpc_port).wait()
        transformer.wait(timeout=30)
        answer = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json={"instances": records(frame, 1)})
        assert answer.status_code == 200, answer.text
        # And when it goes away again, readiness follows
        predictor.stop()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and httpx.get(transformer.url + "/v2/health/ready").status_code == 200:
            time.sleep(0.2)
        assert httpx.get(transformer.url + "/v2/health/ready").status_code == 503
    finally:
        transformer.stop()
        if predictor:
            predictor.stop()
