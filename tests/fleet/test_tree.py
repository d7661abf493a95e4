"""The GitOps tree: generated for every env and cluster, deterministic, current with config, every
cluster rendered by the real `kubectl kustomize`, and `flywheel render`'s errors one line each."""
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from fleet import gitops as flux_argo
from pipelines import gitops, manifests
from pipelines.config import CONFIG_DIR, load_settings
from tests.fleet.conftest import CLUSTER_ENVS, contexts
from tests.support import ROOT, kubectl_or_skip

MANIFESTS = ROOT / "manifests"
runner = CliRunner()


def _kubectl():
    return kubectl_or_skip()


@pytest.fixture(scope="module")
def files():
    return gitops.tree(gitops.cluster_settings())


def test_tree_is_deterministic_and_every_file_says_it_is_generated(files):
    assert files == gitops.tree(gitops.cluster_settings())
    assert all(text.startswith("# GENERATED ") and "do not edit" in text.splitlines()[0] for text in files.values())
    for env in CLUSTER_ENVS:
        assert f"overlays/{env}/kustomization.yaml" in files
        for ctx in contexts(env):
            c = ctx.cluster.name
            for rel in (f"clusters/{c}/kustomization.yaml", f"clusters/{c}/platform/kustomization.yaml",
                        f"clusters/{c}/cluster.yaml", f"gitops/flux/{c}.yaml"):
                assert rel in files, rel
    components = [yaml.safe_load(t) for r, t in files.items() if "/components/" in r and r.endswith("n.yaml")]
    assert components and all((k["apiVersion"], k["kind"]) == (gitops.COMPONENT_API, "Component")
                              for k in components)


def test_cluster_includes_exactly_its_features(fleet_ctx, files):
    kustomization = yaml.safe_load(files[f"clusters/{fleet_ctx.cluster.name}/kustomization.yaml"])
    assert kustomization["resources"][0] == f"../../overlays/{fleet_ctx.env}"
    names = [p.rsplit("/", 1)[1] for p in kustomization["components"]]
    assert names == gitops.features(fleet_ctx)
    for path in kustomization["components"]:  # every listed component was generated
        assert f"clusters/{fleet_ctx.cluster.name}/{path}/kustomization.yaml".replace(
            f"clusters/{fleet_ctx.cluster.name}/../../", "") in files


def test_features_follow_config():
    """Planted config changes switch components off: baseline Pod Security, no token issuer, a
    serving-only cluster without GPUs."""
    prod = load_settings("prod", overrides={"fleet": {"pod_security": "baseline", "auth": {
        "issuer": None, "jwks_uri": None, "principals": []}}})
    (ctx, *_) = gitops.fleet_contexts(prod)
    assert gitops.features(ctx) == ["network-policies", "kueue", "gpu"]
    trains = {"name": "trains", "zone": "eu-west-1a", "runs": ["training"],
              "gpu": {"product": "NVIDIA-A100-SXM4-80GB", "quota": 2}}
    serves = {"name": "serve-only", "zone": "eu-west-1c", "runs": ["serving", "monitoring"]}
    mixed = load_settings("prod", overrides={"fleet": {"clusters": [trains, serves]}})
    first, second = gitops.fleet_contexts(mixed)
    assert gitops.features(first) == ["network-policies", "restricted", "jwt-auth", "kueue", "gpu"]
    assert gitops.features(second) == ["network-policies", "restricted", "jwt-auth"]
    tree = gitops.tree({"prod": mixed})
    components = yaml.safe_load(tree["clusters/serve-only/kustomization.yaml"])["components"]
    assert not any(c.endswith(("/gpu", "/kueue")) for c in components)


@pytest.mark.parametrize(("env", "cluster"), [(e, c.cluster.name) for e in CLUSTER_ENVS for c in contexts(e)])
def test_every_cluster_renders_with_kubectl(env, cluster):
    """Platform objects: outside the env's namespace, applied first (sync wave -1); the rest: in
    the namespace, labelled with the env, Pod Security as config says."""
    kubectl = _kubectl()
    settings = load_settings(env)
    platform = manifests.load_objects(manifests.kustomize(MANIFESTS / "clusters" / cluster / "platform", kubectl))
    namespaced = manifests.load_objects(gitops.render_cluster(settings, cluster, kubectl, platform=False))
    assert all(o["metadata"]["annotations"][flux_argo.SYNC_WAVE] == "-1" for o in platform)
    assert all(o["metadata"].get("namespace") != settings.namespace for o in platform)
    assert all(o["metadata"]["labels"]["flywheel/env"] == env for o in platform + namespaced)
    (namespace,) = [o for o in namespaced if o["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == settings.namespace
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == settings.fleet.pod_security
    # Istio's JWT and ALLOW policies bite only where its sidecar is injected
    assert (namespace["metadata"]["labels"].get("istio-injection") == "enabled") == bool(settings.fleet.auth.issuer)
    assert all(o["metadata"].get("namespace") == settings.namespace for o in namespaced if o is not namespace)
    whole = manifests.load_objects(gitops.render_cluster(settings, cluster, kubectl))
    assert len(whole) == len(platform) + len(namespaced)


def _copy(tmp_path):
    shutil.copytree(CONFIG_DIR, tmp_path / "config")
    shutil.copytree(MANIFESTS, tmp_path / "manifests")
    return tmp_path / "config", tmp_path / "manifests"


def test_stale_tree_is_found_and_write_repairs_it(tmp_path):
    """Given a config change and a file the generator does not make, When checked, Then both are
    reported; write_tree repairs the tree, removes the stray file and leaves base/ alone."""
    config, tree_dir = _copy(tmp_path)
    (config / "prod.yaml").write_text((config / "prod.yaml").read_text().replace("zone: eu-west-1b",
                                                                                  "zone: eu-west-1c"))
    stray = tree_dir / "clusters" / "gone" / "kustomization.yaml"
    stray.parent.mkdir(parents=True)
    stray.write_text("# a cluster config no longer lists\n")
    base = {p: p.read_text() for p in (tree_dir / "base").iterdir()}
    settings = gitops.cluster_settings(config)
    problems = gitops.check_tree(tree_dir, settings)
    assert "manifests/clusters/prod-eu-b/cluster.yaml: out of date" in problems
    assert "  +zone: eu-west-1c" in problems
    assert "manifests/clusters/gone/kustomization.yaml: not generated by config (stale)" in problems
    gitops.write_tree(tree_dir, settings)
    assert gitops.check_tree(tree_dir, settings) == []
    assert not stray.parent.exists()
    assert base == {p: p.read_text() for p in (tree_dir / "base").iterdir()}


def test_builder_mistakes_are_named(monkeypatch):
    from fleet import network

    (ctx, *_) = contexts("prod")
    monkeypatch.setattr(network, "objects", lambda c: [{"apiVersion": "v1", "kind": "ConfigMap",
                                                        "metadata": {"name": "x"}}])
    with pytest.raises(gitops.GitOpsError, match=r"fleet.network.objects: ConfigMap/x must have metadata.namespace"):
        gitops.tree({"prod": load_settings("prod")})
    monkeypatch.setattr(network, "objects", lambda c: [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": c.cluster.name, "namespace": c.namespace}}])
    with pytest.raises(gitops.GitOpsError, match="fleet.network is SCOPE 'env' but its objects differ"):
        gitops.tree({"prod": load_settings("prod")})


def test_cluster_names_are_unique_across_envs():
    clusters = [{"name": "dev-mig", "zone": "eu-west-1a", "gpu": {"product": "NVIDIA-A100-SXM4-40GB", "quota": 1}}]
    staging = load_settings("staging", overrides={"fleet": {"clusters": clusters}})
    with pytest.raises(gitops.GitOpsError, match="cluster 'dev-mig' is in config/dev.yaml and config/staging.yaml"):
        gitops.tree({"dev": load_settings("dev"), "staging": staging})


def test_render_errors_are_one_line():
    from pipelines.cli import app

    unknown = runner.invoke(app, ["render", "--env", "prod", "--cluster", "nowhere"])
    assert unknown.exit_code == 1
    assert unknown.output.strip() == "error: env 'prod' has no cluster 'nowhere'; its clusters: prod-eu-a, prod-eu-b"
    embedded = runner.invoke(app, ["render", "--env", "local"])
    assert embedded.exit_code == 1 and len(embedded.output.strip().splitlines()) == 1
    assert "no clusters to render" in embedded.output


def test_an_unpinned_prod_is_refused_in_one_line():
    from pipelines.cli import app

    result = runner.invoke(app, ["render", "--env", "prod", "--out", "/nonexistent"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: config/prod.yaml: image.digest is the all-zero placeholder")


def test_render_out_to_a_file_is_one_line(tmp_path):
    _kubectl()
    from pipelines.cli import app

    taken = tmp_path / "a-file"
    taken.write_text("")
    result = runner.invoke(app, ["render", "--env", "staging", "--out", str(taken), "--no-check"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"error: --out {taken}: cannot write there")


def test_render_out_writes_one_file_per_object(pinned_checkout, tmp_path):
    """After pinning prod's image: every object of each prod cluster, validated and policy-checked."""
    _kubectl()
    from pipelines.cli import app

    tmp_path = tmp_path / "out"
    result = runner.invoke(app, ["render", "--env", "prod", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["cluster", "objects", "files"] and all(len(line) <= 80 for line in lines)
    for cluster in ("prod-eu-a", "prod-eu-b"):
        written = sorted((tmp_path / cluster).glob("*.yaml"))
        (row,) = [line for line in lines if line.startswith(cluster)]
        assert int(row.split()[1]) == len(written) > 0
        for path in written:
            obj = manifests.load_objects(path.read_text())[0]
            assert path.name in (gitops.object_file(obj), f"{obj['kind'].lower()}-"
                                 f"{obj['metadata'].get('namespace', 'cluster')}-{obj['metadata']['name']}.yaml")
        assert (tmp_path / cluster / f"namespace-{load_settings('prod').namespace}.yaml").is_file()
