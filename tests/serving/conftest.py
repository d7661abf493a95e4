"""Fixtures the serving tests share: one model trained in seconds per module, the servers on it."""
import pytest

from stages.dataset import ReferenceTask
from storage.tables import write_table
from tests.serving.servers import Server


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained in-process in seconds (2k rows, 2 epochs) and the frame it came from."""
    from pipelines.arguments import train_spec
    from pipelines.config import load_settings
    from training import train as entry
    from training.backends.jobs import entry_spec

    tmp = tmp_path_factory.mktemp("serving")
    frame = ReferenceTask(rows=2000, seed=3).generate()
    data = write_table(frame, tmp / "train.parquet")
    settings = load_settings("local", overrides={"training": {"hyperparameters": {"epochs": 2}}})
    with pytest.MonkeyPatch.context() as env:
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
            env.delenv(name, raising=False)
        entry.train(str(data), str(tmp / "model"), entry_spec(train_spec(settings), settings.dataset, None))
    return tmp / "model", frame


@pytest.fixture(scope="module")
def servers(trained, tmp_path_factory):
    """The predictor, the transformer (gRPC hop) and the one-process server on the trained model,
    started with no --host (what every local start gets), shared by the module's tests."""
    model_dir, _ = trained
    logs = tmp_path_factory.mktemp("fuzz")
    predictor = Server("serving.predictor", logs / "predictor.log", "--model_dir", str(model_dir))
    transformer = Server("serving.transformer", logs / "transformer.log", "--model_dir", str(model_dir),
                         "--predictor_host", f"127.0.0.1:{predictor.grpc_port}", "--predictor_protocol", "grpc-v2")
    single = Server("serving.single", logs / "single.log", "--model_dir", str(model_dir))
    try:
        predictor.wait()
        transformer.wait()
        single.wait()
        yield {"predictor": predictor, "transformer": transformer, "single": single}
    finally:
        single.stop()
        transformer.stop()
        predictor.stop()
