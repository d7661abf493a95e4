"""The cluster's shadow route (`fleet/shadow.py`): an Istio VirtualService that keeps every answer
the champion's and mirrors to the challenger InferenceService, valid against Istio's CRD."""
import pytest

from fleet.shadow import shadow_virtual_service
from fleet.validate import problems
from pipelines.config import load_settings


def test_the_champion_answers_and_the_challenger_gets_a_mirrored_copy():
    serving = load_settings("staging").serving.model_copy(update={"deployment_mode": "Standard",
                                                                  "topology": "collocated"})
    vs = shadow_virtual_service("credit-default", "flywheel-staging", serving, percent=25)
    assert problems(vs) == []
    assert vs["apiVersion"] == "networking.istio.io/v1" and vs["kind"] == "VirtualService"
    champion = "credit-default-predictor.flywheel-staging.svc.cluster.local"
    assert vs["spec"]["hosts"] == [champion] and vs["spec"]["gateways"] == ["mesh"]
    (route,) = vs["spec"]["http"]
    assert route["route"] == [{"destination": {"host": champion, "port": {"number": 80}}, "weight": 100}]
    assert route["mirror"] == {"host": "credit-default-challenger-predictor.flywheel-staging.svc.cluster.local",
                               "port": {"number": 80}}
    assert route["mirrorPercentage"] == {"value": 25.0}
    single = shadow_virtual_service("credit-default", "ns", serving.model_copy(update={"topology": "single"}))
    assert single["spec"]["hosts"] == ["credit-default-predictor.ns.svc.cluster.local"]  # the one process
    separate = shadow_virtual_service("credit-default", "ns", serving.model_copy(update={"topology": "separate"}))
    assert separate["spec"]["hosts"] == ["credit-default-transformer.ns.svc.cluster.local"]
    assert separate["spec"]["http"][0]["mirror"]["host"].startswith("credit-default-challenger-transformer.")


def test_knative_mode_and_a_bad_percent_are_refused():
    serving = load_settings("staging").serving
    with pytest.raises(ValueError, match="Knative"):
        shadow_virtual_service("m", "ns", serving.model_copy(update={"deployment_mode": "Knative"}))
    with pytest.raises(ValueError, match="percent"):
        shadow_virtual_service("m", "ns", serving.model_copy(update={"deployment_mode": "Standard"}), percent=0)
