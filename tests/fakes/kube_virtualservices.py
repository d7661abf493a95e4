"""The fake's Istio VirtualServices (networking.istio.io/v1), what the cluster's shadow route is:

    POST/GET/PATCH/DELETE /apis/networking.istio.io/v1/namespaces/NS/virtualservices[/NAME]

Every body, and every object a patch produces, is validated against the VirtualService CRD in the
repository's Istio bundle (crds/crd-all.gen.yaml, read on its own): schema errors are the API
server's 422 `Status`; unknown fields are pruned and named in a `Warning` header
(fieldValidation=Strict: 400). PATCH takes a JSON merge patch (what the Kubernetes client sends for
custom objects); other patch types are a 415. metadata.generation moves only when the spec changes.
No controller: Istio's own status is not written.
"""
from __future__ import annotations

import json
import uuid

import jsonschema

from tests.fakes.json_patch import MERGE_PATCH, apply_merge_patch
from tests.fakes.kube_core import (
    CustomResource,
    FakeApiServer,
    Route,
    load_crd_schema,
    name_required,
    now,
    prune,
    schema_errors,
    status_object,
    strict_refusal,
    unknown_fields,
)

VIRTUAL_SERVICES = CustomResource("networking.istio.io", "v1", "virtualservices", "VirtualService")
# The API server takes these on every custom resource, whether or not the schema lists them (Istio's does not).
ROOT_FIELDS = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
               "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}


def vs_crd_schema() -> dict:
    schema = load_crd_schema("crd-all.gen.yaml", VIRTUAL_SERVICES.version, VIRTUAL_SERVICES.kind)
    return {**schema, "properties": {**ROOT_FIELDS, **(schema.get("properties") or {})}}


class VirtualServices(FakeApiServer):
    """VirtualServices in `virtual_services`, by (namespace, name)."""

    def __init__(self):
        super().__init__()
        self.vs_schema = vs_crd_schema()
        self.vs_validator = jsonschema.Draft4Validator(self.vs_schema)
        self.virtual_services: dict[tuple[str, str], dict] = {}

    def routes(self) -> list[Route]:
        return [Route(VIRTUAL_SERVICES.pattern, None, self._virtual_services), *super().routes()]

    def virtual_service(self, namespace: str, name: str) -> dict | None:
        with self.lock:
            obj = self.virtual_services.get((namespace, name))
            return json.loads(json.dumps(obj)) if obj else None

    def _virtual_services(self, request, method: str, match, query: dict, body):
        ns, name = match.group(1), match.group(2)
        if method == "POST" and name is None:
            return self._create_vs(request, ns, body, query)
        with self.lock:
            if method == "GET" and name is None:
                items = [json.loads(json.dumps(o)) for (ins, _), o in self.virtual_services.items() if ins == ns]
                return request.reply(200, VIRTUAL_SERVICES.listing(items))
            obj = self.virtual_services.get((ns, name)) if name else None
            if obj is None:
                return request.reply(404, VIRTUAL_SERVICES.not_found(name or ""))
            if method == "GET":
                return request.reply(200, obj)
            if method == "DELETE":
                del self.virtual_services[(ns, name)]
                return request.reply(200, VIRTUAL_SERVICES.deleted(name, obj["metadata"]["uid"]))
            if method == "PATCH":
                return self._patch_vs(request, obj, body, query)
        request.reply(405, status_object(405, "MethodNotAllowed", f"{method} is not supported here"))

    def _checked_vs(self, request, body: dict, query: dict):
        """(stored object, warnings), or None after sending the refusal."""
        name = (body.get("metadata") or {}).get("name", "")
        causes = [] if name else [name_required()]
        causes += [{"reason": "FieldValueInvalid", "message": f"Invalid value: {error.message}", "field": path}
                   for error, path in schema_errors(self.vs_validator, body)]
        if causes:
            request.reply(422, VIRTUAL_SERVICES.invalid(name, causes))
            return None
        warnings = unknown_fields(self.vs_schema, body)
        refusal = strict_refusal(warnings, query)
        if refusal is not None:
            request.reply(400, refusal)
            return None
        return prune(self.vs_schema, body), warnings

    def _create_vs(self, request, ns: str, body, query: dict):
        refusal = VIRTUAL_SERVICES.refusal_of_create(ns, body)
        if refusal is not None:
            return request.reply(400, refusal)
        checked = self._checked_vs(request, body, query)
        if checked is None:
            return None
        obj, warnings = checked
        with self.lock:
            if (ns, obj["metadata"]["name"]) in self.virtual_services:
                return request.reply(409, VIRTUAL_SERVICES.already_exists(obj["metadata"]["name"]))
            obj["metadata"].update({"namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                                    "generation": 1, "creationTimestamp": now()})
            self.virtual_services[(ns, obj["metadata"]["name"])] = obj
        self.reply_warned(request, 201, json.loads(json.dumps(obj)), warnings)

    def _patch_vs(self, request, old: dict, body, query: dict):
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type != MERGE_PATCH:
            return request.reply(415, status_object(
                415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}"))
        new = apply_merge_patch(old, body)
        for key in ("name", "namespace", "uid"):
            if (new.get("metadata") or {}).get(key) != old["metadata"].get(key):
                return request.reply(422, status_object(422, "Invalid", f"metadata.{key}: field is immutable"))
        checked = self._checked_vs(request, new, query)
        if checked is None:
            return None
        obj, warnings = checked
        if obj != old:
            obj["metadata"]["resourceVersion"] = str(int(old["metadata"]["resourceVersion"]) + 1)
            obj["metadata"]["generation"] = old["metadata"]["generation"] + (obj.get("spec") != old.get("spec"))
            self.virtual_services[(old["metadata"]["namespace"], old["metadata"]["name"])] = obj
        self.reply_warned(request, 200, json.loads(json.dumps(obj)), warnings)
