"""The official CRD schemas Flywheel's cluster objects are held to, and the validator.

The YAML files beside this module are byte-for-byte copies of the upstream CRDs (Training
Operator v1's PyTorchJob, KServe's InferenceService; `upstream.yaml` records each one's URL,
version and sha256), shipped as package data so validation works in the image.
The API server prunes unknown fields silently; here they are errors, so a typo fails at render
time instead of becoming a missing setting on the cluster.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import yaml

PYTORCHJOB = "kubeflow.org_pytorchjobs.yaml"
INFERENCESERVICE = "serving.kserve.io_inferenceservices.yaml"


PACKAGED_CRD_DIR = Path(__file__).resolve().parent  # package data: present wherever flywheel is installed
# Each copy's upstream URL, version, commit and sha256 (tests/crds/test_crds.py holds the copies to it).
UPSTREAM_MANIFEST = PACKAGED_CRD_DIR / "upstream.yaml"


def crd_dir() -> Path:
    """FLYWHEEL_CRD_DIR if set, else the CRD copies shipped inside the package (`crds/`).
    A path outside the package (the repository's shared/crds) does not exist in the image."""
    return Path(os.environ.get("FLYWHEEL_CRD_DIR") or PACKAGED_CRD_DIR)


@lru_cache(maxsize=64)
def _crd_schema(path: str, version: str) -> dict:
    crd = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return served["schema"]["openAPIV3Schema"]
    raise LookupError(f"{path} has no version {version!r}")


def crd_schema(crd_file: str, version: str) -> dict:
    """The openAPIV3Schema of `version` in the CRD file `crd_file` (e.g. PYTORCHJOB)."""
    path = crd_dir() / crd_file
    if not path.is_file():
        raise FileNotFoundError(f"CRD schema {path} not found; set FLYWHEEL_CRD_DIR to the folder holding {crd_file}")
    return _crd_schema(str(path), version)


@lru_cache(maxsize=1)
def _validator_class():
    """Draft 4 (what OpenAPI v3 schemas are based on), plus two API-server behaviours that plain
    JSON Schema lacks: unknown fields are errors (the server would silently prune them, which
    is how a typo becomes a missing setting), and x-kubernetes-list-type map/set lists must not
    repeat keys. Other x-kubernetes-* keys are annotations."""
    import jsonschema
    from jsonschema import ValidationError

    base = jsonschema.Draft4Validator

    def properties(validator, props, instance, schema):
        yield from base.VALIDATORS["properties"](validator, props, instance, schema)
        if (validator.is_type(instance, "object") and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            for key in sorted(set(instance) - set(props)):
                yield ValidationError(f"unknown field {key!r}", path=[key])

    def list_type(validator, kind, instance, schema):
        if not validator.is_type(instance, "array") or kind not in ("map", "set"):
            return
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = {}
        for index, item in enumerate(instance):
            key = repr([item.get(k) for k in keys]) if kind == "map" and isinstance(item, dict) else repr(item)
            if key in seen:
                yield ValidationError(f"duplicate entry {key} (also at [{seen[key]}])", path=[index])
            seen.setdefault(key, index)

    return jsonschema.validators.extend(base, {"properties": properties, "x-kubernetes-list-type": list_type})


def validator_for(schema: dict):
    """A validator of `schema` with the API server's behaviours (see `_validator_class`)."""
    return _validator_class()(schema)


def _json_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def schema_problems(obj: dict, crd_file: str, version: str) -> list[str]:
    """Every way `obj` breaks the CRD's schema, each as `json.path: message`; [] when it holds."""
    validator = _validator_class()(crd_schema(crd_file, version))
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_json_path(e.absolute_path)}: {e.message}" for e in errors]
