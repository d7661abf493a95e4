"""The fake's KServe InferenceServices (serving.kserve.io/v1beta1) and the Deployments Standard mode
runs on:

    POST/GET/PUT/PATCH/DELETE /apis/serving.kserve.io/v1beta1/namespaces/NS/inferenceservices[/NAME]
    GET /apis/apps/v1/namespaces/NS/deployments/NAME   (Standard mode's <isvc>-<component>)

Every body (and every object a patch produces) is validated against the official CRD in the
repository's crds/ (read on its own): schema errors are the API server's 422 `Status`; unknown
fields are pruned and reported in a `Warning` header (fieldValidation=Strict: 400); then KServe's
validating webhook has its say (400). PATCH takes a JSON merge patch (RFC 7386, what the Kubernetes
client sends for custom objects) or a JSON patch (RFC 6902, kubectl --type=json); a strategic merge
patch is a 415, as for any custom resource. metadata.generation moves only when the spec changes.
What the controllers then do is kube_isvc_controllers.py.
"""
from __future__ import annotations

import json
import re
import uuid

import jsonschema

from tests.fakes.json_patch import JSON_PATCH, MERGE_PATCH, JsonPatchError, apply_json_patch, apply_merge_patch
from tests.fakes.kube_core import (
    DNS1035,
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
from tests.fakes.kube_isvc_controllers import ISVC_COMPONENTS, Isvc, IsvcScript, changed, tick

INFERENCE_SERVICES = CustomResource("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService")
DEPLOYMENTS = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)$")


def isvc_crd_schema() -> dict:
    """The InferenceService CRD's openAPIV3Schema, from the repository's copy of the upstream file."""
    return load_crd_schema("serving.kserve.io_inferenceservices.yaml", INFERENCE_SERVICES.version)


def isvc_causes(validator, obj: dict) -> list[dict]:
    """The 422 causes the API server finds in an InferenceService: the name, then the schema's errors."""
    causes = [] if (obj.get("metadata") or {}).get("name", "") else [name_required()]
    for error, path in schema_errors(validator, obj):
        if error.validator == "required":  # the server names the missing field itself
            missing = re.match(r"^'([^']+)' is a required property", error.message)
            field_name = missing.group(1) if missing else "?"
            causes.append({"reason": "FieldValueRequired", "message": "Required value",
                           "field": f"{path}.{field_name}" if path else field_name})
            continue
        reason = {"type": "FieldValueTypeInvalid"}.get(error.validator, "FieldValueInvalid")
        causes.append({"reason": reason, "message": f"Invalid value: {error.message}", "field": path})
    return causes


def webhook_problems(obj: dict, old: dict | None = None) -> list[str]:
    """What KServe's validating webhook refuses (v1beta1 ComponentExtensionSpec.Validate, the name
    check, validateDeploymentMode on updates: a raw string comparison with the status)."""
    problems = []
    was = ((old or {}).get("status") or {}).get("deploymentMode")
    now_mode = ((obj.get("metadata") or {}).get("annotations") or {}).get("serving.kserve.io/deploymentMode")
    if was and now_mode is not None and now_mode != was:
        problems.append(f"update rejected: deploymentMode cannot be changed from '{was}' to '{now_mode}'")
    name = (obj.get("metadata") or {}).get("name", "")
    if name and not DNS1035.match(name):
        problems.append(f"The InferenceService \"{name}\" is invalid: a DNS-1035 label must consist of lower case "
                        "alphanumeric characters or '-', start with an alphabetic character, and end with an "
                        "alphanumeric character")
    for component in ISVC_COMPONENTS:
        part = (obj.get("spec") or {}).get(component) or {}
        low, high = part.get("minReplicas"), part.get("maxReplicas")
        if low is not None and low < 0:
            problems.append("MinReplicas cannot be less than 0.")
        if low is not None and high is not None and high and high < low:
            problems.append("MaxReplicas cannot be less than MinReplicas.")
    return problems


class InferenceServices(FakeApiServer):
    """InferenceServices in `isvcs`; `isvc_scripts` by name, else `default_isvc_script`."""

    def __init__(self):
        super().__init__()
        self.isvc_schema = isvc_crd_schema()
        self.isvc_validator = jsonschema.Draft4Validator(self.isvc_schema)
        self.isvcs: dict[tuple[str, str], Isvc] = {}
        self.isvc_scripts: dict[str, IsvcScript] = {}
        self.default_isvc_script = IsvcScript()

    def routes(self) -> list[Route]:
        return [Route(INFERENCE_SERVICES.pattern, None, self._isvcs),
                Route(DEPLOYMENTS, ("GET",), self._deployment), *super().routes()]

    def isvc(self, namespace: str, name: str) -> dict | None:
        with self.lock:
            entry = self.isvcs.get((namespace, name))
            return json.loads(json.dumps(entry.obj)) if entry else None

    def _isvcs(self, request, method: str, match, query: dict, body):
        ns, name = match.group(1), match.group(2)
        if method == "POST" and name is None:
            return self._create(request, ns, body, query)
        if method == "GET" and name is None:
            with self.lock:
                for (ins, _), entry in self.isvcs.items():
                    if ins == ns:
                        tick(entry)
                items = [json.loads(json.dumps(e.obj)) for (ins, _), e in self.isvcs.items() if ins == ns]
            return request.reply(200, INFERENCE_SERVICES.listing(items))
        with self.lock:
            entry = self.isvcs.get((ns, name)) if name else None
            if entry is None:
                return request.reply(404, INFERENCE_SERVICES.not_found(name or ""))
            if method == "GET":
                tick(entry)
                return request.reply(200, entry.obj)
            if method == "DELETE":
                del self.isvcs[(ns, name)]
                return request.reply(200, INFERENCE_SERVICES.deleted(name, entry.obj["metadata"]["uid"]))
            if method == "PATCH":
                return self._patch(request, entry, body, query)
            if method == "PUT":
                if (body.get("metadata") or {}).get("resourceVersion") != entry.obj["metadata"]["resourceVersion"]:
                    return request.reply(409, status_object(
                        409, "Conflict", f"Operation cannot be fulfilled on {INFERENCE_SERVICES.plural}."
                                         f'{INFERENCE_SERVICES.group} "{name}": the object has been modified; please '
                                         "apply your changes to the latest version and try again"))
                return self._update(request, entry, body, query)
        request.reply(405, status_object(405, "MethodNotAllowed", f"{method} is not supported here"))

    def _patch(self, request, entry: Isvc, body, query: dict):
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            if content_type == MERGE_PATCH:
                patched = apply_merge_patch(entry.obj, body)
            elif content_type == JSON_PATCH:
                patched = apply_json_patch(entry.obj, body)
            else:
                return request.reply(415, status_object(
                    415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted "
                                                 f"media types include: {JSON_PATCH}, {MERGE_PATCH}, "
                                                 "application/apply-patch+yaml"))
        except JsonPatchError as err:
            return request.reply(422, status_object(422, "Invalid", str(err)))
        return self._update(request, entry, patched, query)

    def _deployment(self, request, method: str, match, query: dict, body):
        ns, name = match.group(1), match.group(2)
        with self.lock:
            for (ins, _), entry in self.isvcs.items():
                for dep in entry.deployments.values():
                    if ins == ns and dep["metadata"]["name"] == name:
                        return request.reply(200, dep)
        request.reply(404, status_object(404, "NotFound", f'deployments.apps "{name}" not found',
                                         {"name": name, "group": "apps", "kind": "deployments"}))

    def _checked(self, request, body: dict, query: dict, old: dict | None = None):
        """(stored object, warnings) or None after sending the refusal."""
        name = (body.get("metadata") or {}).get("name", "")
        body = {k: v for k, v in body.items() if k != "status"}  # a subresource: not written here
        causes = isvc_causes(self.isvc_validator, body)
        if causes:
            request.reply(422, INFERENCE_SERVICES.invalid(name, causes))
            return None
        warnings = unknown_fields(self.isvc_schema, body)
        refusal = strict_refusal(warnings, query)
        if refusal is not None:
            request.reply(400, refusal)
            return None
        problems = webhook_problems(body, old)
        if problems:
            request.reply(400, status_object(400, "BadRequest", 'admission webhook "inferenceservice.kserve-webhook-'
                                                                'server.validator" denied the request: ' +
                                             " ".join(problems)))
            return None
        return prune(self.isvc_schema, body), warnings

    def _create(self, request, ns: str, body, query: dict):
        refusal = INFERENCE_SERVICES.refusal_of_create(ns, body)
        if refusal is not None:
            return request.reply(400, refusal)
        checked = self._checked(request, body, query)
        if checked is None:
            return None
        obj, warnings = checked
        name = obj["metadata"]["name"]
        with self.lock:
            if (ns, name) in self.isvcs:
                return request.reply(409, INFERENCE_SERVICES.already_exists(name))
            obj["metadata"].update({"namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                                    "generation": 1, "creationTimestamp": now()})
            entry = Isvc(obj, self.isvc_scripts.get(name, self.default_isvc_script))
            self.isvcs[(ns, name)] = entry
            changed(entry)
            out = json.loads(json.dumps(obj))
        self.reply_warned(request, 201, out, warnings)

    def _update(self, request, entry: Isvc, new: dict, query: dict):
        old = entry.obj
        if not isinstance(new, dict):
            return request.reply(422, status_object(422, "Invalid", "the patched object is not an object"))
        meta = new.get("metadata") or {}
        for key in ("name", "namespace", "uid"):
            if meta.get(key) != old["metadata"].get(key):
                return request.reply(422, status_object(422, "Invalid", f"metadata.{key}: field is immutable"))
        checked = self._checked(request, new, query, old)
        if checked is None:
            return None
        obj, warnings = checked
        for key in ("generation", "creationTimestamp"):
            obj["metadata"][key] = old["metadata"][key]
        if "status" in old:
            obj["status"] = old["status"]
        if obj == old:
            return self.reply_warned(request, 200, json.loads(json.dumps(old)), warnings)
        obj["metadata"]["resourceVersion"] = str(int(old["metadata"]["resourceVersion"]) + 1)
        if obj.get("spec") != old.get("spec"):
            obj["metadata"]["generation"] = old["metadata"]["generation"] + 1
        entry.obj = obj
        if obj["metadata"]["generation"] != old["metadata"]["generation"]:
            changed(entry)
        self.reply_warned(request, 200, json.loads(json.dumps(obj)), warnings)
