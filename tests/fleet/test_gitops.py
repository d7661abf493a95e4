"""Flux and Argo CD point at the cluster folders the tree really has, in the right order, and their
objects hold to the controllers' CRDs (crds/, byte copies of upstream)."""
import re
from pathlib import Path

import pytest
import yaml

import crds
from fleet import gitops as flux_argo
from pipelines import gitops
from tests.fleet.conftest import CLUSTER_ENVS, contexts
from tests.support import ROOT

REPO = ROOT  # fleet.gitops.path ("manifests") is relative to the repository root
KUSTOMIZATION_CRD = "kustomize.toolkit.fluxcd.io_kustomizations.yaml"
GITREPOSITORY_CRD = "source.toolkit.fluxcd.io_gitrepositories.yaml"
APPLICATIONSET_CRD = "applicationset-crd.yaml"


def _committed(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "manifests" / rel).read_text()) if d]


def folder_problems(repo: Path, path: str) -> list[str]:
    """A Flux/Argo path must name a folder of the repository holding a kustomization.yaml."""
    folder = repo / path.removeprefix("./")
    return [] if (folder / "kustomization.yaml").is_file() else [f"{path}: no kustomization.yaml at {folder}"]


def test_folder_check_catches_a_path_that_is_not_there():
    assert folder_problems(REPO, "./manifests/clusters/nowhere") != []
    assert folder_problems(REPO, "./manifests/base") == []


def test_flux_objects_hold_to_the_crds_and_chain_platform_first(fleet_ctx):
    objects = flux_argo.flux_objects(fleet_ctx)
    assert objects == _committed(f"gitops/flux/{fleet_ctx.cluster.name}.yaml"), "committed file is current"
    source, platform, namespace = objects
    assert crds.schema_problems(source, GITREPOSITORY_CRD, "v1") == []
    for kustomization in (platform, namespace):
        assert crds.schema_problems(kustomization, KUSTOMIZATION_CRD, "v1") == []
        assert kustomization["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
        assert kustomization["spec"]["prune"] is True
        assert folder_problems(REPO, kustomization["spec"]["path"]) == []
    assert platform["spec"]["path"].endswith(f"/clusters/{fleet_ctx.cluster.name}/platform")
    assert platform["spec"]["wait"] is True  # Ready only when its objects are: what dependsOn waits for
    assert namespace["spec"]["path"].endswith(f"/clusters/{fleet_ctx.cluster.name}")
    assert namespace["spec"]["dependsOn"] == [{"name": platform["metadata"]["name"]}]
    assert namespace["metadata"]["name"] == f"flywheel-{fleet_ctx.env}"


def test_flux_schema_check_catches_a_typo(fleet_ctx):
    _, platform, _ = flux_argo.flux_objects(fleet_ctx)
    planted = {**platform, "spec": {**platform["spec"], "dependOn": [{"name": "x"}]}}
    assert any("dependOn" in p for p in crds.schema_problems(planted, KUSTOMIZATION_CRD, "v1"))


def _go_template(text: str, params: dict) -> str:
    """The few Go-template forms the ApplicationSet uses, as Argo CD (text/template) fills them."""
    text = re.sub(r"\{\{ if not \.(\w+) \}\}(.*?)\{\{ end \}\}",
                  lambda m: m.group(2) if not params[m.group(1)] else "", text)

    def value(match):
        node = params
        for key in match.group(1).split("."):
            node = node[key]  # missingkey=error: a KeyError here
        return str(node)

    return re.sub(r"\{\{ \.([\w.]+) \}\}", value, text)


def _fill(node, params):
    if isinstance(node, dict):
        return {_go_template(k, params): _fill(v, params) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, params) for v in node]
    return _go_template(node, params) if isinstance(node, str) else node


def test_applicationset_yields_one_app_per_cluster_folder():
    """The files generator's glob, applied to the committed tree, finds exactly the clusters of
    config; each generated Application's sources are that cluster's folders (platform first)."""
    (appset,) = _committed("gitops/argocd/applicationset.yaml")
    spec = appset["spec"]
    (generator,) = spec["generators"]  # one files generator, no matrix (argoproj/argo-cd#25221)
    (files,) = generator["git"]["files"]
    found = sorted(REPO.glob(files["path"]))
    clusters = sorted(c.cluster.name for env in CLUSTER_ENVS for c in contexts(env))
    assert sorted(p.parent.name for p in found) == clusters
    for path in found:
        facts = yaml.safe_load(path.read_text())
        params = {**facts, "path": {"path": path.parent.relative_to(REPO).as_posix()}}
        app = _fill(spec["template"], params)
        assert app["metadata"]["name"] == f"flywheel-{facts['name']}"
        platform, namespace = app["spec"]["sources"]
        assert platform["path"] == f"manifests/clusters/{facts['name']}/platform"
        assert [folder_problems(REPO, s["path"]) for s in (platform, namespace)] == [[], []]
        destination = app["spec"]["destination"]
        assert destination["namespace"] == facts["namespace"]
        # exactly one of server and name (Argo CD refuses both; "" is an unset field)
        assert bool(destination["server"]) != bool(destination["name"])


def test_applicationset_sync_options_and_ignored_differences():
    appset = flux_argo.applicationset(contexts("prod")[0].fleet.gitops)
    assert [appset] == _committed("gitops/argocd/applicationset.yaml")
    spec = appset["spec"]["template"]["spec"]
    options = spec["syncPolicy"]["syncOptions"]
    assert {"ServerSideApply=true", "CreateNamespace=false", "RespectIgnoreDifferences=true"} <= set(options)
    assert spec["syncPolicy"]["automated"]["prune"] is True
    (isvc,) = spec["ignoreDifferences"]
    assert (isvc["group"], isvc["kind"]) == ("serving.kserve.io", "InferenceService")
    assert ".spec.predictor.model.storageUri" in isvc["jqPathExpressions"]
    assert appset["spec"]["goTemplateOptions"] == ["missingkey=error"]


def test_applicationset_holds_to_the_crd():
    if not (crds.PACKAGED_CRD_DIR / APPLICATIONSET_CRD).is_file():
        pytest.skip(f"crds/{APPLICATIONSET_CRD} not vendored")
    appset = flux_argo.applicationset(contexts("prod")[0].fleet.gitops)
    assert crds.schema_problems(appset, APPLICATIONSET_CRD, "v1alpha1") == []
    planted = {**appset, "spec": {**appset["spec"], "generator": []}}
    assert crds.schema_problems(planted, APPLICATIONSET_CRD, "v1alpha1") != []


def test_platform_objects_get_the_early_sync_wave():
    obj = flux_argo.platform_annotated({"kind": "ClusterQueue", "metadata": {"name": "q", "annotations": {"a": "b"}}})
    assert obj["metadata"]["annotations"] == {"a": "b", flux_argo.SYNC_WAVE: "-1"}


def test_cluster_facts_are_what_argo_reads(fleet_ctx):
    facts = yaml.safe_load((ROOT / "manifests" / "clusters" / fleet_ctx.cluster.name / "cluster.yaml").read_text())
    assert facts == flux_argo.cluster_facts(fleet_ctx)
    assert (facts["env"], facts["namespace"], facts["zone"]) == (fleet_ctx.env, fleet_ctx.namespace,
                                                                 fleet_ctx.cluster.zone)


def test_one_repository_for_the_fleet():
    from pipelines.config import load_settings

    prod = load_settings("prod", overrides={"fleet": {"gitops": {"branch": "release"}}})
    with pytest.raises(gitops.GitOpsError, match="fleet.gitops differs"):
        gitops.tree({"dev": load_settings("dev"), "prod": prod})
