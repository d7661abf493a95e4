"""Publishing a pipeline to an env's KFP: compile it with the env's config, and make the version
holding that content the pipeline's newest one, uploading it when it is not. `flywheel submit` and
`flywheel schedule` publish through `publish`; retraining starts what was published last.

What "published" means: the newest version of `flywheel-<env>-<pipeline>`. `publish` reuses that
version when it already holds the same compiled content (its name ends in the content hash) and
uploads a new one otherwise, also when an older version held this content: publishing reviewed
config again makes it the newest, so every retraining entry point
(`gateways.kfp_api.start_published_run`) starts exactly what was published last.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

from gateways import kfp_api
from gateways.kfp_api import KfpError, KfpTarget
from pipelines.arguments import kfp_target
from pipelines.config import Settings


class Published(NamedTuple):
    pipeline_id: str | None  # None: a dry run for a pipeline KFP does not have yet
    version_id: str | None  # None: a dry run that would upload
    arguments: dict
    version_name: str  # the version's name (a dry run's would-be name)
    uploaded: bool


def require_target(settings: Settings, pipeline: str) -> KfpTarget:
    """The env's KFP target for PIPELINE; a KfpError on an env that runs on this machine."""
    target = kfp_target(settings, pipeline)
    if target is None:
        raise KfpError(f"environment {settings.env!r} has no KFP host (kfp.host); "
                       f"use `flywheel run --env {settings.env}` to run the pipeline on this machine")
    return target


def client_for(settings: Settings):
    """An authenticated kfp.Client for the env's KFP host."""
    return kfp_api.connect(require_target(settings, "training"))


def default_catalog():
    """`pipelines.catalog`: PIPELINES, compile_pipeline(settings, name, out_dir), pipeline_arguments."""
    from pipelines import catalog

    return catalog


def compile_package(catalog, settings: Settings, name: str, out_dir: Path) -> tuple[Path, dict]:
    """(compiled package, arguments) of pipeline NAME for the env; a KfpError when it does not build."""
    if name not in catalog.PIPELINES:
        raise KfpError(f"unknown pipeline {name!r}; known: {', '.join(sorted(catalog.PIPELINES))}")
    try:
        package = Path(catalog.compile_pipeline(settings, name, out_dir))
        arguments = catalog.pipeline_arguments(settings, name)
    except Exception as err:  # a pipeline that does not build for this env cannot be published
        raise KfpError(f"compiling {name!r} for {settings.env}: {type(err).__name__}: "
                       f"{' '.join(str(err).split())}") from err
    return package, arguments


def publish(settings: Settings, pipeline: str, *, client=None, catalog=None, version: str | None = None,
            dry_run: bool = False, by: str = "flywheel") -> Published:
    """Compile PIPELINE for the env and make it the published (newest) version of its KFP pipeline.

    Args:
        version: A name for the version: always uploaded under it (a person asked for it).
        dry_run: Look up, upload nothing: `version_id` is None when publishing would upload.
        by: Who published, in an uploaded version's description.
    """
    target = require_target(settings, pipeline)
    host, catalog = target.host.rstrip("/"), catalog or default_catalog()
    with tempfile.TemporaryDirectory(prefix="flywheel-publish-") as tmp:
        package, arguments = compile_package(catalog, settings, pipeline, Path(tmp))
        content = package.read_bytes()
        client = client or kfp_api.connect(target)
        with kfp_api.quiet():
            with kfp_api.step(f"looking up versions of {target.pipeline!r}", host):
                pipeline_id = kfp_api.find_pipeline_id(client, target.pipeline, target.namespace)
                newest = kfp_api.newest_version(client, pipeline_id) if pipeline_id else None
            if version is None and newest is not None \
                    and (newest.display_name or "").endswith(f"-{kfp_api.content_hash(content)}"):
                return Published(pipeline_id, newest.pipeline_version_id, arguments, newest.display_name, False)
            name = version or kfp_api.version_name(content)
            if dry_run:
                return Published(pipeline_id, None, arguments, name, False)
            with kfp_api.step(f"finding or creating pipeline {target.pipeline!r}", host):
                pipeline_id = pipeline_id or kfp_api.ensure_pipeline_id(
                    client, target.pipeline, target.namespace,
                    description=f"Flywheel {pipeline} pipeline, {settings.env} environment")
            with kfp_api.step(f"uploading version {name!r} of {target.pipeline!r}", host):
                uploaded = kfp_api.upload_version(client, package, name, pipeline_id,
                                                  description=f"published by {by} for {settings.env}")
    return Published(pipeline_id, uploaded.pipeline_version_id, arguments, name, True)
