"""The monitoring pipeline that fires the trigger, compiled for every env: the trigger behind a
`dsl.If` on the decision, and no null among its compiled defaults."""
import pytest

from pipelines.catalog import compile_pipeline, load_compiled
from pipelines.config import environments, load_settings


@pytest.mark.parametrize("env", environments())
def test_the_monitoring_pipeline_compiles_with_its_trigger_behind_a_dsl_if(env, tmp_path):
    settings = load_settings(env)
    spec = load_compiled(compile_pipeline(settings, "monitoring", tmp_path))
    assert spec["pipelineInfo"]["name"] == "flywheel-monitoring"
    tasks = spec["root"]["dag"]["tasks"]
    assert {"champion-op", "window-op", "drift-op", "decide-op"} <= set(tasks)
    assert "trigger-op" not in tasks, "the trigger runs only inside the decision's branch"
    assert tasks["drift-op"]["dependentTasks"] == ["champion-op", "window-op"]
    (branch,) = [t for t in tasks.values() if "triggerPolicy" in t]
    assert branch["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--decide-op-Output'] " \
                                                   "== 'retrain'"
    inner = spec["components"][branch["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"trigger-op"}
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["monitoring_spec"]["window_rows"] == settings.monitoring.window_rows
    assert defaults["retraining_spec"]["cooldown_minutes"] == settings.retraining.cooldown_minutes
    assert defaults["kfp_target"]["pipeline"] == f"flywheel-{env}-training"
    outputs = spec["components"]["comp-drift-op"]["outputDefinitions"]["artifacts"]
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"
    if settings.embedded:
        assert "host" not in defaults["kfp_target"] and "platforms" not in spec
    else:
        assert defaults["kfp_target"]["host"] == settings.kfp.host
        executors = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        # the trigger task gets Kubeflow's KFP token (PodDefault by label) and object-store credentials by name
        assert executors["exec-trigger-op"]["podMetadata"]["labels"] == {"access-ml-pipeline": "true"}
        assert {s["secretName"] for e in executors.values() for s in e["secretAsEnv"]} == {"flywheel-object-store"}
        assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {settings.image.ref}


def test_compiled_defaults_hold_no_nulls():
    # the trigger's target and the specs travel as STRUCT defaults: protobuf structs hold no null
    from pipelines.arguments import monitoring_arguments as arguments

    def nulls(value, path=""):
        if isinstance(value, dict):
            return [p for k, v in value.items() for p in nulls(v, f"{path}.{k}")]
        if isinstance(value, list):
            return [p for i, v in enumerate(value) for p in nulls(v, f"{path}[{i}]")]
        return [path] if value is None else []

    for env in environments():
        assert nulls(arguments(load_settings(env))) == [], env
