"""Read and write through URIs (local paths, s3://, minio://) so training pods never depend
on the KFP launcher pod's filesystem. fsspec does the work; this only normalises URIs.

- `minio://bucket/key` is what KFP calls its in-cluster S3: it is the same object as
  `s3://bucket/key` at the endpoint in AWS_ENDPOINT_URL (else MINIO_ENDPOINT, else KFP's
  in-cluster MinIO service).
- `s3://` honours AWS_ENDPOINT_URL (botocore does too), and credentials come from the usual
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment.
- Object-store listings are never cached: other processes (the training pods, the launcher)
  write the same prefixes, and a stale listing would hide a model or a checkpoint.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import fsspec

# The object store's credentials, by reference only: a namespace secret created out of band
# (manifests/README.md) that PyTorchJob pods and pipeline tasks read as environment variables.
CREDENTIALS_SECRET = "flywheel-object-store"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

KFP_MINIO_ENDPOINT = "http://minio-service.kubeflow:9000"


def _normalise(uri: str) -> tuple[str, dict]:
    if uri.startswith("minio://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MINIO_ENDPOINT", KFP_MINIO_ENDPOINT)
        return "s3://" + uri.removeprefix("minio://"), {"client_kwargs": {"endpoint_url": endpoint},
                                                        "use_listings_cache": False}
    if uri.startswith(("s3://", "s3a://")):
        options: dict = {"use_listings_cache": False}
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
        return uri, options
    return uri, {}


def filesystem(uri: str):
    uri, options = _normalise(uri)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def _make_parent(fs, path: str) -> None:
    # Object stores have no folders (and creating a missing bucket is not ours to do).
    parent = path.rsplit("/", 1)[0]
    if parent and is_local(fs):
        fs.makedirs(parent, exist_ok=True)


@contextmanager
def open_uri(uri: str, mode: str = "rb"):
    fs, path = filesystem(uri)
    if "w" in mode:
        _make_parent(fs, path)
    with fs.open(path, mode) as handle:
        yield handle


def write_atomic(uri: str, data: bytes) -> None:
    """Readers see the old content or the new, never a torn file: write-then-rename (with fsync)
    on local disks; on object stores a PUT (or a completed multipart upload) is atomic already."""
    fs, path = filesystem(uri)
    _make_parent(fs, path)
    if is_local(fs):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash of the node
        finally:
            os.close(directory)
    else:
        fs.pipe_file(path, data)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
