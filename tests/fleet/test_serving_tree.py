"""The InferenceService as the GitOps tree holds it: `flywheel deploy`'s builder with the cluster's
placement, its identity, its disruption budgets, and a model URI that real `kubectl kustomize`
replaces from a local-config ConfigMap that is never applied."""
import dataclasses
import shutil
import subprocess

import pytest
import yaml

from deployment.inferenceservice import (
    COMPONENTS,
    MODEL_URI,
    MODEL_VERSION,
    InferenceServiceInvalid,
    ServedModel,
    render,
    to_dict,
)
from fleet import serving
from fleet.context import MODEL_URI_PLACEHOLDER
from tests.fleet.conftest import contexts

SERVING_CTX = [(env, i) for env in ("dev", "staging", "prod") for i in range(len(contexts(env)))]


def kinds(objs):
    return {o["kind"]: o for o in objs}


def isvc_of(ctx) -> dict:
    return kinds(serving.objects(ctx))["InferenceService"]


def with_cluster(ctx, **update):
    return dataclasses.replace(ctx, cluster=ctx.cluster.model_copy(update=update))


def test_the_tree_holds_what_flywheel_deploy_renders_plus_the_clusters_placement(fleet_ctx):
    """Containers, annotations and pod security are the deploy builder's own; only placement differs."""
    spec = fleet_ctx.deploy
    deployed = to_dict(render(spec.serving, image=spec.image, namespace=fleet_ctx.namespace, env=fleet_ctx.env,
                              model=ServedModel(spec.model_name, serving.MODEL_VERSION_PLACEHOLDER,
                                                MODEL_URI_PLACEHOLDER),
                              object_store_endpoint=spec.object_store_endpoint, canary=False,
                              decision_threshold=spec.decision_threshold))
    tree = isvc_of(fleet_ctx)
    for component in COMPONENTS:
        assert bool(tree["spec"].get(component)) == bool(deployed["spec"].get(component))
        if deployed["spec"].get(component):
            for key in ("containers", "securityContext", "volumes", "logger", "maxReplicas"):
                if key != "maxReplicas" or fleet_ctx.cluster.predictor_replicas is None:
                    assert tree["spec"][component].get(key) == deployed["spec"][component].get(key), key
    assert {k: v for k, v in tree["metadata"]["annotations"].items() if k != serving.FLUX_SSA} == \
        deployed["metadata"]["annotations"]
    assert "canaryTrafficPercent" not in str(tree)  # the tree holds the steady state


def test_placement_identity_and_flux_ownership(fleet_ctx):
    objs = kinds(serving.objects(fleet_ctx))
    isvc, account = objs["InferenceService"], objs["ServiceAccount"]
    assert account["metadata"]["name"] == "flywheel-serving" and account["automountServiceAccountToken"] is False
    assert isvc["metadata"]["annotations"]["kustomize.toolkit.fluxcd.io/ssa"] == "IfNotPresent"
    assert fleet_ctx.labels.items() <= isvc["metadata"]["labels"].items()
    cluster = fleet_ctx.cluster
    want_min = cluster.predictor_replicas if cluster.predictor_replicas is not None else fleet_ctx.serving.min_replicas
    for component in COMPONENTS:
        part = isvc["spec"].get(component)
        if not part:
            continue
        assert part["serviceAccountName"] == "flywheel-serving" and part["automountServiceAccountToken"] is False
        assert part.get("nodeSelector", {}) == cluster.serving_node_selector  # not the GPU pool's
        assert [t["key"] for t in part.get("tolerations", [])] == [t.key for t in cluster.serving_tolerations]
        assert part["minReplicas"] == want_min and part["maxReplicas"] >= want_min
        spread = part.get("topologySpreadConstraints", [])
        assert bool(spread) == (want_min >= 2)
        if spread:
            assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
            assert all(c["labelSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "credit-default",
                                                             "component": component} for c in spread)


def test_budgets_only_from_two_replicas_one_per_component(fleet_ctx):
    objs = serving.objects(fleet_ctx)
    budgets = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    isvc = kinds(objs)["InferenceService"]
    if serving.min_replicas(fleet_ctx) < 2:
        assert budgets == []
        return
    parts = [c for c in COMPONENTS if isvc["spec"].get(c)]
    assert [b["metadata"]["name"] for b in budgets] == [f"credit-default-{c}" for c in parts]
    for budget, component in zip(budgets, parts):
        assert budget["apiVersion"] == "policy/v1" and budget["spec"]["minAvailable"] == 1
        assert budget["spec"]["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "credit-default",
                                                              "component": component}


def test_cluster_overrides_change_budgets_spread_and_validity():
    prod = contexts("prod")[0]  # Knative, min 2 by the cluster
    assert any(o["kind"] == "PodDisruptionBudget" for o in serving.objects(prod))
    one = with_cluster(prod, predictor_replicas=1)
    assert not any(o["kind"] == "PodDisruptionBudget" for o in serving.objects(one))
    assert "topologySpreadConstraints" not in isvc_of(one)["spec"]["predictor"]
    to_zero = with_cluster(prod, predictor_replicas=0)  # Knative scales to zero: nothing to keep up
    assert isvc_of(to_zero)["spec"]["predictor"]["minReplicas"] == 0
    assert not any(o["kind"] == "PodDisruptionBudget" for o in serving.objects(to_zero))
    dev = contexts("dev")[0]  # Standard mode cannot scale to zero: the policy check refuses the tree
    with pytest.raises(InferenceServiceInvalid, match="minReplicas: 0"):
        serving.objects(with_cluster(dev, predictor_replicas=0))


def test_nothing_where_the_cluster_does_not_serve():
    ctx = with_cluster(contexts("prod")[0], runs=["training", "monitoring"])
    assert serving.objects(ctx) == [] and serving.replacements(ctx) == []


def _lookup(obj: dict, path: str):
    """A kustomize fieldPath (`spec.x.containers.[name=y].args.3`, `metadata.annotations.a/b`) in `obj`."""
    at = obj
    for part in path.split("."):
        if part.startswith("[") and isinstance(at, list):
            field, value = part[1:-1].split("=", 1)
            (at,) = [item for item in at if item.get(field) == value]
        else:
            at = at[int(part)] if isinstance(at, list) else at[part]
    return at


def test_every_replacement_path_points_at_the_placeholder(fleet_ctx):
    """The paths name exactly where the builder wrote the model URI and version."""
    isvc = isvc_of(fleet_ctx)
    entries = {e["source"]["fieldPath"]: e for e in serving.replacements(fleet_ctx)}
    want = {"data.storageUri": MODEL_URI_PLACEHOLDER, "data.modelVersion": serving.MODEL_VERSION_PLACEHOLDER}
    assert set(entries) == set(want)
    for source, value in want.items():
        (target,) = entries[source]["targets"]
        assert target["select"]["kind"] == "InferenceService"
        for path in target["fieldPaths"]:
            assert _lookup(isvc, path) == value, path
    # Every occurrence of the URI is covered: as many containers as carry --model_dir, plus the annotation.
    count = str(isvc).count(MODEL_URI_PLACEHOLDER)
    assert len(entries["data.storageUri"]["targets"][0]["fieldPaths"]) == count


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not on PATH")
@pytest.mark.parametrize("env, index", [("dev", 0), ("staging", 0), ("prod", 0)])  # collocated / separate; modes
def test_kustomize_replaces_the_uri_and_drops_the_local_config(tmp_path, env, index):
    ctx = contexts(env)[index]
    objs = serving.objects(ctx)
    uri, version = "s3://flywheel-prod-models/m-42/artifacts/model", "42"
    for obj in objs:
        if obj["kind"] == "ConfigMap":
            obj["data"] = {"storageUri": uri, "modelVersion": version}
    (tmp_path / "objects.yaml").write_text(yaml.safe_dump_all(objs, sort_keys=False))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["objects.yaml"],
         "replacements": serving.replacements(ctx)}, sort_keys=False))
    out = subprocess.run([KUBECTL, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = list(yaml.safe_load_all(out.stdout))
    assert "ConfigMap" not in [o["kind"] for o in built]  # local-config: never applied
    assert sorted(o["kind"] for o in built) == sorted(o["kind"] for o in objs if o["kind"] != "ConfigMap")
    isvc = kinds(built)["InferenceService"]
    assert MODEL_URI_PLACEHOLDER not in out.stdout and serving.MODEL_VERSION_PLACEHOLDER not in out.stdout
    assert isvc["metadata"]["annotations"][MODEL_URI] == uri
    assert isvc["metadata"]["annotations"][MODEL_VERSION] == version
    for component in COMPONENTS:
        for container in (isvc["spec"].get(component) or {}).get("containers", []):
            args = container["args"]
            assert args[args.index("--model_dir") + 1] == uri and args[args.index("--model_version") + 1] == version
