"""The fake KFP API's pipelines and pipeline versions: uploaded (multipart, as `kfp.Client` sends
them) or created from JSON, listed, read.

Uploaded files must parse as a KFP `PipelineSpec` (and `PlatformSpec`) protobuf, as the real server
parses them; names are unique per namespace (pipelines) and per pipeline (versions), with the
backend's messages.
"""
from __future__ import annotations

import email.parser
import email.policy

import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from kfp_server_api import models

from tests.fakes.kfp_contract import ApiError, now, to_json
from tests.fakes.kfp_core import FakeKfpCore, Recorded, Route

UPLOAD_QUERY = {"name", "display_name", "description", "namespace", "tags", "pipelineid"}


def parse_pipeline_package(filename: str, content: bytes) -> dict:
    """The real server reads YAML (or zip/tar.gz archives; not supported here) into a PipelineSpec."""
    if not filename.endswith((".yaml", ".yml")):
        raise ApiError(400, f"Unexpected pipeline file format {filename!r}: this fake reads only YAML")
    try:
        docs = [d for d in yaml.safe_load_all(content) if d is not None]
    except yaml.YAMLError as err:
        raise ApiError(400, f"Failed to parse the pipeline YAML: {err}") from None
    if not docs or not isinstance(docs[0], dict):
        raise ApiError(400, "The pipeline file is empty or not a mapping")
    try:
        spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
        for platform in docs[1:]:
            json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    except json_format.ParseError as err:
        raise ApiError(400, f"Failed to parse the pipeline spec: {err}") from None
    if not spec.pipeline_info.name:
        raise ApiError(400, "Invalid pipeline spec: pipelineInfo.name is empty")
    if not spec.root.HasField("dag"):
        raise ApiError(400, "Invalid pipeline spec: root has no DAG")
    return docs[0]


class Pipelines(FakeKfpCore):
    """Pipelines in `pipelines`, their versions in `versions` (both by id)."""

    def __init__(self, multi_user: bool = False):
        super().__init__(multi_user)
        self.pipelines: dict[str, models.V2beta1Pipeline] = {}
        self.versions: dict[str, models.V2beta1PipelineVersion] = {}

    def routes(self) -> list[Route]:
        return [
            Route(r"/pipelines/upload", "POST", lambda rec, m, raw, ct: self._upload(rec, raw, ct, version=False)),
            Route(r"/pipelines/upload_version", "POST",
                  lambda rec, m, raw, ct: self._upload(rec, raw, ct, version=True)),
            Route(r"/pipelines", "POST",
                  lambda rec, m, raw, ct: self._create_pipeline(self._json(rec, raw, "V2beta1Pipeline"))),
            Route(r"/pipelines", "GET", self._list_pipelines),
            Route(r"/pipelines/([^/]+)/versions", "GET", self._list_versions),
            Route(r"/pipelines/([^/]+)/versions/([^/]+)", "GET", self._get_version),
            Route(r"/pipelines/([^/]+)", "GET",
                  lambda rec, m, raw, ct: (200, to_json(self._get(self.pipelines, m[1], "Pipeline")))),
            *super().routes(),
        ]

    def _list_pipelines(self, rec: Recorded, match, raw: bytes, content_type: str) -> tuple[int, dict]:
        ns = rec.query.get("namespace") or ""
        found = [x for x in self.pipelines.values() if (x.namespace or "") == ns]
        return self._list(found, rec.query, "pipelines", models.V2beta1ListPipelinesResponse)

    def _list_versions(self, rec: Recorded, match, raw: bytes, content_type: str) -> tuple[int, dict]:
        pipeline = self._get(self.pipelines, match[1], "Pipeline")
        found = [v for v in self.versions.values() if v.pipeline_id == pipeline.pipeline_id]
        return self._list(found, rec.query, "pipeline_versions", models.V2beta1ListPipelineVersionsResponse)

    def _get_version(self, rec: Recorded, match, raw: bytes, content_type: str) -> tuple[int, dict]:
        version = self._get(self.versions, match[2], "PipelineVersion")
        if version.pipeline_id != match[1]:
            raise ApiError(404, f"PipelineVersion {match[2]} not found in pipeline {match[1]}")
        return 200, to_json(version)

    def _upload(self, rec: Recorded, raw: bytes, content_type: str, version: bool) -> tuple[int, dict]:
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(400, "Failed to read pipeline from file: request Content-Type isn't multipart/form-data")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        files = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        rec.form = {k: part.get_filename() for k, part in files.items()}
        unknown = set(rec.query) - UPLOAD_QUERY
        if unknown or set(files) != {"uploadfile"}:
            raise ApiError(400, f"unexpected form fields {sorted(files)} or query parameters {sorted(unknown)}")
        part = files["uploadfile"]
        spec = parse_pipeline_package(part.get_filename() or "", part.get_payload(decode=True))
        name = rec.query.get("name") or rec.query.get("display_name") or spec["pipelineInfo"]["name"]
        if version:
            pipeline = self._upload_target(rec.query.get("pipelineid"))
        else:
            pipeline, _ = self._create_pipeline(models.V2beta1Pipeline(
                display_name=name, description=rec.query.get("description"), namespace=rec.query.get("namespace")),
                as_model=True)
        created = self._add_version(pipeline, name, rec.query.get("description"), spec)
        return 200, to_json(created if version else pipeline)

    def _upload_target(self, pipeline_id: str | None) -> models.V2beta1Pipeline:
        """The pipeline a version upload adds to, with the backend's errors for a missing or unknown id."""
        if not pipeline_id:
            raise ApiError(400, "Failed to create a pipeline version due to error parsing pipeline id: "
                                "Invalid input error: Pipeline id is empty")
        pipeline = self.pipelines.get(pipeline_id)
        if pipeline is None:
            raise ApiError(404, f"Failed to create a pipeline version: Pipeline {pipeline_id} not found")
        return pipeline

    def _create_pipeline(self, pipeline, as_model: bool = False):
        name = pipeline.display_name or pipeline.name
        if not name:
            raise ApiError(400, "Invalid input error: Pipeline name is empty. Please specify a valid name")
        # Shared pipelines (no namespace) are allowed in multi-user mode too.
        for other in self.pipelines.values():
            if other.display_name == name and (other.namespace or "") == (pipeline.namespace or ""):
                raise ApiError(409, "Already exist error: Failed to create a new pipeline. "
                                    f"The name {name} already exists. Please specify a new name")
        created = models.V2beta1Pipeline(
            pipeline_id=self._new_id(), display_name=name, name=pipeline.name or name,
            description=pipeline.description, namespace=pipeline.namespace, created_at=now())
        self.pipelines[created.pipeline_id] = created
        return (created, None) if as_model else (200, to_json(created))

    def _add_version(self, pipeline, name: str, description, spec: dict):
        for other in self.versions.values():
            if other.pipeline_id == pipeline.pipeline_id and other.display_name == name:
                raise ApiError(409, "Already exist error: Failed to create a new pipeline version. "
                                    f"The name {name} already exist. Please specify a new name")
        version = models.V2beta1PipelineVersion(
            pipeline_id=pipeline.pipeline_id, pipeline_version_id=self._new_id(), display_name=name, name=name,
            description=description, created_at=now(), pipeline_spec=spec)
        self.versions[version.pipeline_version_id] = version
        return version
