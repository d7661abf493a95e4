"""Pod hardening, written once for every pod Flywheel puts on a cluster: training pods
(training/pods.py, PyTorchJob and TrainJob) and serving pods (deployment/inferenceservice.py).

    non-root with a numeric uid, no privilege escalation, every capability dropped, seccomp
    RuntimeDefault, a read-only root filesystem with a /tmp emptyDir for HOME and caches,
    requests = limits, credentials only by Secret reference

Why here: it is part of what our objects must look like, beside the CRD schemas that hold them;
layer 1, so both training (layer 3) and deployment (above serving) import it, and neither imports
the other. Built with the Kubernetes client's model classes (no API calls), so field names come
from the SDK.
"""
from __future__ import annotations

import re

from kubernetes import client as k8s

RUN_AS_UID = 10001  # the image's non-root user (numeric, so runAsNonRoot can be verified)
SCRATCH = "/tmp"
# A name that says it holds a secret: its value must come from a Secret, never a literal.
CREDENTIAL_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The root filesystem is read-only: HOME and the caches libraries write live on the scratch emptyDir.
READ_ONLY_ROOT_ENV = {"HOME": SCRATCH, "XDG_CACHE_HOME": f"{SCRATCH}/.cache", "MPLCONFIGDIR": f"{SCRATCH}/.matplotlib",
                      "PYTHONDONTWRITEBYTECODE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


def check_plain_env(env: dict[str, str] | None, secret: str) -> None:
    """ValueError for a variable whose name says credential (it belongs in Secret `secret`) or
    whose value is not a string."""
    for name, value in (env or {}).items():
        if CREDENTIAL_ENV.search(name):
            raise ValueError(f"env {name} looks like a credential; put it in Secret {secret!r} instead")
        if not isinstance(value, str):
            raise ValueError(f"env {name} must be a string, got {type(value).__name__}")


def container_security() -> k8s.V1SecurityContext:
    """Every container's securityContext. The uid and seccomp are repeated at the container level:
    Knative accepts only a subset of the pod-level fields (knative.dev/docs "Kubernetes security
    context" feature flag), and the container's own settings win wherever both are set."""
    return k8s.V1SecurityContext(allow_privilege_escalation=False, read_only_root_filesystem=True,
                                 run_as_non_root=True, run_as_user=RUN_AS_UID, run_as_group=RUN_AS_UID,
                                 capabilities=k8s.V1Capabilities(drop=["ALL"]),
                                 seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def pod_security(*, knative_subset: bool = False) -> k8s.V1PodSecurityContext:
    """The pod's securityContext. `knative_subset`: only the fields a Knative Service accepts
    without feature flags (no fsGroup, no seccompProfile: the containers carry seccomp, and an
    emptyDir is world-writable, so fsGroup changes nothing there)."""
    if knative_subset:
        return k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=RUN_AS_UID, run_as_group=RUN_AS_UID)
    return k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=RUN_AS_UID, run_as_group=RUN_AS_UID,
                                    fs_group=RUN_AS_UID, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def resources(cpu: str, memory: str, extended: dict[str, str] | None = None) -> k8s.V1ResourceRequirements:
    """Requests = limits (Guaranteed QoS). `extended` (GPUs, MIG slices) are limits only:
    Kubernetes sets an extended resource's request equal to its limit."""
    requests = {"cpu": str(cpu), "memory": str(memory)}
    return k8s.V1ResourceRequirements(requests=requests, limits={**requests, **(extended or {})})


def scratch_volume(size_limit: str) -> k8s.V1Volume:
    return k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=size_limit))


def scratch_mount() -> k8s.V1VolumeMount:
    return k8s.V1VolumeMount(name="tmp", mount_path=SCRATCH)


def secret_env(secret: str) -> list[k8s.V1EnvFromSource]:
    """Every key of Secret `secret` as env, by reference (the values never appear in the object)."""
    return [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))]


# --- Pod Security "restricted", as a checker ----------------------------------------------------
# https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted: every container
# (init and ephemeral too) non-root, no privilege escalation, capabilities dropped to ALL (only
# NET_BIND_SERVICE may be added back), seccomp RuntimeDefault or Localhost (pod or container);
# plus, as Flywheel's own hardening, a read-only root filesystem (scratch goes to an emptyDir).
RESTRICTED_SECCOMP = ("RuntimeDefault", "Localhost")


def container_restricted_problems(container: dict, pod_security: dict | None, path: str, *,
                                  read_only_root: bool = True) -> list[str]:
    """Where one container (a plain dict, camelCase) breaks `restricted`, each as `path.field: rule`.
    `pod_security` is its pod's securityContext (what the container inherits)."""
    pod, own = pod_security or {}, container.get("securityContext") or {}
    at = f"{path}.securityContext"
    problems = []
    if own.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
        problems.append(f"{at}.runAsNonRoot: must be true here or in the pod (restricted)")
    if own.get("runAsUser", pod.get("runAsUser")) == 0:
        problems.append(f"{at}.runAsUser: must not be 0 (restricted)")
    if own.get("privileged"):
        problems.append(f"{at}.privileged: must not be true (restricted)")
    if own.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{at}.allowPrivilegeEscalation: must be false (restricted)")
    capabilities = own.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append(f"{at}.capabilities.drop: must include ALL (restricted)")
    if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
        problems.append(f"{at}.capabilities.add: only NET_BIND_SERVICE is allowed (restricted)")
    seccomp = (own.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
    if seccomp not in RESTRICTED_SECCOMP:
        problems.append(f"{at}.seccompProfile.type: must be RuntimeDefault or Localhost here or in the pod "
                        f"(restricted), got {seccomp!r}")
    if read_only_root and own.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{at}.readOnlyRootFilesystem: must be true (Flywheel's hardening; scratch on an emptyDir)")
    return problems


def restricted_problems(pod_spec: dict, path: str, *, read_only_root: bool = True) -> list[str]:
    """Every way a pod spec (plain dict) breaks `restricted`: its containers, init containers and
    ephemeral containers, against the pod's securityContext; [] when it holds."""
    pod = pod_spec.get("securityContext") or {}
    problems = []
    if pod.get("runAsUser") == 0:
        problems.append(f"{path}.securityContext.runAsUser: must not be 0 (restricted)")
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for index, container in enumerate(pod_spec.get(kind) or []):
            problems += container_restricted_problems(container, pod, f"{path}.{kind}[{index}]",
                                                      read_only_root=read_only_root)
    if not pod_spec.get("containers"):
        problems.append(f"{path}.containers: none to check")
    return problems
