"""The rollout's status readers (deployment/status.py) are pure: each state an InferenceService
or a Deployment can be in is a dict here, with no API server and no fake."""
import pytest

from deployment import status


def isvc(mode="Knative", generation=2, observed=2, ready="True", predictor=None, transformer=False, **extra):
    obj = {"metadata": {"name": "credit-default", "generation": generation,
                        "annotations": {"serving.kserve.io/deploymentMode": mode}},
           "spec": {"predictor": {"containers": [{"name": "kserve-container", "args": ["--model_name", "cd"]}]}},
           "status": {"observedGeneration": observed, "conditions": [{"type": "Ready", "status": ready}],
                      "components": {"predictor": predictor or {}}, **extra}}
    if transformer:
        obj["spec"]["transformer"] = {"containers": [{"name": "kserve-container"}]}
    return obj


def revision(created, ready_, traffic=()):
    return {"latestCreatedRevision": created, "latestReadyRevision": ready_,
            "traffic": [{"revisionName": r, "percent": p, **({"tag": t, "url": f"http://{t}"} if t else {})}
                        for r, p, t in traffic]}


def test_a_generation_not_observed_yet_is_not_serving_and_says_so():
    obj = isvc(generation=3, observed=2)
    assert status.serving_reason(obj, {}) == "generation 3 not observed yet (observedGeneration 2)"
    assert not status.ready(obj)


def test_a_knative_canary_waits_for_a_new_ready_revision_then_its_share():
    before = {"predictor": "p-1"}
    same = isvc(predictor=revision("p-1", "p-1", [("p-1", 100, None)]))
    assert status.serving_reason(same, {}, ["predictor"], before, canary=10) == \
        "predictor: no new revision yet (latest created p-1)"
    starting = isvc(predictor=revision("p-2", "p-1"), ready="False")
    assert status.serving_reason(starting, {}, ["predictor"], before, canary=10).startswith(
        "predictor: revision p-2 not ready (latest ready p-1): Ready is False")
    unsplit = isvc(predictor=revision("p-2", "p-2", [("p-1", 100, None)]))
    assert status.serving_reason(unsplit, {}, ["predictor"], before, canary=10) == \
        "predictor: revision p-2 has 0% of traffic, waiting for 10%"
    split = isvc(predictor=revision("p-2", "p-2", [("p-1", 90, "prev"), ("p-2", 10, "latest")]))
    assert status.serving_reason(split, {}, ["predictor"], before, canary=10) is None
    assert status.tag_url(split, "predictor", "latest") == "http://latest"
    assert status.traffic_reason(split, {"predictor": "p-2"}, 100) == \
        "predictor: revision p-2 has 10% of traffic, waiting for 100%"


@pytest.mark.parametrize("deployment, reason", [
    ({"metadata": {"name": "d", "generation": 2}, "spec": {"replicas": 2}, "status": {"observedGeneration": 1}},
     "Deployment d: new spec not observed yet"),
    ({"metadata": {"name": "d"}, "spec": {"replicas": 2}, "status": {"updatedReplicas": 1}},
     "Deployment d: 1 of 2 replicas updated"),
    ({"metadata": {"name": "d"}, "spec": {"replicas": 1}, "status": {"updatedReplicas": 1, "replicas": 2}},
     "Deployment d: 1 old replicas pending termination"),
    ({"metadata": {"name": "d"}, "spec": {}, "status": {"updatedReplicas": 1, "replicas": 1}},
     "Deployment d: 0 of 1 updated replicas available"),
    ({"metadata": {"name": "d"}, "spec": {}, "status": {"conditions": [
        {"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "too slow"}]}},
     "Deployment d: ProgressDeadlineExceeded: too slow"),
    ({"metadata": {"name": "d"}, "spec": {}, "status": {"updatedReplicas": 1, "replicas": 1,
                                                        "availableReplicas": 1}}, None),
    (None, None),
])
def test_a_deployment_is_rolled_out_as_kubectl_rollout_status_says(deployment, reason):
    assert status.deployment_reason(deployment) == reason


def test_standard_mode_is_done_only_when_every_deployment_is_rolled_out():
    # kserve/kserve#4626: the InferenceService is Ready while its Deployment still rolls out
    obj = isvc(mode="Standard")
    rolling = {"predictor": {"metadata": {"name": "cd-predictor"}, "spec": {"replicas": 1}, "status": {}}}
    assert status.serving_reason(obj, rolling) == "Deployment cd-predictor: 0 of 1 replicas updated"
    assert status.serving_reason(obj, {"predictor": None}) is None


def test_legacy_mode_names_are_read_as_todays_and_the_entry_is_the_transformer_when_separate():
    assert status.mode(isvc(mode="Serverless")) == "Knative"
    assert status.mode({"status": {"deploymentMode": "RawDeployment"}}) == "Standard"
    assert status.entry(isvc(transformer=True)) == "transformer"
    assert status.model_name(isvc()) == "cd"


def test_a_failed_model_load_is_named_and_the_traffic_split_reported():
    obj = isvc(predictor=revision("p-2", "p-2", [("p-1", 90, None), ("p-2", 10, None)]),
               modelStatus={"lastFailureInfo": {"reason": "ModelLoadFailed", "message": "no such file"}})
    assert status.last_failure(obj) == "; last failure: ModelLoadFailed: no such file"
    assert status.traffic_split(obj, "Knative", {"p-2": "2"}, "1") == [
        {"revision": "p-1", "percent": 90, "tag": None, "model_version": "1"},
        {"revision": "p-2", "percent": 10, "tag": None, "model_version": "2"}]
    assert status.not_ready_reason(None) == "the InferenceService does not exist"
