"""Every pipeline compiles for every environment, carrying that environment's config."""
import pytest
import yaml

from pipelines.catalog import (
    PIPELINES,
    built_spec,
    check_all,
    compile_pipeline,
    load_compiled,
    pipeline_arguments,
    signature_errors,
)
from pipelines.config import environments, load_settings

ENVIRONMENTS = environments()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return {(env, name): load_compiled(compile_pipeline(load_settings(env), name, out / env))
            for env in ENVIRONMENTS for name in PIPELINES}


def images(spec: dict) -> set[str]:
    return {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}


@pytest.mark.parametrize("env", ENVIRONMENTS)
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_compiles_to_kfp_ir_with_the_env_image(compiled, env, name):
    spec = compiled[(env, name)]
    assert spec["pipelineInfo"]["name"] == f"flywheel-{name}"
    assert spec["schemaVersion"] == "2.1.0"
    settings = load_settings(env)
    expected = {"python:3.11-slim"} if settings.embedded else {settings.image.ref}
    assert images(spec) == expected
    assert signature_errors(spec, pipeline_arguments(settings, name)) == []
    # components run the project's own image: no pip install at task start
    commands = "\n".join(str(e["container"]) for e in spec["deploymentSpec"]["executors"].values())
    assert "pip install" not in commands


def test_prod_carries_whole_gpus_a100_selector_and_limits(compiled):
    spec = compiled[("prod", "training")]
    train_spec = spec["root"]["inputDefinitions"]["parameters"]["train_spec"]["defaultValue"]
    assert train_spec["resources"]["gpu"] == {"count": 1, "resource": "nvidia.com/gpu",
                                              "product": "NVIDIA-A100-SXM4-80GB"}
    assert train_spec["workers"] == 4 and train_spec["backend"] == "pytorchjob"
    assert train_spec["image"].startswith("ghcr.io/flywheel-ml/flywheel@sha256:")
    for executor in spec["deploymentSpec"]["executors"].values():
        assert executor["container"]["resources"]["cpuLimit"] == 1.0
        assert executor["container"]["resources"]["memoryLimit"] == 2.0


def test_dev_carries_a_mig_slice(compiled):
    train_spec = compiled[("dev", "training")]["root"]["inputDefinitions"]["parameters"]["train_spec"]["defaultValue"]
    assert train_spec["resources"]["gpu"]["resource"] == "nvidia.com/mig-1g.5gb"


def test_training_dag_has_every_stage_and_the_promotion_branch(compiled):
    tasks = compiled[("local", "training")]["root"]["dag"]["tasks"]
    assert {"ingest-op", "validate-op", "split-op", "propose-op", "select-op", "train-op", "evaluate-op",
            "gate-op"} <= set(tasks)
    assert tasks["split-op"]["dependentTasks"] == ["ingest-op", "validate-op"], "split waits for validation"
    condition = next(t for t in tasks.values() if "triggerPolicy" in t)
    assert "promote" in condition["triggerPolicy"]["condition"]
    loop = next(t for t in tasks.values() if "parameterIterator" in t)
    assert loop["iteratorPolicy"]["parallelismLimit"] == load_settings("local").tuning.parallelism


def test_no_secret_values_in_compiled_pipelines(compiled):
    import re

    for spec in compiled.values():
        # credentials may only be named, as references to a Kubernetes secret
        stripped = {k: v for k, v in spec.items() if k != "platforms"}
        text = yaml.safe_dump(stripped).lower()
        for needle in ("aws_secret_access_key", "aws_access_key_id", "password", "bearer "):
            assert needle not in text
        assert not re.search(r"akia[0-9a-z]{16}", text), "no AWS access key ids"
        kubernetes = spec.get("platforms", {}).get("kubernetes", {})
        for executor in kubernetes.get("deploymentSpec", {}).get("executors", {}).values():
            for secret in executor.get("secretAsEnv", []):
                assert set(secret) <= {"secretName", "secretNameParameter", "keyToEnv", "optional"}


def test_signature_errors_catch_unknown_missing_and_mistyped_arguments(compiled):
    spec = compiled[("local", "training")]
    args = pipeline_arguments(load_settings("local"), "training")
    assert signature_errors(spec, args | {"epochs": 3}) == ["argument 'epochs' is not a parameter of the pipeline"]
    assert signature_errors(spec, args | {"train_spec": "big"}) == [
        "parameter 'train_spec' expects STRUCT, config gives str"]
    args.pop("env")
    assert signature_errors(spec, args) == []  # env has a default, so it may be omitted


@pytest.mark.parametrize("env", ["local", "prod"])  # prod: a second (kfp-kubernetes platform) document
def test_check_reads_the_spec_the_compiler_writes(compiled, env):
    """check_all skips the YAML round trip; what it reads must be the file compile writes."""
    for name in PIPELINES:
        assert built_spec(load_settings(env), name) == compiled[(env, name)]


def test_check_passes_on_the_shipped_config():
    assert check_all() == {env: [] for env in ENVIRONMENTS}


def test_tuning_off_in_config_means_no_tuning_tasks(tmp_path):
    settings = load_settings("local", overrides={"tuning": {"enabled": False}})
    tasks = load_compiled(compile_pipeline(settings, "training", tmp_path))["root"]["dag"]["tasks"]
    assert not {"propose-op", "select-op"} & set(tasks)
    assert tasks["train-op"]["inputs"]["parameters"]["train_spec"]["componentInputParameter"] == "train_spec"


def test_cluster_tasks_get_object_store_credentials_by_reference_only(compiled):
    for env in ("dev", "prod"):
        executors = compiled[(env, "training")]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        train = next(v for k, v in executors.items() if "train-op" in k)
        (secret,) = train["secretAsEnv"]
        assert secret["secretName"] == "flywheel-object-store"
        assert {m["secretKey"] for m in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "platforms" not in compiled[("local", "training")]


def test_no_task_is_cached_so_scheduled_retraining_really_retrains(compiled):
    least = {"training": 9, "monitoring": 5, "scoring": 5}  # every task of each pipeline is seen
    for (_, name), spec in compiled.items():
        tasks = [t for c in spec["components"].values() if "dag" in c for t in c["dag"]["tasks"].values()]
        tasks += list(spec["root"]["dag"]["tasks"].values())
        assert len(tasks) >= least[name] and all(t.get("cachingOptions", {}).get("enableCache") is not True
                                                 for t in tasks)


def test_object_store_endpoint_reaches_tasks_and_training_pods(tmp_path):
    settings = load_settings("dev", overrides={"kfp": {"object_store_endpoint": "http://minio.flywheel-dev:9000"}})
    spec = load_compiled(compile_pipeline(settings, "training", tmp_path))
    for executor in spec["deploymentSpec"]["executors"].values():
        assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio.flywheel-dev:9000"} in executor["container"]["env"]
    assert pipeline_arguments(settings, "training")["train_spec"]["object_store_endpoint"] == "http://minio.flywheel-dev:9000"


def test_a_cluster_env_with_shadow_compiles_and_deploys_only_a_promoted_winner(tmp_path):
    # Given dev (a cluster env, Standard mode) with evaluation.shadow: config takes it there
    settings = load_settings("dev", overrides={"evaluation": {"shadow": {"rows": 500, "percent": 20}}})
    # When the training pipeline compiles, Then the gate gets the shadow spec (a winner against a
    # champion becomes the `challenger`, registered by the gate itself: components/evaluate.py)
    spec = load_compiled(compile_pipeline(settings, "training", tmp_path))
    assert signature_errors(spec, pipeline_arguments(settings, "training")) == []
    evaluation = spec["root"]["inputDefinitions"]["parameters"]["evaluation_spec"]["defaultValue"]
    assert evaluation["shadow"]["rows"] == 500 and evaluation["shadow"]["percent"] == 20
    # ... and register + deploy run only under the gate's "promote": a "challenger" deploys nothing
    tasks = spec["root"]["dag"]["tasks"]
    (branch,) = [t for t in tasks.values() if "triggerPolicy" in t]
    assert branch["triggerPolicy"]["condition"].endswith("== 'promote'")
    inner = spec["components"][branch["componentRef"]["name"]]["dag"]["tasks"]
    assert {"register-op", "deploy-op"} <= set(inner) and "deploy-op" not in tasks
