"""Deploying the champion as an InferenceService against the fake Kubernetes API (which holds every
body to the official KServe CRD and scripts what the KServe/Knative controllers do): create then
patch, canary promote and rollback in Knative mode, rolling update and rollback in Standard mode,
timeouts that report the status's reason."""
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import crds
from deployment.deployers import deploy, plan, registry_model, rollback
from deployment.inferenceservice import MODEL_VERSION, ServedModel, render_for, steady_state
from deployment.rollout import InferenceServiceDeployer, merge_patch
from deployment.smoke import DeployError, SmokeFailed, SmokeTarget, http_smoke_test
from pipelines.config import load_settings
from tests.fakes.kube_api_server import fake_kserve  # noqa: F401 - the fixture, shared with the other fakes' users
from tests.fakes.kube_isvc_controllers import Failure, IsvcScript
from tests.support import mlflow_store

NAME = "credit-default"


def model(version: int) -> ServedModel:
    return ServedModel(NAME, str(version), f"s3://flywheel-models/{version}/artifacts/artifacts/model")


def options(fake, log: list, timeout: float = 3.0) -> dict:
    return {"client_configuration": fake.configuration(), "poll_interval": 0.005, "timeout": timeout,
            "log": log.append}


def failing(version: int, reason: str = "RevisionFailed", message: str = "Container failed with: OOMKilled"):
    """A script whose revisions/rollouts of model `version` never become ready."""
    marker = f"/{version}/artifacts"
    return IsvcScript(fail_when=lambda component, spec: Failure(reason, message) if marker in json.dumps(spec)
                      else None)


class Smoke:
    """A smoke test that records its targets and the traffic split it saw; fails for `bad` versions."""

    def __init__(self, fake, namespace: str, bad: tuple[str, ...] = ()):
        self.fake, self.namespace, self.bad = fake, namespace, bad
        self.targets: list[SmokeTarget] = []
        self.traffic_seen: list[list] = []

    def __call__(self, target: SmokeTarget):
        self.targets.append(target)
        status = self.fake.isvc(self.namespace, NAME)["status"]["components"]
        self.traffic_seen.append([(t["revisionName"], t["percent"]) for t in status["predictor"].get("traffic", [])])
        if target.model_version in self.bad:
            raise SmokeFailed(f"model version {target.model_version} answered 500")


def patches(fake) -> list[dict]:
    return [r.body for r in fake.calls("PATCH", rf"/inferenceservices/{NAME}$")]


def traffic(fake, namespace: str, component: str = "predictor") -> list[tuple]:
    status = fake.isvc(namespace, NAME)["status"]["components"][component]
    return [(t["revisionName"], t["percent"]) for t in status["traffic"]]


def test_the_fakes_status_has_the_shape_the_crd_gives_it(fake_kserve):
    # Given a Knative canary rollout and a Standard rolling update, done against the fake
    for env in ("prod", "dev"):
        settings = load_settings(env)
        deploy(settings, model(1), **options(fake_kserve, []))
        deploy(settings, model(2), **options(fake_kserve, []))
        # When the live object, status and all, is checked against the CRD
        live = fake_kserve.isvc(settings.namespace, NAME)
        # Then the scripted controllers wrote a status the real schema accepts
        assert crds.schema_problems(live, crds.INFERENCESERVICE, "v1beta1") == []
        assert live["status"]["observedGeneration"] == live["metadata"]["generation"]


def test_a_first_deploy_creates_and_a_second_patches(fake_kserve):
    # Given dev (Standard mode) and no InferenceService yet
    settings, log = load_settings("dev"), []
    smoke = Smoke(fake_kserve, settings.namespace)
    # When the champion is deployed, and then a new champion
    first = deploy(settings, model(1), smoke, **options(fake_kserve, log))
    second = deploy(settings, model(2), smoke, **options(fake_kserve, log))
    # Then the first created it (a body the CRD accepts, nothing pruned) and the second patched it
    assert first.ok and first.outcome == "created" and first.live_version == "1"
    assert second.ok and second.outcome == "updated" and second.live_version == "2"
    (create,) = fake_kserve.calls("POST", "/inferenceservices$")
    assert create.body["metadata"]["name"] == NAME and fake_kserve.warnings == []
    assert [p["spec"]["predictor"]["containers"][0]["args"][3] for p in patches(fake_kserve)] == [model(2).uri]
    assert all(ct == "application/merge-patch+json" for m, _, ct in fake_kserve.content_types if m == "PATCH")
    live = fake_kserve.isvc(settings.namespace, NAME)
    assert live["metadata"]["annotations"][MODEL_VERSION] == "2" and live["metadata"]["generation"] == 2
    # ... each was smoke-tested on the service URL once rolled out
    service = f"http://{NAME}-flywheel-dev.example.com"
    assert [(t.url, t.model_version, t.canary) for t in smoke.targets] == [(service, "1", False), (service, "2", False)]
    assert second.url == f"http://{NAME}-flywheel-dev.example.com"
    assert second.traffic == [{"revision": None, "percent": 100, "tag": None, "model_version": "2"}]


def test_deploying_what_already_serves_changes_nothing(fake_kserve):
    # Given prod serving model 1
    settings = load_settings("prod")
    deploy(settings, model(1), **options(fake_kserve, []))
    generation = fake_kserve.isvc(settings.namespace, NAME)["metadata"]["generation"]
    # When model 1 is deployed again
    again = deploy(settings, model(1), **options(fake_kserve, []))
    # Then nothing rolls out: no canary, no new revision
    assert again.outcome == "unchanged" and again.ok
    assert fake_kserve.isvc(settings.namespace, NAME)["metadata"]["generation"] == generation
    assert traffic(fake_kserve, settings.namespace) == [(f"{NAME}-predictor-00001", 100)]


def test_a_canary_that_passes_its_smoke_test_is_promoted(fake_kserve):
    # Given prod (Knative, 10% canary, one-process server) serving model 1
    settings, log = load_settings("prod"), []
    ns = settings.namespace
    deploy(settings, model(1), **options(fake_kserve, log))
    smoke = Smoke(fake_kserve, ns)
    # When model 2 is deployed
    result = deploy(settings, model(2), smoke, **options(fake_kserve, log))
    # Then the smoke test ran against the canary's latest- URL while it had 10% of the traffic
    (target,) = smoke.targets
    assert target.canary and target.model_version == "2" and target.revision == f"{NAME}-predictor-00002"
    assert target.url == f"http://latest-{NAME}-predictor.{ns}.example.com"
    assert smoke.traffic_seen == [[(f"{NAME}-predictor-00002", 10), (f"{NAME}-predictor-00001", 90)]]
    # ... then canaryTrafficPercent was removed, and the new revision serves everything
    assert [p["spec"]["predictor"].get("canaryTrafficPercent", "absent") for p in patches(fake_kserve)] == [10, None]
    assert result.outcome == "promoted" and result.ok and result.live_version == "2"
    assert result.traffic == [{"revision": f"{NAME}-predictor-00002", "percent": 100, "tag": "latest",
                               "model_version": "2"}]
    live = fake_kserve.isvc(ns, NAME)
    assert "canaryTrafficPercent" not in live["spec"]["predictor"]
    assert live["status"]["components"]["predictor"]["latestRolledoutRevision"] == f"{NAME}-predictor-00002"
    assert live["status"]["components"]["predictor"]["previousRolledoutRevision"] == f"{NAME}-predictor-00001"
    assert "promoted" in result.summary() and any("promoting model version 2" in line for line in log)


def test_a_canary_that_fails_its_smoke_test_is_rolled_back_to_the_previous_revision_and_spec(fake_kserve):
    # Given staging (Knative, 20% canary, separate transformer) serving model 1
    settings, log = load_settings("staging"), []
    ns = settings.namespace
    deploy(settings, model(1), **options(fake_kserve, log))
    previous_spec = fake_kserve.isvc(ns, NAME)["spec"]
    smoke = Smoke(fake_kserve, ns, bad=("2",))
    # When model 2 is deployed and fails its smoke test (its revisions are up: IngressReady)
    result = deploy(settings, model(2), smoke, **options(fake_kserve, log))
    # Then the test went to the transformer's canary URL, the component clients call
    (target,) = smoke.targets
    assert target.url == f"http://latest-{NAME}-transformer.{ns}.example.com"
    assert target.predictor_url == f"http://latest-{NAME}-predictor.{ns}.example.com"
    # ... traffic was pinned to the previous revision (canary 0), the previous spec restored with the
    # canary left at 0%, and then the restored revision took everything
    sent = patches(fake_kserve)
    canary_steps = [{c: p.get("spec", {}).get(c, {}).get("canaryTrafficPercent", "unchanged") for c in ("predictor",
                     "transformer")} for p in sent]
    assert canary_steps == [{"predictor": 20, "transformer": 20}, {"predictor": 0, "transformer": 0},
                            {"predictor": "unchanged", "transformer": "unchanged"},
                            {"predictor": None, "transformer": None}]
    assert model(1).uri in json.dumps(sent[2]) and model(2).uri not in json.dumps(sent[2])
    assert result.outcome == "rolled_back" and not result.ok
    assert "model version 2 answered 500" in result.reason
    live = fake_kserve.isvc(ns, NAME)
    assert live["spec"] == previous_spec and live["metadata"]["annotations"][MODEL_VERSION] == "1"
    assert result.live_version == "1"
    for component in ("predictor", "transformer"):
        assert traffic(fake_kserve, ns, component) == [(f"{NAME}-{component}-00003", 100)]
    assert result.traffic == [{"revision": f"{NAME}-transformer-00003", "percent": 100, "tag": "latest",
                               "model_version": "1"}]


def test_a_canary_revision_that_never_becomes_ready_is_rolled_back_with_its_reason(fake_kserve):
    # Given prod serving model 1, and a model 2 whose revision never becomes ready
    settings, log = load_settings("prod"), []
    ns = settings.namespace
    fake_kserve.isvc_scripts[NAME] = failing(2, "RevisionFailed", "Container failed with: OOMKilled")
    deploy(settings, model(1), **options(fake_kserve, log))
    previous_spec = fake_kserve.isvc(ns, NAME)["spec"]
    smoke = Smoke(fake_kserve, ns)
    # When model 2 is deployed
    result = deploy(settings, model(2), smoke, **options(fake_kserve, log, timeout=0.5))
    # Then it timed out with Knative's reason, no smoke test ran, and model 1 serves as before
    assert result.outcome == "rolled_back" and smoke.targets == []
    assert "canary not ready" in result.reason and "PredictorReady is False (RevisionFailed" in result.reason
    assert f'Revision "{NAME}-predictor-00002" failed with message: Container failed with: OOMKilled' in result.reason
    assert "last failure: ModelLoadFailed" in result.reason
    assert fake_kserve.isvc(ns, NAME)["spec"] == previous_spec and result.live_version == "1"
    assert traffic(fake_kserve, ns) == [(f"{NAME}-predictor-00003", 100)]


def test_a_standard_rolling_update_that_fails_its_smoke_test_re_applies_the_previous_spec(fake_kserve):
    # Given dev (Standard) serving model 1
    settings, log = load_settings("dev"), []
    ns = settings.namespace
    deploy(settings, model(1), **options(fake_kserve, log))
    previous_spec = fake_kserve.isvc(ns, NAME)["spec"]
    smoke = Smoke(fake_kserve, ns, bad=("2",))
    # When model 2 rolls out and fails its smoke test
    result = deploy(settings, model(2), smoke, **options(fake_kserve, log))
    # Then the previous spec is back and serving, and the result says why
    assert [t.model_version for t in smoke.targets] == ["2"]
    assert result.outcome == "rolled_back" and result.live_version == "1"
    assert "model version 2 answered 500" in result.reason
    assert fake_kserve.isvc(ns, NAME)["spec"] == previous_spec
    assert len(patches(fake_kserve)) == 2 and fake_kserve.isvc(ns, NAME)["metadata"]["generation"] == 3
    assert any("re-applying the previous spec" in line for line in log)


def test_a_stuck_standard_rollout_times_out_with_the_deployments_reason_though_the_isvc_says_ready(fake_kserve):
    # Given dev serving model 1, and a model 2 whose pods never become ready (the InferenceService
    # itself keeps reporting Ready while old pods serve: kserve/kserve#4626)
    settings, log = load_settings("dev"), []
    ns = settings.namespace
    fake_kserve.isvc_scripts[NAME] = failing(2, "CrashLoopBackOff", "back-off restarting failed container")
    deploy(settings, model(1), **options(fake_kserve, log))
    smoke = Smoke(fake_kserve, ns)
    # When model 2 is deployed
    result = deploy(settings, model(2), smoke, **options(fake_kserve, log, timeout=0.5))
    # Then the rollout is judged by the Deployment, times out with its reason, and is rolled back
    assert smoke.targets == [] and result.outcome == "rolled_back" and result.live_version == "1"
    assert f"Deployment {NAME}-predictor: ProgressDeadlineExceeded" in result.reason
    assert "last failure: ModelLoadFailed: back-off restarting failed container" in result.reason
    assert fake_kserve.calls("GET", f"/deployments/{NAME}-predictor$")


def test_a_first_deploy_that_never_becomes_ready_is_reported_and_left_for_inspection(fake_kserve):
    # Given prod, nothing deployed yet, and a model whose revision never becomes ready
    settings = load_settings("prod")
    fake_kserve.isvc_scripts[NAME] = failing(1, "RevisionFailed", "Container failed with: ImportError")
    # When it is deployed
    result = deploy(settings, model(1), **options(fake_kserve, [], timeout=0.3))
    # Then the result is a failure with Knative's reason, and the object is kept
    assert result.outcome == "failed" and not result.ok
    assert "PredictorReady is False (RevisionFailed" in result.reason and "ImportError" in result.reason
    assert fake_kserve.isvc(settings.namespace, NAME) is not None


def test_rollback_serves_the_previous_champion_again_without_a_canary(fake_kserve):
    # Given prod promoted from model 1 to model 2
    settings, log = load_settings("prod"), []
    ns = settings.namespace
    deploy(settings, model(1), **options(fake_kserve, log))
    deploy(settings, model(2), **options(fake_kserve, log))
    # When the previous champion (model 1) is rolled back to
    result = rollback(settings, model(1), Smoke(fake_kserve, ns), **options(fake_kserve, log))
    # Then model 1 serves everything at once, no canary step in between
    assert result.outcome == "rolled_back" and result.live_version == "1" and result.ok
    assert "canaryTrafficPercent" not in patches(fake_kserve)[-1]["spec"]["predictor"]
    live = fake_kserve.isvc(ns, NAME)
    assert "canaryTrafficPercent" not in live["spec"]["predictor"]
    assert traffic(fake_kserve, ns) == [(f"{NAME}-predictor-00003", 100)]


def test_a_rollback_whose_smoke_test_fails_is_reported_not_undone(fake_kserve):
    # Given dev serving model 2, and a previous champion that fails its smoke test
    settings = load_settings("dev")
    deploy(settings, model(2), **options(fake_kserve, []))
    # When it is rolled back to model 1
    result = rollback(settings, model(1), Smoke(fake_kserve, settings.namespace, bad=("1",)),
                      **options(fake_kserve, []))
    # Then model 1 stays (a rollback does not go back to what it replaces) and the result says it failed
    assert result.outcome == "failed" and result.live_version == "1" and "answered 500" in result.reason
    assert not result.ok


def test_changing_the_deployment_mode_in_place_is_refused_before_kserve_refuses_it(fake_kserve):
    # Given dev's InferenceService live in Standard mode
    settings = load_settings("dev")
    deploy(settings, model(1), **options(fake_kserve, []))
    knative = load_settings("dev", overrides={"serving": {"deployment_mode": "Knative"}})
    # When the same environment is deployed in Knative mode, Then the deployer says what to do instead
    with pytest.raises(DeployError, match="runs in Standard mode; changing it to Knative in place is rejected"):
        deploy(knative, model(2), **options(fake_kserve, []))
    assert patches(fake_kserve) == []


def test_an_object_created_under_the_legacy_mode_name_keeps_it(fake_kserve):
    # Given prod's InferenceService created before KServe 0.15 (status.deploymentMode "Serverless"),
    # which KServe's webhook compares with the annotation as a plain string
    settings = load_settings("prod")
    body = steady_state(plan(settings, model(1)))
    body["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Serverless"
    deployer = InferenceServiceDeployer(settings.namespace, client_configuration=fake_kserve.configuration(),
                                        poll_interval=0.005, timeout=3, log=lambda line: None)
    deployer.create(body)
    deployer._wait(NAME, "legacy object", deployer._serving_check())
    # When a new model is rolled out with the canary
    result = deploy(settings, model(2), **options(fake_kserve, []))
    # Then the webhook accepts the patches (the legacy spelling is kept) and the canary is promoted
    assert result.outcome == "promoted"
    live = fake_kserve.isvc(settings.namespace, NAME)
    assert live["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    assert live["metadata"]["annotations"][MODEL_VERSION] == "2"


def test_the_fake_api_refuses_what_the_crd_refuses_with_422_and_the_paths(fake_kserve):
    # Given a body that skips our validation and breaks the CRD
    body = steady_state(plan(load_settings("dev"), model(1)))
    body["spec"]["predictor"]["minReplicas"] = "two"
    body["spec"]["predictor"]["containers"][0]["ports"] = [{"name": "http1"}]  # containerPort is required
    deployer = InferenceServiceDeployer("flywheel-dev", client_configuration=fake_kserve.configuration())
    # When it is created, Then the API server's 422 names every path
    with pytest.raises(DeployError) as caught:
        deployer.create(body)
    message = str(caught.value)
    assert "422" in message and "spec.predictor.minReplicas" in message
    assert "spec.predictor.containers[0].ports[0].containerPort" in message
    assert fake_kserve.isvc("flywheel-dev", NAME) is None


def test_the_fake_api_takes_json_merge_and_json_patches_and_prunes_unknown_fields(fake_kserve):
    # Given an InferenceService on the fake
    settings = load_settings("dev")
    deploy(settings, model(1), **options(fake_kserve, []))
    url = f"{fake_kserve.url}/apis/serving.kserve.io/v1beta1/namespaces/flywheel-dev/inferenceservices/{NAME}"

    def send(body, content_type: str, query: str = ""):
        request = urllib.request.Request(url + query, data=json.dumps(body).encode(), method="PATCH",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read()), response.headers.get("Warning")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read()), None

    # When it is patched as kubectl --type=json would, Then the path is applied
    code, obj, _ = send([{"op": "replace", "path": "/spec/predictor/maxReplicas", "value": 3}],
                        "application/json-patch+json")
    assert code == 200 and obj["spec"]["predictor"]["maxReplicas"] == 3
    # ... a JSON patch whose test fails changes nothing
    code, _, _ = send([{"op": "test", "path": "/spec/predictor/maxReplicas", "value": 9},
                       {"op": "remove", "path": "/spec/predictor"}], "application/json-patch+json")
    assert code == 422 and fake_kserve.isvc("flywheel-dev", NAME)["spec"]["predictor"]["maxReplicas"] == 3
    # ... a merge patch with an unknown field: stored pruned, with the server's warning
    code, obj, warning = send({"spec": {"predictor": {"minReplica": 2}}}, "application/merge-patch+json")
    assert code == 200 and "minReplica" not in obj["spec"]["predictor"] and "spec.predictor.minReplica" in warning
    # ... and refused outright with fieldValidation=Strict
    code, obj, _ = send({"spec": {"predictor": {"minReplica": 2}}}, "application/merge-patch+json",
                        "?fieldValidation=Strict")
    assert code == 400 and "unknown field" in obj["message"]
    # ... a strategic merge patch is not for custom resources
    code, obj, _ = send({"spec": {}}, "application/strategic-merge-patch+json")
    assert code == 415 and obj["reason"] == "UnsupportedMediaType"
    # ... and what the CRD refuses is refused after patching too
    code, obj, _ = send({"spec": {"predictor": {"maxReplicas": "lots"}}}, "application/merge-patch+json")
    assert code == 422 and "spec.predictor.maxReplicas" in obj["message"]


def test_a_merge_patch_removes_what_the_new_spec_no_longer_has():
    # Given a live spec with a separate transformer and a canary, and a desired one without either
    live = {"spec": {"predictor": {"minReplicas": 1, "canaryTrafficPercent": 10, "containers": [{"name": "a"}]},
                     "transformer": {"containers": [{"name": "b"}]}}}
    desired = {"spec": {"predictor": {"minReplicas": 1, "containers": [{"name": "a"}, {"name": "c"}]}}}
    # When the merge patch is computed, Then removed keys are null and lists are replaced whole
    assert merge_patch(live, desired) == {"spec": {"predictor": {"canaryTrafficPercent": None,
                                                                 "containers": [{"name": "a"}, {"name": "c"}]},
                                                   "transformer": None}}


def test_plan_is_the_validated_object_for_a_dry_run():
    # Given prod's settings, When the deploy is planned, Then it is the rendered object, validated, with the canary
    settings = load_settings("prod")
    planned = plan(settings, model(3))
    assert planned["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert planned["metadata"]["annotations"][MODEL_VERSION] == "3"
    assert "canaryTrafficPercent" not in plan(settings, model(3), canary=False)["spec"]["predictor"]
    assert render_for(settings, model(3)).metadata.name == NAME


def test_the_deployer_needs_no_cluster_until_it_calls_one():
    # Given no kubeconfig and no cluster, When a deployer is made, Then it makes no client yet
    deployer = InferenceServiceDeployer("flywheel-dev")
    assert not deployer.kube.connected


class _Predictor(BaseHTTPRequestHandler):
    """A stand-in ModelServer answering v1 predict (500 for model 'broken'), recording Host headers."""

    hosts: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).hosts.append((self.headers["Host"], self.path))
        if "broken" in self.path:
            data, code = b'{"error": "boom"}', 500
        else:
            data, code = json.dumps({"predictions": [0] * len(body["instances"])}).encode(), 200
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def model_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Predictor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Predictor.hosts = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_http_smoke_test_sends_a_real_prediction_request(model_server):
    # Given a server answering v1 predictions, and two records
    records = [{"age": 30, "income": 1.0}, {"age": 41, "income": 2.0}]
    smoke = http_smoke_test(records)
    # When the smoke test targets it, Then one prediction per record passes
    answer = smoke(SmokeTarget(model_server, NAME, "2", canary=True))
    assert answer == {"predictions": [0, 0]} and _Predictor.hosts == [(model_server[7:], f"/v1/models/{NAME}:predict")]
    # ... a 500 fails with the status and body
    with pytest.raises(SmokeFailed, match="500"):
        smoke(SmokeTarget(model_server, "broken", "2", canary=True))
    # ... and through an ingress, the target's host goes in the Host header
    via_ingress = http_smoke_test(records, ingress=model_server)
    via_ingress(SmokeTarget(f"http://latest-{NAME}-predictor.flywheel-prod.example.com", NAME, "2", canary=True))
    assert _Predictor.hosts[-1] == (f"latest-{NAME}-predictor.flywheel-prod.example.com", f"/v1/models/{NAME}:predict")


def test_the_registry_lookup_finds_the_model_directory_inside_the_registered_version(tmp_path):
    # Given an MLflow registry where version 1 is the previous champion and 2 the champion, each a
    # pyfunc carrying the flywheel model directory as its `model_dir` artifact (as register_model logs it)
    from gateways.mlflow_api import mlflow_at, mlflow_module

    uri = mlflow_store(tmp_path / "mlflow.db")
    mlflow = mlflow_module()

    class Identity(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str]) -> list[str]:  # hinted, or MLflow warns
            return model_input

    with mlflow_at(uri):
        experiment = mlflow.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
        for version in (1, 2):
            model_dir = tmp_path / f"trained-{version}"
            model_dir.mkdir()
            (model_dir / "metadata.json").write_text(json.dumps({"version": version}))
            with mlflow.start_run(experiment_id=experiment):
                info = mlflow.pyfunc.log_model(name="model", python_model=Identity(),
                                               artifacts={"model_dir": str(model_dir)}, pip_requirements=[])
            mlflow.register_model(info.model_uri, NAME)
    client = mlflow.MlflowClient(uri, uri)
    # When champion and previous-champion are looked up, before and after the aliases exist
    assert registry_model(uri, NAME, "previous-champion") is None
    client.set_registered_model_alias(NAME, "champion", "2")
    client.set_registered_model_alias(NAME, "previous-champion", "1")
    champion = registry_model(uri, NAME)
    previous = registry_model(uri, NAME, "previous-champion")
    # Then each names its version and the model directory a predictor loads with --model_dir
    assert (champion.name, champion.version, previous.version) == (NAME, "2", "1")
    with open(f"{previous.uri}/metadata.json") as stored:
        assert json.load(stored) == {"version": 1}
    assert previous.uri.endswith("/artifacts/trained-1") and champion.uri.endswith("/artifacts/trained-2")
    assert registry_model(uri, "no-such-model") is None


def test_deploy_model_serves_a_deploy_spec_as_an_inferenceservice_and_rolls_it_back(fake_kserve, model_server,
                                                                                  monkeypatch):
    # Given prod's DeploySpec (what the deploy task receives), a registry whose versions' model
    # directories are in the object store, and a model server behind the ingress for the smoke test
    from deployment.deployers import deploy_model, plan_model, roll_back_model
    from pipelines.arguments import deploy_spec

    settings, log = load_settings("prod"), []
    spec, ns, tracking = deploy_spec(settings), settings.namespace, "sqlite:///registry.db"
    asked = []

    def model_dir_uri(tracking_uri, registered_model, version):
        asked.append((tracking_uri, registered_model, version))
        return model(int(version)).uri

    monkeypatch.setattr("stages.versions.model_dir_uri", model_dir_uri)
    records = [{"age": 30, "income": 1.0}, {"age": 41, "income": 2.0}]
    # When version 1 is deployed, then version 2 (a canary in prod), then version 1 is rolled back to
    first = deploy_model(spec, None, "1", records, tracking_uri=tracking, ingress=model_server,
                         **options(fake_kserve, log))
    second = deploy_model(spec, "/ignored/on/a/cluster", "2", records, tracking_uri=tracking, ingress=model_server,
                          **options(fake_kserve, log))
    back = roll_back_model(spec, "1", records, tracking_uri=tracking, ingress=model_server,
                           **options(fake_kserve, log))
    # Then each says what is live, in the same shape a local deploy has
    assert set(first) == {"deployer", "version", "outcome", "live", "url", "detail"}
    assert {k: first[k] for k in ("deployer", "version", "outcome", "live", "url")} == {
        "deployer": "inferenceservice", "version": "1", "outcome": "created", "live": f"{NAME} v1",
        "url": f"http://{NAME}.{ns}.example.com"}
    assert (second["outcome"], second["live"]) == ("promoted", f"{NAME} v2")
    assert (back["outcome"], back["live"], back["version"]) == ("rolled_back", f"{NAME} v1", "1")
    assert f"InferenceService {ns}/{NAME} (Knative): created" in first["detail"]
    # ... the cluster's model came from the registry (model_dir is not used), rendered as plan_model shows it
    assert asked == [(tracking, NAME, "1"), (tracking, NAME, "2"), (tracking, NAME, "1")]
    live = fake_kserve.isvc(ns, NAME)
    assert live["metadata"]["annotations"][MODEL_VERSION] == "1"
    assert steady_state(plan_model(spec, "1", tracking))["spec"] == live["spec"]
    # ... and every smoke test was a real prediction through the ingress (the canary's on its latest- URL)
    assert [host for host, _ in _Predictor.hosts] == [f"{NAME}.{ns}.example.com",
                                                      f"latest-{NAME}-predictor.{ns}.example.com",
                                                      f"{NAME}.{ns}.example.com"]
