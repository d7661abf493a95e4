"""The champion as an InferenceService: rendered per environment from config, held to the official
KServe CRD (crds/) and to the rules the CRD cannot express."""
import copy

import pytest

import crds
from deployment.inferenceservice import (
    DEPLOYMENT_MODE,
    KNATIVE_AUTOSCALER_CLASS,
    KNATIVE_HPA,
    MODEL_URI,
    MODEL_VERSION,
    PREDICTOR_CONTAINER,
    TAG_ROUTING,
    TRANSFORMER_CONTAINER,
    InferenceServiceInvalid,
    ServedModel,
    policy_problems,
    render_for,
    schema_problems,
    to_dict,
    validate_inferenceservice,
)
from pipelines.config import environments, load_settings

CLUSTER_ENVS = [env for env in environments() if not load_settings(env).embedded]
MODEL = ServedModel("credit-default", "7", "s3://flywheel-models/m-7/artifacts/artifacts/model")
COLLOCATED = {"serving": {"topology": "collocated"}}  # dev and prod serve in one process (single) by default


def rendered(env: str, overrides: dict | None = None, model: ServedModel = MODEL) -> dict:
    return to_dict(render_for(load_settings(env, overrides=overrides), model))


def containers(obj: dict, component: str) -> list[dict]:
    return obj["spec"][component]["containers"]


def arg(container: dict, flag: str) -> str:
    args = container["args"]
    return args[args.index(flag) + 1]


def test_the_cluster_environments_are_the_ones_configured():
    # Given config/, When the environments that run on a cluster are listed, Then dev, staging, prod are among them
    assert {"dev", "staging", "prod"} <= set(CLUSTER_ENVS)


TOPOLOGIES = ["single", "collocated", "separate"]


@pytest.mark.parametrize("topology", [None, *TOPOLOGIES], ids=["configured", *TOPOLOGIES])
@pytest.mark.parametrize("env", CLUSTER_ENVS)
def test_every_environment_renders_a_valid_inferenceservice_in_its_mode(env, topology):
    # Given an environment's settings (its own topology, or each one) and a registered model version
    overrides = {"serving": {"topology": topology}} if topology else None
    settings = load_settings(env, overrides=overrides)
    serving = settings.serving
    # When its InferenceService is rendered
    obj = rendered(env, overrides)
    # Then it holds against the official CRD and our rules
    assert schema_problems(obj) == [] and policy_problems(obj) == []
    assert validate_inferenceservice(obj) == obj
    meta = obj["metadata"]
    assert (obj["apiVersion"], obj["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert meta["name"] == "credit-default" and meta["namespace"] == settings.namespace
    # ... in the env's deployment mode, with the model version and URI recorded
    assert meta["annotations"][DEPLOYMENT_MODE] == serving.deployment_mode
    assert meta["annotations"][MODEL_VERSION] == "7" and meta["annotations"][MODEL_URI] == MODEL.uri
    assert meta["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert meta["labels"]["flywheel/env"] == env and meta["labels"]["app.kubernetes.io/part-of"] == "flywheel"
    knative = serving.deployment_mode == "Knative"
    assert (meta["annotations"].get(TAG_ROUTING) == "true") == knative
    components = ["predictor"] + (["transformer"] if serving.topology == "separate" else [])
    assert [c for c in ("predictor", "transformer") if c in obj["spec"]] == components
    for component in components:
        part = obj["spec"][component]
        # ... with the env's replicas and autoscaling
        assert (part["minReplicas"], part["maxReplicas"]) == (serving.min_replicas, serving.max_replicas)
        assert (part["scaleMetric"], part["scaleTarget"]) == (serving.scale_metric, serving.scale_target)
        # ... a canary only where Knative and canary_percent say so
        if knative and serving.canary_percent:
            assert part["canaryTrafficPercent"] == serving.canary_percent
        else:
            assert "canaryTrafficPercent" not in part
        assert ("deploymentStrategy" in part) == (not knative)
        assert part["automountServiceAccountToken"] is False
        assert part["annotations"]["prometheus.io/path"] == "/metrics"
        for container in part["containers"]:
            # ... our image, requests = limits, non-root, probes on the v2 health endpoints
            assert container["image"] == settings.image.ref
            want = {"cpu": serving.cpu, "memory": serving.memory}
            assert container["resources"] == {"requests": want, "limits": want}
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True and security["capabilities"] == {"drop": ["ALL"]}
            sidecar = knative and len(part["containers"]) > 1 and "ports" not in container
            if sidecar:  # Knative probes only the serving container (knative/serving#12615)
                assert "readinessProbe" not in container and "livenessProbe" not in container
            else:
                assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
                assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
            assert arg(container, "--model_dir") == MODEL.uri and arg(container, "--model_name") == "credit-default"
            assert container["envFrom"] == [{"secretRef": {"name": "flywheel-object-store"}}]
    if knative and serving.scale_metric in ("cpu", "memory"):
        assert meta["annotations"][KNATIVE_AUTOSCALER_CLASS] == KNATIVE_HPA
    # ... and the transformer where the env puts it, or none: one process in the predictor
    check_topology(obj, settings)


def check_topology(obj: dict, settings) -> None:
    """The transformer where the env puts it, or none: one process in the predictor."""
    serving, predictor = settings.serving, containers(obj, "predictor")
    if serving.topology == "single":
        (server,) = predictor
        assert server["name"] == PREDICTOR_CONTAINER and server["command"] == ["python", "-m", "serving.single"]
        assert "--predictor_host" not in server["args"] and arg(server, "--host") == "0.0.0.0"
        assert float(arg(server, "--decision_threshold")) == settings.evaluation.decision_threshold
        assert server["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
        assert ("logger" in obj["spec"]["predictor"]) == bool(serving.payload_logging.url)
    elif serving.topology == "collocated":
        assert [c["name"] for c in predictor] == [PREDICTOR_CONTAINER, TRANSFORMER_CONTAINER]
        model, transformer = predictor
        assert model["command"] == ["python", "-m", "serving.predictor"]
        assert transformer["command"] == ["python", "-m", "serving.transformer"]
        assert arg(transformer, "--predictor_host").startswith("127.0.0.1:")
        assert arg(transformer, "--predictor_protocol") == serving.hop_protocol
        assert "--enable_predictor_health_check" in transformer["args"]
        assert "ports" not in model and transformer["ports"][0]["containerPort"] == 8080  # one port per pod
        assert arg(model, "--http_port") != arg(transformer, "--http_port")
    else:
        assert [c["name"] for c in predictor] == [PREDICTOR_CONTAINER]
        (transformer,) = containers(obj, "transformer")
        assert transformer["name"] == PREDICTOR_CONTAINER
        assert transformer["command"] == ["python", "-m", "serving.transformer"]
        assert arg(transformer, "--predictor_host").startswith(f"credit-default-predictor.{settings.namespace}")


def test_the_configured_environments_cover_both_modes_and_the_cpu_and_gpu_topologies():
    # Given the cluster environments, When their serving settings are compared, Then the configs exercise
    # Standard and Knative, one process (the CPU default) and a separate transformer, and a canary;
    # every topology is rendered in every env above
    serving = [load_settings(env).serving for env in CLUSTER_ENVS]
    assert {s.deployment_mode for s in serving} == {"Standard", "Knative"}
    assert {s.topology for s in serving} == {"single", "separate"}
    assert load_settings("staging").serving.topology == "separate"
    assert any(s.canary_percent for s in serving)


def test_the_sdk_serialization_leaves_no_empty_names_or_nulls():
    # Given a rendered InferenceService (kserve's V1beta1ModelSpec emits name '' unless set)
    obj = rendered("staging")

    def walk(value, path="") -> list[str]:
        if isinstance(value, dict):
            return [p for k, v in value.items() for p in walk(v, f"{path}.{k}")]
        if isinstance(value, list):
            return [p for i, v in enumerate(value) for p in walk(v, f"{path}[{i}]")]
        return [path] if value in ("", None) else []

    # When it is walked, Then no field is empty or null, and no `model` stanza sneaks in
    assert walk(obj) == []
    assert "model" not in obj["spec"]["predictor"]


@pytest.mark.parametrize("env, receiver", [("prod", "predictor"), ("staging", "transformer")])
def test_payload_logging_goes_on_the_component_that_receives_client_traffic(env, receiver):
    # Given payload logging to the monitor's sink
    overrides = {"serving": {"payload_logging": {"url": "http://flywheel-monitor.flywheel.svc/events", "mode": "all"}}}
    # When the InferenceService is rendered
    obj = rendered(env, overrides)
    # Then the logger sits on the client-facing component only, and the object is valid; it forwards
    # x-request-id by Go's canonical name, the only spelling kserve pkg/logger/handler.go matches
    # (`slices.Contains(metadataHeaders, name)` over r.Header's canonical keys)
    assert obj["spec"][receiver]["logger"] == {"url": "http://flywheel-monitor.flywheel.svc/events", "mode": "all",
                                               "metadataHeaders": ["X-Request-Id"]}
    assert [c for c in ("predictor", "transformer") if (obj["spec"].get(c) or {}).get("logger")] == [receiver]
    validate_inferenceservice(obj)


def test_sampled_payload_logging_is_refused_since_the_kserve_logger_cannot_sample():
    # Given payload logging with a sample rate below 1, When rendered for a cluster, Then it says why not
    overrides = {"serving": {"payload_logging": {"url": "http://sink/events", "sample_rate": 0.1}}}
    with pytest.raises(ValueError, match="sample_rate"):
        rendered("dev", overrides)


def test_every_broken_rule_is_reported_with_its_path():
    # Given a valid Knative InferenceService with a collocated transformer, broken in many ways at once
    obj = rendered("prod", COLLOCATED)
    bad = copy.deepcopy(obj)
    predictor = bad["spec"]["predictor"]
    predictor["canaryTrafficPercent"] = 150
    predictor["containers"][1]["name"] = "sidecar"
    del predictor["containers"][0]["resources"]
    predictor["containers"][0]["securityContext"]["runAsNonRoot"] = False
    predictor["securityContext"]["runAsNonRoot"] = False
    predictor["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    predictor["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc123"})
    predictor["containers"][1]["env"].append({"name": "MLFLOW_TRACKING_URI", "value": "http://me:pw@mlflow:5000"})
    predictor["minReplica"] = 1  # a typo the API server would silently prune
    predictor["scaleMetric"] = "cpu"  # Knative without the HPA class
    # When it is validated
    with pytest.raises(InferenceServiceInvalid) as caught:
        validate_inferenceservice(bad)
    # Then it is a ValueError naming the object, and every problem comes with its JSON path
    assert isinstance(caught.value, ValueError) and "'credit-default'" in str(caught.value)
    problems = caught.value.problems
    expected = [
        "spec.predictor.minReplica: unknown field 'minReplica'",
        "spec.predictor.canaryTrafficPercent: must be 0-100",
        "spec.predictor.containers[1].name: 'sidecar' is not allowed",
        "spec.predictor.containers[0].resources.requests: must set cpu and memory",
        "spec.predictor.containers[0].resources.limits: must set cpu and memory",
        "spec.predictor.containers[0].securityContext.runAsNonRoot: must be true",
        "spec.predictor.containers[0].securityContext.allowPrivilegeEscalation: must be false",
        "spec.predictor.containers[0].env[",
        "spec.predictor.containers[1].env[",
        "spec.predictor.scaleMetric: 'cpu' in Knative mode needs annotation autoscaling.knative.dev/class",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, problems)
    assert any("AWS_SECRET_ACCESS_KEY looks like a credential" in p for p in problems)
    assert any("literal credential" in p for p in problems)


def test_the_crd_alone_lets_a_bad_canary_through_and_our_rules_do_not():
    # Given canaryTrafficPercent 150 (the CRD does not bound it), and a canary in Standard mode
    too_much = rendered("prod")
    too_much["spec"]["predictor"]["canaryTrafficPercent"] = 150
    standard = rendered("dev")
    standard["spec"]["predictor"]["canaryTrafficPercent"] = 10
    # When each is checked against the CRD and against our rules
    # Then the CRD passes both and our rules catch both, with the path and the reason
    assert crds.schema_problems(too_much, crds.INFERENCESERVICE, "v1beta1") == []
    assert crds.schema_problems(standard, crds.INFERENCESERVICE, "v1beta1") == []
    assert policy_problems(too_much) == ["spec.predictor.canaryTrafficPercent: must be 0-100, got 150"]
    assert policy_problems(standard) == [
        "spec.predictor.canaryTrafficPercent: only read in Knative mode (Standard mode has no revisions to split "
        "traffic between)"]


@pytest.mark.parametrize("mutate, path", [
    (lambda o: o["metadata"]["annotations"].pop(DEPLOYMENT_MODE), f"metadata.annotations.{DEPLOYMENT_MODE}"),
    (lambda o: o["metadata"]["annotations"].update({DEPLOYMENT_MODE: "Serverless"}),
     f"metadata.annotations.{DEPLOYMENT_MODE}"),
    (lambda o: o["spec"]["predictor"].update({"scaleMetric": "concurrency"}), "spec.predictor.scaleMetric"),
    (lambda o: o["spec"]["predictor"].update({"minReplicas": 0}), "spec.predictor.minReplicas"),
    (lambda o: o["spec"]["predictor"]["containers"][0].update({"name": "model"}), "spec.predictor.containers[0].name"),
    (lambda o: o["spec"]["predictor"]["containers"][1].pop("readinessProbe"),
     "spec.predictor.containers[1].readinessProbe"),
    (lambda o: o["spec"]["predictor"]["containers"][0]["securityContext"].update({"runAsUser": 0}),
     "spec.predictor.containers[0].securityContext.runAsUser"),
    (lambda o: o["metadata"]["annotations"].pop(MODEL_VERSION), f"metadata.annotations.{MODEL_VERSION}"),
    (lambda o: o["metadata"].update({"name": "Credit_Default"}), "metadata.name"),
    (lambda o: o["metadata"].update({"name": "a-much-too-long-inference-service-name-for-kserve-hosts"}),
     "metadata.name"),
    (lambda o: o["spec"]["predictor"].update({"logger": {"url": "monitor:8080", "mode": "all"}}),
     "spec.predictor.logger.url"),
    (lambda o: o["spec"]["predictor"].update({"minReplicas": "one"}), "spec.predictor.minReplicas"),
])
def test_a_standard_mode_spec_breaking_one_rule_is_rejected_at_that_path(mutate, path):
    # Given dev's valid Standard-mode InferenceService (collocated transformer) with one thing broken
    obj = rendered("dev", COLLOCATED)
    mutate(obj)
    # When it is validated, Then the problem names that path
    with pytest.raises(InferenceServiceInvalid) as caught:
        validate_inferenceservice(obj)
    assert any(p.startswith(path + ":") or p.startswith(path + " ") for p in caught.value.problems), \
        caught.value.problems


def test_a_knative_collocated_pod_is_ready_through_the_transformer_only():
    # Given prod (Knative) with a collocated transformer
    obj = rendered("prod", COLLOCATED)
    model, transformer = containers(obj, "predictor")
    # Then the predictor carries no probes (Knative would refuse them) and the transformer's
    # readiness includes the predictor's
    assert "readinessProbe" not in model and "--enable_predictor_health_check" in transformer["args"]
    # ... and putting them back, or dropping the health check, is rejected with the reason
    broken = copy.deepcopy(obj)
    broken["spec"]["predictor"]["containers"][0]["readinessProbe"] = transformer["readinessProbe"]
    broken["spec"]["predictor"]["containers"][1]["args"].remove("--enable_predictor_health_check")
    with pytest.raises(InferenceServiceInvalid) as caught:
        validate_inferenceservice(broken)
    assert caught.value.problems == [
        "spec.predictor.containers[1].args: a collocated transformer needs --enable_predictor_health_check (else the "
        "pod is ready while the predictor is not)",
        "spec.predictor.containers[0].readinessProbe: Knative refuses probes on a container without the serving port "
        "unless multi-container-probing is enabled (knative/serving#12615)"]


def test_a_standard_collocated_pod_probes_both_containers():
    # Given dev (Standard: a plain Deployment, the kubelet probes every container)
    model, transformer = containers(rendered("dev", COLLOCATED), "predictor")
    # Then both have readiness on the v2 endpoint, each on its own port
    assert model["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8085}
    assert transformer["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}


def test_a_separate_transformer_beside_a_collocated_one_is_rejected():
    # Given staging's separate transformer plus a collocated transformer container in the predictor
    obj = rendered("staging")
    extra = copy.deepcopy(obj["spec"]["transformer"]["containers"][0])
    extra["name"] = TRANSFORMER_CONTAINER
    extra.pop("ports")
    obj["spec"]["predictor"]["containers"].append(extra)
    # When validated, Then both transformers are named as the problem
    with pytest.raises(InferenceServiceInvalid, match="spec.predictor.containers: a collocated 'transformer-container' "
                                                      "and spec.transformer both transform"):
        validate_inferenceservice(obj)


def test_a_transformer_in_front_of_the_one_process_server_is_rejected():
    # Given dev serving in one process, and a collocated transformer or a separate one added in front of it
    obj = rendered("dev")
    assert [c["command"][-1] for c in containers(obj, "predictor")] == ["serving.single"]
    collocated = copy.deepcopy(obj)
    extra = copy.deepcopy(containers(rendered("dev", COLLOCATED), "predictor")[1])
    collocated["spec"]["predictor"]["containers"].append(extra)
    separate = copy.deepcopy(obj)
    separate["spec"]["transformer"] = copy.deepcopy(rendered("staging")["spec"]["transformer"])
    # When validated, Then the one process is named: it answers raw records, a transformer would send it tensors
    assert [p for p in policy_problems(collocated) if "serving.single" in p] == [
        "spec.predictor.containers: serving.single is the predictor's only container (topology single); found "
        "['kserve-container', 'transformer-container']"]
    assert [p for p in policy_problems(separate) if "serving.single" in p] == [
        "spec.predictor.containers[0].command: serving.single answers raw records itself; spec.transformer in front "
        "of it would send it tensors (topology single has no transformer)"]
    assert policy_problems(obj) == []


def test_the_old_transformer_key_names_its_replacement():
    # Given a config still saying serving.transformer, When loaded, Then the error names the new key
    with pytest.raises(ValueError, match=r"serving.transformer \('separate'\) was replaced by serving.topology"):
        load_settings("dev", overrides={"serving": {"transformer": "separate"}})


@pytest.mark.parametrize("env", CLUSTER_ENVS)
def test_every_pod_server_says_where_it_binds_whatever_the_image_sets(env):
    # The servers bind loopback unless told (serving/server.py); a pod's probes and queue-proxy come
    # from outside the container, so the rendered args say it, not only the image's environment.
    obj = rendered(env)
    knative = obj["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    for component in ("predictor", "transformer"):
        for container in obj["spec"].get(component, {}).get("containers", []):
            collocated_predictor = component == "predictor" and len(containers(obj, "predictor")) == 2 \
                and container is containers(obj, "predictor")[0]
            expected = "127.0.0.1" if collocated_predictor and knative else "0.0.0.0"
            assert arg(container, "--host") == expected, (component, container["name"])
