"""fleet/policy.py: each rule catches an object that breaks it (tests/fleet/fixtures/broken.yaml),
names the object and the rule, and lets good objects and the builders' own objects through; the
same rules over compiled KFP pipelines."""
import copy
from pathlib import Path

import pytest
import yaml

from fleet import policy
from fleet.policy import RULES, image_problem, pipeline_violations, secret_looking, violations
from fleet.validate import problems_all
from pipelines.catalog import PIPELINES, compile_pipeline, load_compiled
from tests.fleet.conftest import pinned_settings
from tests.fleet.test_validate import GOOD, builders_objects

FIXTURES = Path(__file__).parent / "fixtures"
BROKEN = yaml.safe_load((FIXTURES / "broken.yaml").read_text())["objects"]
BREAKS = "flywheel.test/breaks"


def _id(obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("obj", BROKEN, ids=_id)
def test_each_rule_catches_its_broken_fixture_and_names_object_and_rule(obj):
    rule = obj["metadata"]["annotations"][BREAKS]
    found = violations([obj])
    assert found, f"{_id(obj)} breaks {rule} but passed"
    assert all(line.startswith(f"{_id(obj)}: {rule}: ") for line in found), found


def test_the_broken_fixture_breaks_every_rule_and_nothing_else():
    assert {o["metadata"]["annotations"][BREAKS] for o in BROKEN} == set(RULES)
    assert problems_all(BROKEN) == []  # schema-valid: only the policy can catch them


def test_good_objects_and_the_builders_objects_pass():
    assert violations(GOOD) == []
    for env in ("dev", "staging", "prod"):
        assert violations(builders_objects(env)) == [], env


def test_gpus_only_where_allowed():
    isvc, pytorchjob, trainjob = builders_objects("prod")
    assert any(k.startswith("nvidia.com/") for k in
               pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]
               ["limits"])
    # training asks for GPUs and may; with no kind allowed, the same jobs are caught
    assert violations([pytorchjob, trainjob]) == []
    denied = violations([pytorchjob, trainjob], gpu_allowed=set())
    assert {line.split(": ")[1] for line in denied} == {"gpu"} and len(denied) >= 2
    # serving may only when the object says so (or the caller allows its kind)
    gpu_isvc = next(o for o in BROKEN if o["metadata"]["name"] == "gpu-predictor")
    allowed = copy.deepcopy(gpu_isvc)
    allowed["metadata"]["annotations"] = {policy.GPU_ANNOTATION: "allowed"}
    assert violations([allowed]) == []
    assert violations([gpu_isvc], gpu_allowed={"InferenceService"}) == []
    assert violations([gpu_isvc], gpu_allowed=lambda obj: False)[0].startswith("InferenceService/gpu-predictor: gpu:")


def test_pod_level_settings_count_for_non_root_and_seccomp_only():
    deployment = copy.deepcopy(next(o for o in GOOD if o["kind"] == "Deployment"))
    pod = deployment["spec"]["template"]["spec"]
    for container in pod["initContainers"] + pod["containers"]:
        for key in ("runAsNonRoot", "runAsUser", "seccompProfile"):
            container["securityContext"].pop(key, None)  # anchors: one dict may serve several containers
    assert violations([deployment]) == []  # the pod's runAsNonRoot and seccomp cover its containers
    # a container's own runAsUser wins over the pod's runAsNonRoot
    pod["containers"][0]["securityContext"] = {**pod["containers"][0]["securityContext"], "runAsUser": 0}
    assert [line.split(": ")[1] for line in violations([deployment])] == ["non-root"]


def test_a_storage_container_may_keep_a_writable_root_and_nothing_else():
    """KServe merges it into other tenants' pods (no scratch volume of its own): fleet/runtimes.py."""
    storage = copy.deepcopy(next(o for o in GOOD if o["kind"] == "ClusterStorageContainer"))
    storage["spec"]["container"]["securityContext"] = {**storage["spec"]["container"]["securityContext"],
                                                       "readOnlyRootFilesystem": False}
    assert violations([storage]) == []
    storage["spec"]["container"]["securityContext"]["allowPrivilegeEscalation"] = True
    assert [line.split(": ")[1] for line in violations([storage])] == ["privilege-escalation"]


def test_image_pinning():
    pinned = "sha256:" + "5f0c" * 16
    assert image_problem(f"ghcr.io/flywheel-ml/flywheel@{pinned}") is None
    assert image_problem(f"ghcr.io/flywheel-ml/flywheel:latest@{pinned}") is None  # the digest pins it
    assert "placeholder digest" in image_problem("ghcr.io/flywheel-ml/flywheel@sha256:" + "0" * 64)
    assert image_problem("registry.example.internal:5000/flywheel:0.1.0") is None
    assert "no tag" in image_problem("registry.example.internal:5000/flywheel")
    assert "latest" in image_problem("python:latest")
    assert image_problem(None) == "no image"


def test_references_to_secrets_are_not_secret_values():
    references = {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {
        "name": "flywheel-object-store", "key": "AWS_SECRET_ACCESS_KEY"}}}],
        "tls": {"credentialName": "flywheel-tls", "secretName": "flywheel-tls"}, "forwardOriginalToken": True}
    assert secret_looking(references) == []
    # where a credential is mounted is not the credential (kfp.client reads the token from this path)
    assert secret_looking({"env": [{"name": "KF_PIPELINES_SA_TOKEN_PATH", "value": "/var/run/kfp/token"}]}) == []
    assert len(secret_looking({"env": [{"name": "KFP_TOKEN", "value": "abc"}]})) == 1
    jwt = "eyJhbGciOiJSUzI1NiIsInR5cCI6.payload.sig"
    assert secret_looking({"note": jwt}) == ["note: value looks like a credential"]


# --------------------------------------------------------------------------------------------
# Compiled pipelines


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("ir")
    return {name: load_compiled(compile_pipeline(pinned_settings("prod"), name, out)) for name in sorted(PIPELINES)}


def test_compiled_pipelines_pass(compiled):
    for name, ir in compiled.items():
        assert ir["deploymentSpec"]["executors"], name
        assert pipeline_violations(ir, cluster=True) == [], name


def test_every_cluster_task_runs_as_the_images_non_root_user(compiled):
    ir = copy.deepcopy(compiled["monitoring"])
    contexts = ir["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {str(c["securityContext"]["runAsUser"]) for c in contexts.values()} == {"10001"}
    victim = sorted(contexts)[0]
    del contexts[victim]["securityContext"]
    assert pipeline_violations(ir, cluster=True) == [
        f"Executor/{victim}: non-root: no non-root securityContext (kubernetes.set_security_context)"]
    assert pipeline_violations(ir) == []  # kfp.local runs the tasks as this machine's user


def test_pipeline_rules_catch_planted_violations(compiled):
    ir = copy.deepcopy(compiled["training"])
    executors = ir["deploymentSpec"]["executors"]
    first, second = sorted(executors)[:2]
    for key in ("cpuLimit", "resourceCpuLimit"):  # kfp 2.17 writes both; either one sets the limit
        executors[first]["container"]["resources"].pop(key, None)
    executors[second]["container"]["image"] = "ghcr.io/flywheel-ml/flywheel:latest"
    executors[second]["container"].setdefault("env", []).append({"name": "MLFLOW_TRACKING_TOKEN", "value": "abc"})
    parameter = next(iter(ir["root"]["inputDefinitions"]["parameters"]))
    ir["root"]["inputDefinitions"]["parameters"][parameter]["defaultValue"] = "AKIAABCDEFGHIJKLMNOP"
    found = pipeline_violations(ir)
    assert f"Executor/{first}: resources: no cpu limit (task.set_cpu_limit)" in found
    assert any(line.startswith(f"Executor/{second}: image-tag: ") for line in found)
    assert any(line.startswith(f"Executor/{second}: secret-value: ") and "MLFLOW_TRACKING_TOKEN" in line
               for line in found)
    assert f"Pipeline/flywheel-training: secret-value: root.{parameter}.defaultValue: value looks like a credential" \
        in found
    assert len(found) == 4, found
