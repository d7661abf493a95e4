"""How Flux and Argo CD find each cluster's folder of the GitOps tree: pure builders, dicts out.

The tree (pipelines/gitops.py writes it under manifests/) has one `clusters/<name>/` per cluster,
with `platform/` (cluster-scoped objects) beside the namespace's kustomization. Both controllers
apply the platform first:

- Flux (https://fluxcd.io/flux/components/kustomize/kustomizations/): per cluster a
  `GitRepository` and two `Kustomization`s, `flywheel-platform` (path `clusters/<c>/platform`,
  `wait: true`: Ready only once its objects are) and `flywheel-<env>` (path `clusters/<c>`,
  `dependsOn` the platform). Flux runs on each cluster, so each gets its own file.
- Argo CD: one `ApplicationSet` with a single git *files* generator over
  `clusters/*/cluster.yaml`: one Application per file. Not a matrix of a cluster generator and a
  git generator: a matrix yields no Application at all when one child finds nothing
  (argoproj/argo-cd#25221). The Application has two sources (platform and namespace,
  https://argo-cd.readthedocs.io/en/release-3.3/user-guide/multiple_sources/); the platform's
  objects carry sync wave -1 (`PLATFORM_WAVE`), so they are applied and healthy first.

Objects here are plain dicts (no SDK models exist); tests/fleet/test_gitops.py holds them to the
vendored CRDs (crds/kustomize.toolkit.fluxcd.io_kustomizations.yaml, ..._gitrepositories.yaml).
"""
from __future__ import annotations

from fleet.context import FleetContext
from specs.fleet import GitOpsSpec

FLUX_NAMESPACE = "flux-system"  # where `flux bootstrap` installs the controllers and their objects
ARGOCD_NAMESPACE = "argocd"  # where Argo CD's ApplicationSet controller watches (its install manifests)
SOURCE_NAME = "flywheel"  # the Flux GitRepository every Kustomization here reads
PLATFORM = "platform"  # clusters/<c>/platform: the cluster-scoped objects
FLUX_INTERVAL, FLUX_RETRY, FLUX_TIMEOUT = "10m", "2m", "5m"
SYNC_WAVE = "argocd.argoproj.io/sync-wave"
PLATFORM_WAVE = "-1"  # before the namespace's objects (wave 0): a LocalQueue needs its ClusterQueue
CLUSTER_FACTS = "cluster.yaml"  # what the ApplicationSet's files generator reads per cluster

# What the deploy step (deployment/rollout.py) changes on the live InferenceService after Git put it
# there: the model's arguments (--model_dir, --model_version), the annotations naming the model, and
# the canary percentage. Argo CD must neither report these as drift nor revert them (with
# RespectIgnoreDifferences=true a sync leaves them as they are). A storageUri, should the
# InferenceService carry the model that way, is the deploy step's too.
ISVC_DEPLOY_OWNED = (
    ".spec.predictor.model.storageUri",
    ".spec.predictor.containers[].args",
    ".spec.transformer.containers[].args",
    ".spec.predictor.canaryTrafficPercent",
    ".spec.transformer.canaryTrafficPercent",
    '.metadata.annotations["flywheel/model-uri"]',
    '.metadata.annotations["flywheel/model-version"]',
)


def cluster_dir(gitops: GitOpsSpec, cluster: str) -> str:
    """The cluster's folder inside the repository, e.g. manifests/clusters/prod-eu-a."""
    return f"{gitops.path}/clusters/{cluster}"


def cluster_facts(ctx: FleetContext) -> dict:
    """clusters/<c>/cluster.yaml: the parameters of the cluster's Argo CD Application.

    `server` is "" when config leaves `fleet.clusters[].server` unset: the Application then
    names its destination by the cluster's name (the name Argo CD registered it under)."""
    return {"name": ctx.cluster.name, "env": ctx.env, "namespace": ctx.namespace, "zone": ctx.cluster.zone,
            "server": ctx.cluster.server or ""}


def flux_objects(ctx: FleetContext) -> list[dict]:
    """gitops/flux/<c>.yaml: the GitRepository and the two Kustomizations for one cluster."""
    gitops = ctx.fleet.gitops
    folder = cluster_dir(gitops, ctx.cluster.name)
    labels = {**ctx.labels, "flywheel/cluster": ctx.cluster.name}
    source = {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
              "metadata": {"name": SOURCE_NAME, "namespace": FLUX_NAMESPACE, "labels": labels},
              "spec": {"interval": FLUX_INTERVAL, "url": gitops.repo_url, "ref": {"branch": gitops.branch}}}
    ref = {"kind": "GitRepository", "name": SOURCE_NAME}

    def kustomization(name: str, path: str, **extra) -> dict:
        return {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                "metadata": {"name": name, "namespace": FLUX_NAMESPACE, "labels": labels},
                "spec": {"interval": FLUX_INTERVAL, "retryInterval": FLUX_RETRY, "timeout": FLUX_TIMEOUT,
                         "path": f"./{path}", "prune": True, "sourceRef": ref, **extra}}

    platform = kustomization("flywheel-platform", f"{folder}/{PLATFORM}", wait=True)
    namespace = kustomization(f"flywheel-{ctx.env}", folder,
                              dependsOn=[{"name": "flywheel-platform"}])
    return [source, platform, namespace]


def applicationset(gitops: GitOpsSpec) -> dict:
    """gitops/argocd/applicationset.yaml: one Application per clusters/*/cluster.yaml."""
    source = {"repoURL": gitops.repo_url, "targetRevision": gitops.branch}
    spec = {
        "project": gitops.argocd_project,
        # Destination by server URL when config gives one, else by the registered cluster name
        # (Argo CD accepts one of the two; an empty string is an unset field).
        "destination": {"server": "{{ .server }}", "name": "{{ if not .server }}{{ .name }}{{ end }}",
                        "namespace": "{{ .namespace }}"},
        "sources": [{**source, "path": "{{ .path.path }}/" + PLATFORM}, {**source, "path": "{{ .path.path }}"}],
        "syncPolicy": {
            "automated": {"prune": True, "selfHeal": True},
            # ServerSideApply: large objects (CRD-sized runtimes) overflow the client-side
            # last-applied annotation. CreateNamespace=false: the tree holds the Namespace (with
            # its Pod Security labels). RespectIgnoreDifferences: a sync leaves alone what the
            # deploy step owns (ignoreDifferences below).
            "syncOptions": ["ServerSideApply=true", "CreateNamespace=false", "RespectIgnoreDifferences=true"],
        },
        "ignoreDifferences": [{"group": "serving.kserve.io", "kind": "InferenceService",
                               "jqPathExpressions": list(ISVC_DEPLOY_OWNED)}],
    }
    return {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "ApplicationSet",
        "metadata": {"name": "flywheel", "namespace": ARGOCD_NAMESPACE,
                     "labels": {"app.kubernetes.io/part-of": "flywheel"}},
        "spec": {
            "goTemplate": True,
            "goTemplateOptions": ["missingkey=error"],  # a cluster.yaml without a key fails loudly
            # One files generator (argoproj/argo-cd#25221: a matrix yields nothing when a file is missing).
            "generators": [{"git": {**{"repoURL": source["repoURL"], "revision": source["targetRevision"]},
                                    "files": [{"path": f"{gitops.path}/clusters/*/{CLUSTER_FACTS}"}]}}],
            "template": {
                "metadata": {"name": "flywheel-{{ .name }}",
                             "labels": {"app.kubernetes.io/part-of": "flywheel", "flywheel/env": "{{ .env }}",
                                        "flywheel/cluster": "{{ .name }}"}},
                "spec": spec,
            },
        },
    }


def platform_annotated(obj: dict) -> dict:
    """`obj` (a platform object) with the sync wave that orders it before the namespace's objects."""
    meta = dict(obj.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}), SYNC_WAVE: PLATFORM_WAVE}
    return {**obj, "metadata": meta}
