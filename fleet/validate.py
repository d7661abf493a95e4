"""Every object the fleet renders, held to the schema of its kind before it reaches a cluster.

    problems(obj) / problems_all(objs) -> ["Kind/name: json.path: message", ...]; [] when all hold

Dispatch by apiVersion and kind:
- custom resources with a vendored CRD copy in crds/ (`CRD_FILES`; crds/upstream.yaml records each
  copy's source): the served version the object names, with the API server's strictness (unknown
  fields are errors, `crds.validator_for`). A kind whose copy is not vendored yet is a problem.
- Kubeflow Trainer kinds without a CRD copy (TrainJob, the runtimes): the `kubeflow-trainer-api`
  models, strictly (`training.backends.openapi_models.model_problems`).
- everything else: the Kubernetes OpenAPI schemas shipped by `kubernetes-validate`, strict, at the
  oldest Kubernetes we support and the kubectl client's (`K8S_VERSIONS`, as
  tests/pipelines/test_manifests.py). Its python `validate()` re-reads a 1.3 MB definitions file per
  call and stops at the first error, so the same schema files are loaded once here and every error
  is reported. A kind it has no schema for (a CRD we did not vendor) is a problem, never a pass.
- PrometheusRule also through `promtool check rules` (one call for every rule object), since the
  CRD does not parse PromQL.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import yaml

import crds

K8S_VERSIONS = ("1.31.0", "1.37.0")
ISTIO = "crd-all.gen.yaml"  # Istio ships one bundle of all its CRDs (crds/upstream.yaml)
# (group, kind) -> the CRD copy in crds/ that holds its schema. Files not vendored yet (Kueue,
# ClusterStorageContainer, the Trainer runtimes: other owners) make their kinds a problem that names them.
CRD_FILES: dict[tuple[str, str], str] = {
    ("serving.kserve.io", "InferenceService"): crds.INFERENCESERVICE,
    ("serving.kserve.io", "ClusterStorageContainer"): "serving.kserve.io_clusterstoragecontainers.yaml",
    ("kubeflow.org", "PyTorchJob"): crds.PYTORCHJOB,
    ("trainer.kubeflow.org", "ClusterTrainingRuntime"): "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    ("trainer.kubeflow.org", "TrainingRuntime"): "trainer.kubeflow.org_trainingruntimes.yaml",
    ("kueue.x-k8s.io", "ResourceFlavor"): "kueue.x-k8s.io_resourceflavors.yaml",
    ("kueue.x-k8s.io", "ClusterQueue"): "kueue.x-k8s.io_clusterqueues.yaml",
    ("kueue.x-k8s.io", "LocalQueue"): "kueue.x-k8s.io_localqueues.yaml",
    ("security.istio.io", "RequestAuthentication"): ISTIO,
    ("security.istio.io", "AuthorizationPolicy"): ISTIO,
    ("networking.istio.io", "VirtualService"): ISTIO,
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "AlertmanagerConfig"): "monitoring.coreos.com_alertmanagerconfigs.yaml",
    ("kustomize.toolkit.fluxcd.io", "Kustomization"): "kustomize.toolkit.fluxcd.io_kustomizations.yaml",
    ("source.toolkit.fluxcd.io", "GitRepository"): "source.toolkit.fluxcd.io_gitrepositories.yaml",
    ("argoproj.io", "ApplicationSet"): "applicationset-crd.yaml",
}
IMPLICIT_ROOT_FIELDS = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
TRAINER_GROUP = "trainer.kubeflow.org"
# Checked with the kubeflow-trainer-api models when crds/ holds no CRD copy for them.
TRAINER_MODELS = {"TrainJob": "TrainerV1alpha1TrainJob", "TrainingRuntime": "TrainerV1alpha1TrainingRuntime",
                  "ClusterTrainingRuntime": "TrainerV1alpha1ClusterTrainingRuntime"}


class _CrdLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # C parser: the CRDs are up to 2 MB
    """Reads a bare `=` scalar as a string: prometheus-operator's AlertmanagerConfig CRD has one as
    an enum value, which PyYAML otherwise refuses (yaml/pyyaml#89)."""


_CrdLoader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def _name(obj: dict) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    return f"{obj.get('kind') or '?'}/{meta.get('name') or '?'}"


def _json_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _split(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


# --------------------------------------------------------------------------------------------
# Custom resources: the vendored CRD copies


@cache
def _crds_in(path: str) -> dict[tuple[str, str], dict]:
    """(group, kind) -> CRD, for every CRD in the file (one, or a bundle such as Istio's)."""
    docs = yaml.load_all(Path(path).read_text(), Loader=_CrdLoader)
    return {(d["spec"]["group"], d["spec"]["names"]["kind"]): d for d in docs
            if d and d.get("kind") == "CustomResourceDefinition"}


@cache
def _crd_validator(path: str, group: str, kind: str, version: str):
    """The strict validator of `version`'s schema, or a string saying why there is none."""
    crd = _crds_in(path).get((group, kind))
    if crd is None:
        return f"no schema for {group}/{version} {kind}: {Path(path).name} does not define it"
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in served or not served[version].get("served", True):
        return f"no schema for {group}/{version} {kind}: {Path(path).name} serves {sorted(served)}"
    schema = served[version]["schema"]["openAPIV3Schema"]
    # The API server accepts apiVersion, kind and metadata on every custom resource whether or not the
    # schema lists them (Istio's do not): apiextensions "Specifying a structural schema".
    schema = {**schema, "properties": {**IMPLICIT_ROOT_FIELDS, **(schema.get("properties") or {})}}
    # crds.schema_problems reads single-document CRD files only (not Istio's bundle), hence its validator here.
    return crds.validator_for(schema)


def _crd_problems(obj: dict, crd_file: str) -> list[str]:
    group, version = _split(obj["apiVersion"])
    path = crds.crd_dir() / crd_file
    if not path.is_file():
        return [f"(root): no schema for {obj['apiVersion']} {obj['kind']}: crds/{crd_file} is not vendored"]
    validator = _crd_validator(str(path), group, obj["kind"], version)
    if isinstance(validator, str):
        return [f"(root): {validator}"]
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_json_path(e.absolute_path)}: {e.message}" for e in errors]


def _trainer_problems(obj: dict) -> list[str]:
    from kubeflow_trainer_api import models

    from training.backends.openapi_models import model_problems

    return model_problems(getattr(models, TRAINER_MODELS[obj["kind"]]), obj)


# --------------------------------------------------------------------------------------------
# Built-in kinds: kubernetes-validate's schema files


@cache
def _k8s_definitions(k8s_version: str):
    from kubernetes_validate import utils as kv
    from referencing import Registry, Resource

    schema_dir = f"kubernetes-json-schema/v{k8s_version}-local-strict"
    return Resource.from_contents(kv.schema_contents(f"{schema_dir}/_definitions.json", k8s_version)) @ Registry()


@cache
def _k8s_validator(k8s_version: str, api_version: str, kind: str):
    """kubernetes-validate's strict schema of the kind (as its `validate()` builds it), or None."""
    import re

    import jsonschema
    from kubernetes_validate import utils as kv
    from referencing import Resource

    # rbac.authorization.k8s.io/v1 -> rbac-v1, v1 -> v1 (kubernetes_validate.utils.validate)
    munged = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kv.schema_contents(f"kubernetes-json-schema/v{k8s_version}-local-strict/{kind.lower()}-{munged}.json",
                                    k8s_version)
    except FileNotFoundError:
        return None
    registry = Resource.from_contents(schema) @ _k8s_definitions(k8s_version)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _k8s_problems(obj: dict) -> list[str]:
    found: list[str] = []
    for k8s_version in K8S_VERSIONS:
        validator = _k8s_validator(k8s_version, obj["apiVersion"], obj["kind"])
        if validator is None:
            return [f"(root): no schema for {obj['apiVersion']} {obj['kind']} (not a Kubernetes {k8s_version} kind, "
                    "and no CRD copy in crds/ for it)"]
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            line = f"{_json_path(error.absolute_path)}: {error.message}"
            found += [] if line in found else [line]  # the same error at both versions is one problem
    return found


# --------------------------------------------------------------------------------------------
# PrometheusRule expressions: promtool


def promtool_problems(rules: list[dict]) -> list[str]:
    """`promtool check rules` over each PrometheusRule's spec (its `groups` are a rules file), in
    one call; each problem is `Kind/name: spec: <promtool's message>`."""
    if not rules:
        return []
    promtool = shutil.which("promtool")
    if promtool is None:
        return [f"{_name(r)}: spec: promtool not on PATH, PromQL unchecked (Debian: apt-get install prometheus)"
                for r in rules]
    with tempfile.TemporaryDirectory(prefix="flywheel-promtool-") as tmp:
        files = {}
        for index, rule in enumerate(rules):
            path = Path(tmp) / f"rule-{index}.yaml"
            path.write_text(yaml.safe_dump({"groups": (rule.get("spec") or {}).get("groups") or []}))
            files[str(path)] = rule
        result = subprocess.run([promtool, "check", "rules", *files], capture_output=True, text=True, timeout=60)
    found = []
    for line in (result.stdout + result.stderr).splitlines():
        path, sep, message = line.partition(": ")
        if sep and path in files:  # promtool prefixes every error with the file it found it in
            found.append(f"{_name(files[path])}: spec: {message}")
    if result.returncode != 0 and not found:
        found = [f"{_name(r)}: spec: promtool check rules failed: {result.stderr.strip()[-300:]}" for r in rules]
    return found


# --------------------------------------------------------------------------------------------


def _object_problems(obj: dict) -> list[str]:
    if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
        return ["(root): apiVersion and kind are required"]
    if not ((obj.get("metadata") or {}).get("name")):
        return ["metadata.name: required"]
    group, _ = _split(obj["apiVersion"])
    crd_file = CRD_FILES.get((group, obj["kind"]))
    if crd_file and (crds.crd_dir() / crd_file).is_file():
        return _crd_problems(obj, crd_file)
    if group == TRAINER_GROUP and obj["kind"] in TRAINER_MODELS:
        return _trainer_problems(obj)
    if crd_file:
        return _crd_problems(obj, crd_file)  # names the CRD copy that is missing
    return _k8s_problems(obj)


def problems_all(objects: list[dict]) -> list[str]:
    """Every schema problem of every object, each `Kind/name: json.path: message`; [] when all hold.

    Args:
        objects: Kubernetes objects as plain dicts (a rendered cluster, or a builder's output).

    Returns:
        One line per problem, objects in the given order, PrometheusRule expressions last.
    """
    found = [f"{_name(obj)}: {line}" for obj in objects for line in _object_problems(obj)]
    rules = [o for o in objects if isinstance(o, dict) and o.get("kind") == "PrometheusRule"
             and _split(o.get("apiVersion") or "")[0] == "monitoring.coreos.com"]
    return found + promtool_problems(rules)


def problems(obj: dict) -> list[str]:
    """Every schema problem of one object, each `Kind/name: json.path: message`; [] when it holds."""
    return problems_all([obj])
