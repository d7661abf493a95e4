"""Fixtures the end-to-end serving tests share: a registry with two versions of the model."""
import shutil

import pytest
import yaml

from pipelines.config import load_settings
from stages.dataset import ReferenceTask
from stages.registry import register_model
from tests.e2e.serving import NAME, train_quickly
from tests.support import CONFIG_DIR, mlflow_store


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two versions registered in a SQLite MLflow: v2 is the champion, v1 the previous champion;
    and a config dir whose environments all point at that registry."""
    tmp = tmp_path_factory.mktemp("serve-cli")
    tracking = mlflow_store(tmp / "mlflow.db")
    example = ReferenceTask(rows=20, seed=1).generate()[load_settings("local").dataset.features.columns].head(5)
    for version, seed in ((1, 3), (2, 4)):
        model_dir = train_quickly(tmp / f"v{version}", seed)
        assert register_model(tracking, NAME, str(model_dir), None, {}, example, experiment="serve-cli") == str(version)
    config = tmp / "config"
    shutil.copytree(CONFIG_DIR, config)
    for env in ("local", "prod"):
        path = config / f"{env}.yaml"
        data = yaml.safe_load(path.read_text())
        data["mlflow"] = {**data.get("mlflow", {}), "tracking_uri": tracking}
        path.write_text(yaml.safe_dump(data))
    return tracking, config
