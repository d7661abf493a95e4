"""End to end: every cluster of every cluster env, rendered from the GitOps tree config generates
(pipelines/gitops.py, with the real `kubectl kustomize`), validates against the schema of each
kind (fleet/validate.py) and passes every rule (fleet/policy.py); so do the Flux and Argo CD
objects that deliver it (manifests/gitops/)."""
import shutil

import pytest
import yaml

from fleet.policy import violations
from fleet.validate import problems_all
from pipelines import gitops, manifests
from pipelines.config import load_settings
from tests.fleet.conftest import CLUSTER_ENVS, pinned_settings
from tests.support import ROOT

CLUSTERS = [(env, name) for env in CLUSTER_ENVS for name in gitops.cluster_names(pinned_settings(env))]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of manifests/ with the generated tree written from today's config (so this tests what
    config and the builders produce, whether or not the committed tree is current)."""
    try:
        manifests.kustomize_version(manifests.find_kubectl())
    except manifests.ManifestError as err:
        pytest.skip(f"kubectl with kustomize unavailable: {err}")
    root = tmp_path_factory.mktemp("tree") / "manifests"
    shutil.copytree(ROOT / "manifests", root)
    gitops.write_tree(root, {env: pinned_settings(env) for env in CLUSTER_ENVS})
    return root


@pytest.mark.parametrize(("env", "cluster"), CLUSTERS, ids=[c for _, c in CLUSTERS])
def test_every_rendered_cluster_validates_and_passes_policy(tree, env, cluster):
    settings = pinned_settings(env)
    objects = manifests.load_objects(gitops.render_cluster(settings, cluster, manifests_dir=tree))
    runs = next(c.runs for c in settings.fleet.clusters if c.name == cluster)
    expected = {"Namespace", "NetworkPolicy", "ResourceQuota"} | ({"InferenceService"} if "serving" in runs else set())
    expected |= {"Deployment", "Service"} if "monitoring" in runs else set()
    assert expected <= {o["kind"] for o in objects}, f"missing: {expected - {o['kind'] for o in objects}}"
    assert problems_all(objects) == []
    assert violations(objects) == []


def test_an_unpinned_prod_renders_but_policy_refuses_its_image():
    """The committed prod tree carries the placeholder digest until the image is pinned: a GitOps
    sync of it fails closed on the pull, and the policy names it on every workload."""
    settings = load_settings("prod")
    objects = manifests.load_objects(gitops.render_cluster(settings, gitops.cluster_names(settings)[0]))
    found = [line for line in violations(objects) if "placeholder digest" in line]
    assert found and all(": image-tag: " in line for line in found)
    assert {line.split("/")[0] for line in found} >= {"InferenceService", "Deployment"}


def test_the_delivery_objects_validate_and_pass_policy(tree):
    files = sorted((tree / "gitops").rglob("*.yaml"))
    assert files, "no manifests/gitops/ files generated"
    objects = [doc for path in files for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert {"Kustomization", "GitRepository", "ApplicationSet"} <= {o["kind"] for o in objects}
    assert problems_all(objects) == []
    assert violations(objects) == []
