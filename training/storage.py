"""Read and write through URIs (local paths, s3://, minio://) so PyTorchJob pods never depend
on the KFP launcher pod's filesystem. fsspec does the work; this only normalises URIs."""
from __future__ import annotations

import os
from contextlib import contextmanager

import fsspec


def _normalise(uri: str) -> tuple[str, dict]:
    # minio:// is what KFP calls its in-cluster S3; s3fs speaks it with an endpoint override.
    if uri.startswith("minio://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MINIO_ENDPOINT", "http://minio-service.kubeflow:9000")
        return "s3://" + uri.removeprefix("minio://"), {"client_kwargs": {"endpoint_url": endpoint}}
    if uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        return uri, {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    return uri, {}


def filesystem(uri: str):
    uri, options = _normalise(uri)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


@contextmanager
def open_uri(uri: str, mode: str = "rb"):
    fs, path = filesystem(uri)
    if "w" in mode:
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
    with fs.open(path, mode) as handle:
        yield handle


def write_atomic(uri: str, data: bytes) -> None:
    """Write-then-rename on local disks, so a killed worker never leaves a torn checkpoint.
    Object stores publish a PUT atomically already."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if fs.protocol in ("file", "local") or "file" in getattr(fs, "protocol", ()):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as handle:
            handle.write(data)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
