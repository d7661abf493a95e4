"""What every pipeline task gets, whichever pipeline it is in: limits, no caching, the object
store's endpoint and credentials, and on a cluster a non-root identity.

Never cached: ingest reads data that changes behind the same URI, the gate and scoring resolve the
registry's current champion, the monitoring steps read new traffic, register and select write to
MLflow. A scheduled run that hit the cache would silently do nothing.
"""
from __future__ import annotations

from kfp import kubernetes

import storage
from crds.hardening import RUN_AS_UID
from pipelines.config import Settings


def configure(task, settings: Settings) -> None:
    """Limits, no caching, AWS_ENDPOINT_URL when config names one; on a cluster, the image's non-root
    user and the object store's credentials by reference from the namespace Secret (every task
    reads or writes it: artifacts, staged models, the sink's windows, the registry's files).

    Pod Security `restricted` for task pods: the KFP backend (>= 2.16, kubeflow/pipelines#12782)
    already sets no privilege escalation, drops ALL capabilities and seccomp RuntimeDefault on every
    container it starts; the user container's runAsNonRoot is the SDK's to set (this), and Argo's
    wait/init containers take `executor.securityContext` from workflow-controller-configmap.
    """
    task.set_cpu_limit(settings.kfp.task_cpu).set_memory_limit(settings.kfp.task_memory)
    task.set_caching_options(False)
    if settings.kfp.object_store_endpoint:
        task.set_env_variable("AWS_ENDPOINT_URL", settings.kfp.object_store_endpoint)
    if settings.embedded:
        return
    kubernetes.set_security_context(task, run_as_user=RUN_AS_UID, run_as_group=RUN_AS_UID, run_as_non_root=True)
    kubernetes.use_secret_as_env(task, secret_name=storage.CREDENTIALS_SECRET,
                                 secret_key_to_env={k: k for k in storage.CREDENTIAL_KEYS})
