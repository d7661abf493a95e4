"""What a cluster runs, as Kubernetes objects: pure builders from specs (no API calls, no Settings).

Each module builds one concern's objects from a `FleetContext` (fleet/context.py);
`pipelines/gitops.py` writes them into the GitOps tree under manifests/ and `flywheel render`
renders it per cluster.
"""
