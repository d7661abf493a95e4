"""The batch scoring pipeline compiles for every environment: its DAG (resolve, screen, a
ParallelFor of score tasks, collect, drift), no caching, its defaults from config."""
import pytest

from pipelines.catalog import PIPELINES, compile_pipeline, load_compiled, pipeline_arguments, signature_errors
from pipelines.config import environments, load_settings

ENVIRONMENTS = environments()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("scoring")
    return {env: load_compiled(compile_pipeline(load_settings(env), "scoring", out / env)) for env in ENVIRONMENTS}


def test_the_catalog_knows_the_scoring_pipeline():
    assert "scoring" in PIPELINES


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_compiles_with_a_parallel_for_over_the_screened_row_ranges(compiled, env):
    settings, spec = load_settings(env), compiled[env]
    root = spec["root"]["dag"]["tasks"]
    assert {"resolve-op", "screen-op", "collect-op", "batch-drift-op"} <= set(root)
    (loop,) = [task for task in root.values() if "parameterIterator" in task]
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("screen-op-Output")
    assert loop["iteratorPolicy"]["parallelismLimit"] == settings.scoring.partitions
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"score-op"}
    # The collect task gathers every partition's predictions
    parts = root["collect-op"]["inputs"]["artifacts"]["parts"]
    assert parts["taskOutputArtifact"]["producerTask"] == loop["taskInfo"]["name"]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_no_task_is_cached_the_champion_alias_resolves_every_run(compiled, env):
    spec = compiled[env]
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    assert "cachingOptions" in tasks["resolve-op"]
    for name, task in tasks.items():
        assert not task.get("cachingOptions", {}).get("enableCache", False), name


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_defaults_come_from_config_and_match_the_signature(compiled, env):
    settings = load_settings(env)
    arguments = pipeline_arguments(settings, "scoring")
    assert signature_errors(compiled[env], arguments) == []
    assert arguments["scoring_spec"] == settings.scoring.model_dump()
    assert arguments["decision_threshold"] == settings.evaluation.decision_threshold
    assert arguments["out_uri"].endswith("/scoring/predictions.parquet")


def test_scoring_config_is_validated_with_the_key_path(config_dir):
    from pipelines.config import ConfigError

    (config_dir / "local.yaml").write_text((config_dir / "local.yaml").read_text()
                                           + "scoring: {max_quarantine_share: 1.5, partition_rows: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_settings("local", config_dir)
    assert "scoring.max_quarantine_share" in str(err.value) and "scoring.partition_rows" in str(err.value)
