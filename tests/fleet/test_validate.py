"""fleet/validate.py: every kind the fleet renders is held to its schema; typos and unknown kinds
are problems naming the object and the JSON path, never a silent pass."""
import copy
from pathlib import Path

import pytest
import yaml

from deployment.inferenceservice import ServedModel, render_for, to_dict
from fleet import validate
from fleet.validate import problems, problems_all
from pipelines.arguments import train_spec
from tests.fleet.conftest import pinned_settings
from training.backends.pytorchjob import build_pytorchjob
from training.backends.trainjob import build_trainjob

FIXTURES = Path(__file__).parent / "fixtures"
GOOD = yaml.safe_load((FIXTURES / "good.yaml").read_text())["objects"]


def builders_objects(env: str) -> list[dict]:
    """What the lifecycle's own builders put on a cluster of `env`: the InferenceService
    `flywheel deploy` applies, the PyTorchJob and TrainJob the training launchers submit."""
    settings = pinned_settings(env)
    isvc = to_dict(render_for(settings, ServedModel(name="credit-default", version="3", uri="s3://bucket/model")))
    spec = train_spec(settings)
    args = ["--data", "s3://bucket/data.parquet"]
    return [isvc, build_pytorchjob(spec, "flywheel-train", args, env={}),
            build_trainjob(spec, "flywheel-train", args, env={})]


def _id(obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("obj", GOOD, ids=_id)
def test_a_good_object_of_each_kind_validates(obj):
    assert problems(obj) == []


def test_the_good_fixture_covers_every_vendored_kind_and_core_ones():
    kinds = {(o["apiVersion"].rpartition("/")[0], o["kind"]) for o in GOOD}
    vendored = {key for key, name in validate.CRD_FILES.items() if (validate.crds.crd_dir() / name).is_file()}
    assert vendored - {("trainer.kubeflow.org", "TrainingRuntime"), ("serving.kserve.io", "InferenceService"),
                       ("kubeflow.org", "PyTorchJob")} <= kinds  # those three: the builders' objects below
    assert {("apps", "Deployment"), ("", "ConfigMap"), ("networking.k8s.io", "NetworkPolicy"),
            ("rbac.authorization.k8s.io", "Role"), ("policy", "PodDisruptionBudget")} <= kinds


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_the_builders_objects_validate(env):
    assert problems_all(builders_objects(env)) == []


def _with_typo(obj: dict) -> dict:
    bad = copy.deepcopy(obj)
    (bad["spec"] if isinstance(bad.get("spec"), dict) else bad)["flywheelTypo"] = 1
    return bad


@pytest.mark.parametrize("obj", GOOD + builders_objects("prod"), ids=_id)
def test_an_unknown_field_is_caught_in_every_kind(obj):
    """The API server would prune the field silently (a typo becomes a missing setting): here it
    is a problem that names the object and where the field is."""
    found = problems(_with_typo(obj))
    assert len(found) == 1 and found[0].startswith(f"{_id(obj)}: ") and "flywheelTypo" in found[0], found


def test_messages_name_object_path_and_rule():
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "np"},
              "spec": {"podSelector": {}, "ingres": []}}
    assert problems(policy) == [
        "NetworkPolicy/np: spec: Additional properties are not allowed ('ingres' was unexpected)"]
    authz = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "ap"},
             "spec": {"action": "ALOW", "rules": [{"from": [{"source": {"requestPrincipal": ["*"]}}]}]}}
    assert problems(authz) == [
        "AuthorizationPolicy/ap: spec.action: 'ALOW' is not one of ['ALLOW', 'DENY', 'AUDIT', 'CUSTOM']",
        "AuthorizationPolicy/ap: spec.rules[0].from[0].source.requestPrincipal: unknown field 'requestPrincipal'"]
    vs = next(copy.deepcopy(o) for o in GOOD if o["kind"] == "VirtualService")
    vs["spec"]["http"][0]["mirrorPercentage"]["value"] = "ten"
    assert problems(vs) == ["VirtualService/credit-default-shadow: spec.http[0].mirrorPercentage.value: "
                            "'ten' is not of type 'number'"]


def test_a_kind_without_a_schema_is_a_problem_never_a_pass():
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "r"}, "spec": {}}
    found = problems_all([widget, route])
    assert len(found) == 2
    assert found[0].startswith("Widget/w: (root): no schema for example.com/v1 Widget")
    assert found[1].startswith("HTTPRoute/r: (root): no schema for gateway.networking.k8s.io/v1 HTTPRoute")
    queue = {"apiVersion": "kueue.x-k8s.io/v1alpha9", "kind": "LocalQueue", "metadata": {"name": "q"}, "spec": {}}
    (line,) = problems(queue)
    assert line.startswith("LocalQueue/q: (root): no schema for kueue.x-k8s.io/v1alpha9 LocalQueue")
    assert "v1beta2" in line  # names the versions the CRD serves
    assert problems({"kind": "ConfigMap", "metadata": {"name": "x"}}) == [
        "ConfigMap/x: (root): apiVersion and kind are required"]
    assert problems({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}) == [
        "ConfigMap/?: metadata.name: required"]


def test_a_crd_copy_not_vendored_is_named_and_trainer_kinds_fall_back_to_the_api_models(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_CRD_DIR", str(tmp_path))  # a CRD folder with nothing in it
    isvc = builders_objects("dev")[0]
    assert problems(isvc) == [f"InferenceService/{isvc['metadata']['name']}: (root): no schema for "
                              "serving.kserve.io/v1beta1 InferenceService: "
                              "crds/serving.kserve.io_inferenceservices.yaml is not vendored"]
    runtime = next(o for o in GOOD if o["kind"] == "ClusterTrainingRuntime")
    assert problems(runtime) == []  # the kubeflow-trainer-api models hold it instead
    assert problems(_with_typo(runtime)) == ["ClusterTrainingRuntime/flywheel-torch: spec.flywheelTypo: unknown field"]


def test_promql_is_checked_by_promtool_in_one_call(monkeypatch):
    good = next(o for o in GOOD if o["kind"] == "PrometheusRule")
    bad = copy.deepcopy(good)
    bad["metadata"]["name"] = "broken"
    bad["spec"]["groups"][0]["rules"][0]["expr"] = "sum(rate(flywheel_serving_requests_total[5m]) > 1"
    calls = []
    run = validate.subprocess.run
    monkeypatch.setattr(validate.subprocess, "run", lambda *a, **k: calls.append(a) or run(*a, **k))
    (line,) = problems_all([good, bad])
    assert line.startswith('PrometheusRule/broken: spec: ') and "FlywheelErrors" in line and "parse error" in line
    assert len(calls) == 1


def test_without_promtool_promql_is_reported_unchecked(monkeypatch):
    monkeypatch.setattr(validate.shutil, "which", lambda name: None)
    rule = next(o for o in GOOD if o["kind"] == "PrometheusRule")
    assert problems(rule) == ["PrometheusRule/flywheel: spec: promtool not on PATH, PromQL unchecked "
                              "(Debian: apt-get install prometheus)"]
