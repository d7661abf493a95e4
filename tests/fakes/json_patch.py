"""JSON merge patch (RFC 7386) and JSON patch (RFC 6902), as the Kubernetes API server applies them
to a custom resource: the fake InferenceService routes (kube_inferenceservices.py) patch with these.
The media types are the ones the server accepts for custom resources; a strategic merge patch is not
one of them (https://kubernetes.io/docs/tasks/manage-kubernetes-objects/update-api-object-kubectl-patch/).
"""
from __future__ import annotations

import json

MERGE_PATCH, JSON_PATCH = "application/merge-patch+json", "application/json-patch+json"


def apply_merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


class JsonPatchError(ValueError):
    pass


def apply_json_patch(doc, operations: list) -> object:
    """RFC 6902: add, remove, replace, move, copy, test."""
    doc = json.loads(json.dumps(doc))

    def parts(pointer: str) -> list[str]:
        if pointer == "":
            return []
        if not pointer.startswith("/"):
            raise JsonPatchError(f"invalid JSON pointer {pointer!r}")
        return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]

    def parent(pointer: str):
        keys = parts(pointer)
        if not keys:
            raise JsonPatchError("the root cannot be the target here")
        node = doc
        for key in keys[:-1]:
            try:
                node = node[int(key)] if isinstance(node, list) else node[key]
            except (KeyError, IndexError, ValueError, TypeError):
                raise JsonPatchError(f"doc is missing path: {pointer}") from None
        return node, keys[-1]

    def get(pointer: str):
        node = doc
        for key in parts(pointer):
            try:
                node = node[int(key)] if isinstance(node, list) else node[key]
            except (KeyError, IndexError, ValueError, TypeError):
                raise JsonPatchError(f"doc is missing path: {pointer}") from None
        return node

    def add(pointer: str, value):
        nonlocal doc
        if pointer == "":
            doc = value
            return
        node, key = parent(pointer)
        if isinstance(node, list):
            index = len(node) if key == "-" else int(key)
            if not 0 <= index <= len(node):
                raise JsonPatchError(f"index out of range: {pointer}")
            node.insert(index, value)
        elif isinstance(node, dict):
            node[key] = value
        else:
            raise JsonPatchError(f"doc is missing path: {pointer}")

    def remove(pointer: str):
        node, key = parent(pointer)
        try:
            if isinstance(node, list):
                del node[int(key)]
            else:
                del node[key]
        except (KeyError, IndexError, ValueError, TypeError):
            raise JsonPatchError(f"unable to remove nonexistent key: {pointer}") from None

    if not isinstance(operations, list):
        raise JsonPatchError("a JSON patch is a list of operations")
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "add":
            add(path, op["value"])
        elif kind == "remove":
            remove(path)
        elif kind == "replace":
            get(path)
            if path == "":
                doc = op["value"]
            else:
                remove(path)
                add(path, op["value"])
        elif kind in ("move", "copy"):
            value = json.loads(json.dumps(get(op["from"])))
            if kind == "move":
                remove(op["from"])
            add(path, value)
        elif kind == "test":
            if get(path) != op.get("value"):
                raise JsonPatchError(f"testing value {path} failed")
        else:
            raise JsonPatchError(f"unexpected kind of JSON patch operation {kind!r}")
    return doc
