"""The GitOps tree under manifests/: generated from config and the fleet/ builders, committed.

    manifests/base/                                  hand-written, env-neutral
    manifests/overlays/<env>/kustomization.yaml      base + namespace + labels + quota/LimitRange
                                                     + env-scope objects of FEATURE None (files beside it)
    manifests/overlays/<env>/components/<feature>/   a Kustomize Component per feature
    manifests/clusters/<c>/kustomization.yaml        the env overlay + the cluster's components,
                                                     cluster-scope objects, quota, replacements
    manifests/clusters/<c>/platform/                 cluster-scoped objects (Flux/Argo apply them first)
    manifests/clusters/<c>/cluster.yaml              facts for Argo CD's files generator
    manifests/gitops/flux/<c>.yaml, gitops/argocd/applicationset.yaml

`tree(settings_by_env)` is every generated file's text; `check_tree` lists what differs on disk,
`write_tree` repairs it (and removes generated files config no longer produces); `render_cluster`
is `kubectl kustomize` of one cluster. Where each builder's objects go: its `SCOPE` ("env": the
same for every cluster of the env, "cluster": per cluster) and `FEATURE` (None: always; else
the component, included by the clusters that use it, see `features`).
"""
from __future__ import annotations

import difflib
import json
import os
import textwrap
from pathlib import Path

from fleet import auth, monitor, network, observability, queues, runtimes, serving
from fleet import gitops as flux_argo
from fleet.context import FleetContext
from pipelines import manifests
from pipelines.config import environments, load_settings
from pipelines.fleet_context import fleet_contexts

BUILDERS = (monitor, observability, serving, auth, network, queues, runtimes)
FEATURES = ("network-policies", "restricted", "jwt-auth", "kueue", "gpu")  # the order clusters list them
GENERATED_DIRS = ("overlays", "clusters", "gitops")  # wholly generated: files config no longer makes go
KUSTOMIZATION = manifests.OVERLAY_FILE
COMPONENT_API = "kustomize.config.k8s.io/v1alpha1"
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
ENFORCE = "pod-security.kubernetes.io/enforce"
# Sidecar injection (a Kubeflow profile namespace has it already). Under `restricted`, istio-init's
# NET_ADMIN is not allowed: the cluster needs the Istio CNI node agent (istio.io, "Install Istio
# with the Istio CNI node agent").
ISTIO_INJECTION = "istio-injection"


class GitOpsError(manifests.ManifestError):
    """Config or a builder's output cannot be written into the tree; says which and why."""


def features(ctx: FleetContext) -> list[str]:
    """The components this cluster includes: network policies always; `restricted` when the env
    enforces Pod Security restricted; `jwt-auth` with a token issuer; `kueue` when the queue is on
    and the cluster trains; `gpu` when it has a GPU pool."""
    on = {"network-policies": True, "restricted": ctx.fleet.pod_security == "restricted",
          "jwt-auth": bool(ctx.fleet.auth.issuer), "kueue": ctx.fleet.queue.enabled and ctx.runs("training"),
          "gpu": ctx.cluster.gpu is not None}
    return [f for f in FEATURES if on[f]]


def _header(env: str | None, extra: str = "") -> str:
    source = f"config/base.yaml + config/{env}.yaml" if env else "config/*.yaml"
    # --write regenerates the whole tree from any cluster env (prod refuses to render unpinned).
    return (f"# GENERATED from {source} and fleet/ by `flywheel render --env dev --write`; do not edit.\n"
            "# Change config (or a builder) and regenerate; tests/fleet/test_tree.py fails when they disagree.\n"
            + extra)


def _yaml(env: str | None, docs: list[dict]) -> str:
    return _header(env) + manifests.dump_all(docs)


def _plain(builder, obj) -> dict:
    """`obj` as plain JSON data, checked to be a Kubernetes object (errors name the builder)."""
    name = builder.__name__
    try:
        obj = json.loads(json.dumps(obj))
    except TypeError as err:
        raise GitOpsError(f"{name}: returned an object that is not plain data: {err}") from None
    if not isinstance(obj, dict) or not all(obj.get(k) for k in ("apiVersion", "kind")) \
            or not (obj.get("metadata") or {}).get("name"):
        raise GitOpsError(f"{name}: every object needs apiVersion, kind and metadata.name; got {str(obj)[:120]}")
    return obj


def _namespaced(builder, ctx: FleetContext) -> list[dict]:
    out = [_plain(builder, o) for o in builder.objects(ctx)]
    for obj in out:
        if obj["metadata"].get("namespace") != ctx.namespace:
            raise GitOpsError(f"{builder.__name__}.objects: {obj['kind']}/{obj['metadata']['name']} must have "
                              f"metadata.namespace {ctx.namespace!r} (cluster {ctx.cluster.name}); cluster-scoped "
                              "or other namespaces' objects belong in platform_objects")
    return out


def _uses(builder, ctx: FleetContext) -> bool:
    feature = builder.FEATURE
    if feature is not None and feature not in FEATURES:
        raise GitOpsError(f"{builder.__name__}.FEATURE is {feature!r}; known features: {', '.join(FEATURES)}")
    if builder.SCOPE not in ("env", "cluster"):
        raise GitOpsError(f"{builder.__name__}.SCOPE is {builder.SCOPE!r}; it must be 'env' or 'cluster'")
    return feature is None or feature in features(ctx)


def _env_scope(builder, contexts: list[FleetContext]) -> list[dict]:
    """An env-scope builder's objects: the same for every cluster that uses it, or an error."""
    using = [ctx for ctx in contexts if _uses(builder, ctx)]
    if not using:
        return []
    first = _namespaced(builder, using[0])
    for ctx in using[1:]:
        if _namespaced(builder, ctx) != first:
            raise GitOpsError(f"{builder.__name__} is SCOPE 'env' but its objects differ between clusters "
                              f"{using[0].cluster.name} and {ctx.cluster.name}; make it SCOPE 'cluster'")
    return first


def _file(builder) -> str:
    return builder.__name__.rsplit(".", 1)[-1] + ".yaml"


def _env_files(settings, contexts: list[FleetContext]) -> dict[str, str]:
    """overlays/<env>/: the kustomization, FEATURE-None env objects, one component per feature."""
    env, values = settings.env, manifests.overlay_values(settings)
    base = f"overlays/{env}"
    files: dict[str, str] = {}
    for builder in BUILDERS:
        if builder.SCOPE == "env" and builder.FEATURE is None and (docs := _env_scope(builder, contexts)):
            files[f"{base}/{_file(builder)}"] = _yaml(env, docs)
    kustomization = {"apiVersion": KUSTOMIZE_API, "kind": "Kustomization",
                     "resources": ["../../base", *(p.rsplit("/", 1)[1] for p in files)],
                     "namespace": values.namespace,
                     "labels": [{"pairs": {"flywheel/env": env}, "includeSelectors": False}],
                     "patches": manifests.overlay_patches(values)}
    files[f"{base}/{KUSTOMIZATION}"] = _header(env, f"# Quota: {values.sizing}.\n") + manifests.dump(kustomization)
    used = {f for ctx in contexts for f in features(ctx)}
    for feature in (f for f in FEATURES if f in used):
        files.update(_component(settings, contexts, feature, values))
    return files


def _component(settings, contexts, feature: str, values) -> dict[str, str]:
    folder = f"overlays/{settings.env}/components/{feature}"
    files = {}
    for builder in (b for b in BUILDERS if b.SCOPE == "env" and b.FEATURE is not None):
        if feature == builder.FEATURE and (docs := _env_scope(builder, contexts)):
            files[f"{folder}/{_file(builder)}"] = _yaml(settings.env, docs)
    patches = []
    if feature == "restricted":  # base enforces baseline (warn/audit restricted); this enforces restricted
        patches.append(manifests.json_patch({"version": "v1", "kind": "Namespace"}, [
            {"op": "add", "path": manifests._pointer("metadata", "labels", ENFORCE), "value": "restricted"}]))
    if feature == "jwt-auth":  # Istio's policies bite only where its sidecar is injected
        patches.append(manifests.json_patch({"version": "v1", "kind": "Namespace"}, [
            {"op": "add", "path": manifests._pointer("metadata", "labels", ISTIO_INJECTION), "value": "enabled"}]))
    if feature == "gpu":
        patches.append(manifests.gpu_patch(values))
    component = {"apiVersion": COMPONENT_API, "kind": "Component",
                 "resources": [p.rsplit("/", 1)[1] for p in files]}
    if patches:
        component["patches"] = patches
    return {**files, f"{folder}/{KUSTOMIZATION}": _header(settings.env) + manifests.dump(component)}


def _cluster_files(ctx: FleetContext) -> dict[str, str]:
    """clusters/<c>/: its kustomization, cluster-scope objects, platform/, cluster.yaml; its Flux file."""
    env, folder = ctx.env, f"clusters/{ctx.cluster.name}"
    files, platform = {}, {}
    for builder in BUILDERS:
        if not _uses(builder, ctx):
            continue
        if builder.SCOPE == "cluster" and (docs := _namespaced(builder, ctx)):
            files[f"{folder}/{_file(builder)}"] = _yaml(env, docs)
        if docs := [flux_argo.platform_annotated(_plain(builder, o)) for o in builder.platform_objects(ctx)]:
            platform[f"{folder}/{flux_argo.PLATFORM}/{_file(builder)}"] = _yaml(env, docs)
    labels = [{"pairs": dict(ctx.labels), "includeSelectors": False}]
    kustomization = {"apiVersion": KUSTOMIZE_API, "kind": "Kustomization",
                     "resources": [f"../../overlays/{env}", *(p.rsplit("/", 1)[1] for p in files)],
                     "components": [f"../../overlays/{env}/components/{f}" for f in features(ctx)],
                     "labels": labels}
    quota, sizing = queues.namespace_quota(ctx), ""
    if isinstance(quota, dict) and quota:
        kustomization["patches"] = [manifests.quota_patch(quota)]
        sizing = "".join(f"# {line}\n" for line in textwrap.wrap(f"Quota: {queues.quota_summary(ctx)}", 96))
    if replacements := serving.replacements(ctx):
        kustomization["replacements"] = json.loads(json.dumps(replacements))
    platform_kustomization = {"apiVersion": KUSTOMIZE_API, "kind": "Kustomization",
                              "resources": [p.rsplit("/", 1)[1] for p in platform], "labels": labels}
    return {**files, **platform,
            f"{folder}/{KUSTOMIZATION}": _header(env, sizing) + manifests.dump(kustomization),
            f"{folder}/{flux_argo.PLATFORM}/{KUSTOMIZATION}": _header(env) + manifests.dump(platform_kustomization),
            f"{folder}/{flux_argo.CLUSTER_FACTS}": _header(env) + manifests.dump(flux_argo.cluster_facts(ctx)),
            f"gitops/flux/{ctx.cluster.name}.yaml": _yaml(env, flux_argo.flux_objects(ctx))}


def tree(settings_by_env: dict) -> dict[str, str]:
    """Every generated file (path relative to manifests/ -> text) for these envs' Settings;
    embedded envs (no cluster) are skipped. Deterministic: same config, same bytes."""
    files: dict[str, str] = {}
    owner: dict[str, str] = {}
    gitops = {}
    for env in sorted(settings_by_env):
        settings = settings_by_env[env]
        if settings.embedded:
            continue
        contexts = fleet_contexts(settings)
        if not contexts:
            raise GitOpsError(f"config/{env}.yaml: a cluster env (kfp.host set) must list fleet.clusters")
        for ctx in contexts:
            if ctx.cluster.name in owner:
                raise GitOpsError(f"cluster {ctx.cluster.name!r} is in config/{owner[ctx.cluster.name]}.yaml and "
                                  f"config/{env}.yaml: cluster names are folder names (manifests/clusters/<name>) "
                                  "and must be unique across envs (two envs on one cluster: two names, one server)")
            owner[ctx.cluster.name] = env
        gitops[env] = settings.fleet.gitops
        files.update(_env_files(settings, contexts))
        for ctx in contexts:
            files.update(_cluster_files(ctx))
    if gitops:
        if len({g.model_dump_json() for g in gitops.values()}) > 1:
            raise GitOpsError("fleet.gitops differs between " + ", ".join(f"config/{e}.yaml" for e in gitops)
                              + ": one ApplicationSet reads one repository; set it once, in config/base.yaml")
        files["gitops/argocd/applicationset.yaml"] = _yaml(None, [flux_argo.applicationset(next(iter(
            gitops.values())))])
    return dict(sorted(files.items()))


def cluster_settings(config_dir: Path | str | None = None) -> dict:
    """env -> Settings for every cluster env in config/ (what the committed tree is generated from)."""
    loaded = {env: load_settings(env, config_dir) for env in environments(config_dir)}
    return {env: s for env, s in loaded.items() if not s.embedded}


def _manifests_dir(manifests_dir) -> Path:
    return Path(manifests_dir or manifests.MANIFESTS_DIR)


def _on_disk(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for d in GENERATED_DIRS for p in sorted((root / d).rglob("*"))
            if p.is_file()}


def check_tree(manifests_dir: Path | str | None = None, settings_by_env: dict | None = None) -> list[str]:
    """What differs between the committed tree and config: `<path>: missing|out of date|not generated`
    lines, each stale file followed by its changed lines (`  -old` / `  +new`); [] when current."""
    root = _manifests_dir(manifests_dir)
    wanted = tree(settings_by_env if settings_by_env is not None else cluster_settings())
    present = _on_disk(root)
    problems = []
    for rel, text in wanted.items():
        if rel not in present:
            problems.append(f"manifests/{rel}: missing")
            continue
        current = present[rel].read_text()
        if current != text:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), "committed", "config", n=0,
                                        lineterm="")
            changes = [line for line in diff if line[:1] in "+-" and not line.startswith(("---", "+++"))]
            problems += [f"manifests/{rel}: out of date", *("  " + c for c in changes[:20])]
    problems += [f"manifests/{rel}: not generated by config (stale)" for rel in present if rel not in wanted]
    return problems


def write_tree(manifests_dir: Path | str | None = None, settings_by_env: dict | None = None) -> list[str]:
    """Regenerate the tree; remove generated files config no longer produces. Returns changed paths."""
    root = _manifests_dir(manifests_dir)
    wanted = tree(settings_by_env if settings_by_env is not None else cluster_settings())
    changed = []
    for rel, path in _on_disk(root).items():
        if rel not in wanted:
            path.unlink()
            changed.append(rel)
    for rel, text in wanted.items():
        path = root / rel
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(rel)
    for folder in sorted((p for d in GENERATED_DIRS for p in (root / d).rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    return sorted(changed)


def cluster_names(settings) -> list[str]:
    return [c.name for c in settings.fleet.clusters]


def render_cluster(settings, cluster: str, kubectl: str | None = None, manifests_dir: Path | str | None = None,
                   *, platform: bool = True) -> str:
    """`kubectl kustomize` of clusters/<cluster>/platform (unless platform=False), then of
    clusters/<cluster>: everything Flux or Argo CD would apply there, in that order."""
    if cluster not in cluster_names(settings):
        raise GitOpsError(f"env {settings.env!r} has no cluster {cluster!r}; its clusters: "
                          + ", ".join(cluster_names(settings)))
    folder = _manifests_dir(manifests_dir) / "clusters" / cluster
    kubectl = kubectl or manifests.find_kubectl()
    parts = [manifests.kustomize(folder / flux_argo.PLATFORM, kubectl)] if platform else []
    parts.append(manifests.kustomize(folder, kubectl))
    return "---\n".join(p for p in parts if p.strip())


def object_file(obj: dict) -> str:
    """`<kind>-<name>.yaml`, lowercase kind: one file per rendered object."""
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def write_objects(rendered: dict[str, str], out: Path | str) -> str:
    """Each cluster's rendered objects as OUT/<cluster>/<kind>-<name>.yaml (namespace added to the
    name where two objects would share a file); returns an 80-column table of what was written."""
    out = Path(out)
    rows = []
    for cluster, text in rendered.items():
        objects = manifests.load_objects(text)
        names = [object_file(o) for o in objects]
        folder = out / cluster
        folder.mkdir(parents=True, exist_ok=True)
        for obj, name in zip(objects, names):
            if names.count(name) > 1:
                meta = obj["metadata"]
                name = f"{obj['kind'].lower()}-{meta.get('namespace', 'cluster')}-{meta['name']}.yaml"
            (folder / name).write_text(manifests.dump(obj))
        rows.append((cluster, str(len(objects)), f"{folder}/"))
    width = max(len("cluster"), *(len(r[0]) for r in rows))
    lines = [f"{'cluster':<{width}}  objects  files"]
    lines += [f"{c:<{width}}  {n:>7}  {f if len(f) <= 78 - width - 9 else '...' + f[-(75 - width - 9):]}"
              for c, n, f in rows]
    return "\n".join(lines) + "\n"


def config_problems(settings, config_dir: Path | str | None = None) -> list[str]:
    """What must hold before an env's clusters are rendered for a cluster, one line each naming
    the config file and key: a pinned image where the env requires one, a training runtime that
    fits the namespace's Pod Security level. (Kueue fit is checked while the tree is built.)"""
    from pipelines.config import CONFIG_DIR
    from pipelines.images import image_problems

    config_file = Path(os.path.relpath(Path(config_dir or CONFIG_DIR) / f"{settings.env}.yaml"))
    found = image_problems(settings, config_file)
    for ctx in fleet_contexts(settings):
        found += [p for p in runtimes.runtime_problems(ctx) if p not in found]
    return found


def rendered_problems(text: str) -> tuple[list[str], list[str]]:
    """(problems, notes) of one rendered cluster: every object against its schema (fleet.validate)
    and the policy (fleet.policy). A check that could not run here (promtool missing) is a note."""
    from fleet.policy import violations
    from fleet.validate import problems_all

    objects = manifests.load_objects(text)
    found = problems_all(objects) + violations(objects)
    notes = [line for line in found if "promtool not on PATH" in line]
    return [line for line in found if line not in notes], notes
