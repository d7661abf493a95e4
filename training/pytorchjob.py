"""Distributed training on a cluster: a Kubeflow Training Operator `PyTorchJob` (kubeflow.org/v1).

Three parts, each usable alone:

- `build_pytorchjob` renders the job from `Settings.training` (as a dict) with kubeflow-training's
  models, so field names and nesting come from the SDK rather than from hand-written dicts.
- `validate_pytorchjob` checks a rendered job against the official CRD schema (`training/crds/`,
  shipped with the package; a copy of `shared/crds/`)
  and against the rules the CRD cannot express (the operator's admission webhook, our security
  policy), so a bad job fails here and not as a half-scheduled job on a GPU cluster.
- `PyTorchJobLauncher` submits it through `kubeflow.training.TrainingClient`, streams the master's
  log, waits for Succeeded/Failed, raises `TrainingJobFailed`, and deletes it per `keep_job`.

How the pods find each other (Training Operator v1.8+/1.9, `pkg/controller.v1/pytorch`): the
operator appends env to every container. With a Master replica it sets MASTER_ADDR/PORT,
PET_MASTER_ADDR/PORT (`<job>-master-0`, the container port named `pytorchjob-port`), WORLD_SIZE,
RANK, PET_NODE_RANK and PET_NPROC_PER_NODE (from `spec.nprocPerNode`). Without an elasticPolicy it
adds PET_NNODES=<replicas>; with one it adds PET_NNODES=<min>:<max>, PET_RDZV_BACKEND,
PET_RDZV_ENDPOINT (`<job>-worker-0:<its pytorchjob-port>`), PET_RDZV_ID and PET_MAX_RESTARTS.
`torchrun` reads every PET_* variable as the default of the flag of the same name, so the one
container command `torchrun --module training.train ARGS` is right in both modes, and GPUs per pod
(`nprocPerNode`) work the same way; `python -m training.train` alone would only work for one
process per pod and would lose torchrun's in-pod restarts. We use the elastic mode whenever the job
has Worker replicas (the webhook requires a Worker for it): c10d rendezvous tolerates pods that
schedule late (down to `elastic.min_replicas`) and restarts the worker group up to
`elastic.max_restarts` times, resuming from the entry point's checkpoints. A single-pod job is
non-elastic and gets PET_MAX_RESTARTS from us. No `metrics` are set, so the operator creates no HPA.
"""
from __future__ import annotations

import os
import re
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml
from kubernetes import client as k8s

from training import storage
from training.launchers import TORCHRUN_ENV, TrainingFailed

CONTAINER_NAME = "pytorch"  # the operator finds the training container by this name
PORT_NAME = "pytorchjob-port"  # ... and the rendezvous/master port by this one
PORT = 23456
ENTRY_COMMAND = ["torchrun", "--module", "training.train"]
RUN_AS_UID = 10001  # the image's non-root user (numeric, so runAsNonRoot can be verified)
STORAGE_SECRET = storage.CREDENTIALS_SECRET  # AWS_* keys for the object store, by reference only
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("All", "Running", "None")
KEEP_JOB = ("always", "on_failure", "never")
# Set by the operator or torchrun; a value of ours would be appended twice or silently lost.
RESERVED_ENV = re.compile(r"^(MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK|PYTHONUNBUFFERED|PET_.*)$")
CREDENTIAL_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CRD_FILE = "kubeflow.org_pytorchjobs.yaml"


class PyTorchJobInvalid(ValueError):
    """A rendered PyTorchJob breaks the CRD schema or our rules; each line names the JSON path."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid PyTorchJob:\n  " + "\n  ".join(problems))


class TrainingJobFailed(TrainingFailed):
    """The cluster job failed, timed out or could not be created; carries the operator's reason."""

    def __init__(self, job_name: str, namespace: str, reason: str, message: str, status: dict | None = None):
        self.job_name, self.namespace, self.reason, self.message = job_name, namespace, reason, message
        self.status = status or {}
        super().__init__(f"PyTorchJob {namespace}/{job_name} failed: {reason}: {message}")


# --------------------------------------------------------------------------------------------
# Rendering


def _constants():
    from kubeflow.training.constants import constants

    return constants


def _env_vars(train_spec: dict, env: dict[str, str] | None, elastic: bool) -> list[k8s.V1EnvVar]:
    user = dict(env or {})
    for name, value in user.items():
        if RESERVED_ENV.match(name):
            raise ValueError(f"env {name} is set by the Training Operator or torchrun; do not pass it")
        if CREDENTIAL_ENV.search(name):
            raise ValueError(f"env {name} looks like a credential; put it in Secret {STORAGE_SECRET!r} instead")
        if not isinstance(value, str):
            raise ValueError(f"env {name} must be a string, got {type(value).__name__}")
    # HOME and caches must point at the writable emptyDir: the root filesystem is read-only.
    # TORCHRUN_ENV: pods run torchrun too, and its restarts need a fresh store (training.launchers).
    ours = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "MPLCONFIGDIR": "/tmp/.matplotlib",
            "PYTHONDONTWRITEBYTECODE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
            **TORCHRUN_ENV}
    if not elastic:
        ours["PET_MAX_RESTARTS"] = str(train_spec["elastic"]["max_restarts"])
    return [k8s.V1EnvVar(name=k, value=v) for k, v in {**ours, **user}.items()]


def _resources(train_spec: dict) -> k8s.V1ResourceRequirements:
    res = train_spec["resources"]
    requests = {"cpu": str(res["cpu"]), "memory": str(res["memory"])}
    limits = dict(requests)
    gpu = res.get("gpu") or {}
    if gpu.get("count", 0) > 0:
        # Extended resources are limits only; Kubernetes sets the request equal to the limit.
        limits[gpu["resource"]] = str(gpu["count"])
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def _pod_template(train_spec: dict, image: str, args: list[str], env: dict[str, str] | None,
                  labels: dict[str, str], elastic: bool, storage_secret: str) -> k8s.V1PodTemplateSpec:
    gpu = train_spec["resources"].get("gpu") or {}
    container = k8s.V1Container(
        name=CONTAINER_NAME,
        image=image,
        image_pull_policy="IfNotPresent",
        command=list(ENTRY_COMMAND),
        args=list(args),
        env=_env_vars(train_spec, env, elastic),
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=storage_secret))],
        ports=[k8s.V1ContainerPort(name=PORT_NAME, container_port=PORT, protocol="TCP")],
        resources=_resources(train_spec),
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            run_as_non_root=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
        volume_mounts=[k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
                       k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
    )
    tolerations = [
        k8s.V1Toleration(key=t["key"], operator=t.get("operator", "Exists"), value=t.get("value"),
                         effect=t.get("effect"))
        for t in train_spec.get("tolerations", [])
    ]
    node_selector = {"nvidia.com/gpu.product": gpu["product"]} if gpu.get("product") else None
    return k8s.V1PodTemplateSpec(
        # Istio's sidecar never exits, which would keep every replica (and the job) Running.
        metadata=k8s.V1ObjectMeta(labels=dict(labels), annotations={"sidecar.istio.io/inject": "false"}),
        spec=k8s.V1PodSpec(
            containers=[container],
            automount_service_account_token=False,  # training never talks to the Kubernetes API
            security_context=k8s.V1PodSecurityContext(
                run_as_non_root=True, run_as_user=RUN_AS_UID, run_as_group=RUN_AS_UID, fs_group=RUN_AS_UID,
                seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
            ),
            node_selector=node_selector,
            tolerations=tolerations or None,
            volumes=[
                k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="4Gi")),
                # DataLoader workers and NCCL need more shared memory than the 64Mi default.
                k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="1Gi")),
            ],
        ),
    )


def pytorchjob_model(train_spec: dict, job_name: str, namespace: str, image: str, args: list[str],
                     env: dict[str, str] | None = None, *, environment: str | None = None,
                     annotations: dict[str, str] | None = None, storage_secret: str = STORAGE_SECRET):
    """The job as a `KubeflowOrgV1PyTorchJob` (what `TrainingClient.create_job` accepts)."""
    from kubeflow.training import models

    c = _constants()
    if args and not str(args[0]).startswith("-"):
        raise ValueError(f"args are the entry point's arguments (e.g. --data ...), got {args[0]!r}; "
                         f"the container runs {' '.join(ENTRY_COMMAND)} itself")
    workers = int(train_spec["workers"])
    elastic_spec = train_spec["elastic"]
    elastic = workers > 1
    if elastic and not elastic_spec["min_replicas"] <= workers <= elastic_spec["max_replicas"]:
        raise ValueError(f"training.workers={workers} must lie within elastic min_replicas.."
                         f"max_replicas ({elastic_spec['min_replicas']}..{elastic_spec['max_replicas']})")
    environment = environment or train_spec.get("env")
    labels = {"app.kubernetes.io/part-of": "flywheel", "app.kubernetes.io/component": "training"}
    if environment:
        labels["flywheel/env"] = environment
    template = _pod_template(train_spec, image, args, env, labels, elastic, storage_secret)

    def replica(count: int):
        return models.KubeflowOrgV1ReplicaSpec(replicas=count, restart_policy="OnFailure", template=template)

    replicas = {c.REPLICA_TYPE_MASTER: replica(1)}
    if workers > 1:
        replicas[c.REPLICA_TYPE_WORKER] = replica(workers - 1)
    gpus = (train_spec["resources"].get("gpu") or {}).get("count", 0)
    spec = models.KubeflowOrgV1PyTorchJobSpec(
        pytorch_replica_specs=replicas,
        # One process per GPU; one per pod on CPU ("auto" would start one per CPU core).
        nproc_per_node=str(gpus if gpus > 0 else 1),
        elastic_policy=models.KubeflowOrgV1ElasticPolicy(
            min_replicas=elastic_spec["min_replicas"], max_replicas=elastic_spec["max_replicas"],
            max_restarts=elastic_spec["max_restarts"], rdzv_backend="c10d", rdzv_id=job_name,
        ) if elastic else None,
        run_policy=models.KubeflowOrgV1RunPolicy(
            active_deadline_seconds=train_spec["active_deadline_seconds"],
            backoff_limit=train_spec["backoff_limit"],
            # Free GPUs held by stragglers at the end, keep finished pods (and their logs) until
            # the job itself is deleted per keep_job.
            clean_pod_policy="Running",
        ),
    )
    return models.KubeflowOrgV1PyTorchJob(
        api_version=c.API_VERSION,
        kind=c.PYTORCHJOB_KIND,
        metadata=k8s.V1ObjectMeta(name=job_name, namespace=namespace, labels=dict(labels),
                                  annotations=dict(annotations) if annotations else None),
        spec=spec,
    )


def to_dict(obj: Any) -> Any:
    """Serialize an SDK model the way the Kubernetes client sends it (camelCase, no nulls)."""
    return k8s.ApiClient().sanitize_for_serialization(obj)


def build_pytorchjob(train_spec: dict, job_name: str, namespace: str, image: str, args: list[str],
                     env: dict[str, str] | None = None, **options) -> dict:
    """The PyTorchJob for `train_spec` (Settings.training as a dict) as a plain dict.

    Options: `environment` (the flywheel/env label; default train_spec["env"]), `annotations`
    (lineage), `storage_secret` (Secret with the object-store keys, referenced, never copied).
    """
    return to_dict(pytorchjob_model(train_spec, job_name, namespace, image, args, env, **options))


def to_yaml(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=False)


# --------------------------------------------------------------------------------------------
# Validation


PACKAGED_CRD_DIR = Path(__file__).resolve().parent / "crds"  # package data: present wherever training is installed


def crd_dir() -> Path:
    """FLYWHEEL_CRD_DIR if set, else the CRD copy shipped inside the package (`training/crds/`).
    A path outside the package (the repository's shared/crds) does not exist in the image."""
    return Path(os.environ.get("FLYWHEEL_CRD_DIR") or PACKAGED_CRD_DIR)


@lru_cache(maxsize=4)
def _crd_schema(path: str, version: str) -> dict:
    crd = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return served["schema"]["openAPIV3Schema"]
    raise LookupError(f"{path} has no version {version!r}")


def crd_schema(version: str = "v1") -> dict:
    path = crd_dir() / CRD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"CRD schema {path} not found; set FLYWHEEL_CRD_DIR to the folder holding {CRD_FILE}")
    return _crd_schema(str(path), version)


@lru_cache(maxsize=1)
def _validator_class():
    """Draft 4 (what OpenAPI v3 schemas are based on), plus two API-server behaviours that plain
    JSON Schema lacks: unknown fields are errors (the server would silently prune them, which
    is how a typo becomes a missing setting), and x-kubernetes-list-type map/set lists must not
    repeat keys. Other x-kubernetes-* keys are annotations."""
    import jsonschema
    from jsonschema import ValidationError

    base = jsonschema.Draft4Validator

    def properties(validator, props, instance, schema):
        yield from base.VALIDATORS["properties"](validator, props, instance, schema)
        if (validator.is_type(instance, "object") and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            for key in sorted(set(instance) - set(props)):
                yield ValidationError(f"unknown field {key!r}", path=[key])

    def list_type(validator, kind, instance, schema):
        if not validator.is_type(instance, "array") or kind not in ("map", "set"):
            return
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = {}
        for index, item in enumerate(instance):
            key = repr([item.get(k) for k in keys]) if kind == "map" and isinstance(item, dict) else repr(item)
            if key in seen:
                yield ValidationError(f"duplicate entry {key} (also at [{seen[key]}])", path=[index])
            seen.setdefault(key, index)

    return jsonschema.validators.extend(base, {"properties": properties, "x-kubernetes-list-type": list_type})


def _json_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def schema_problems(obj: dict, version: str = "v1") -> list[str]:
    validator = _validator_class()(crd_schema(version))
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_json_path(e.absolute_path)}: {e.message}" for e in errors]


def policy_problems(obj: dict) -> list[str]:
    """What the CRD does not check: the operator's admission webhook and our own rules.
    Expects an object that passed `schema_problems`."""
    c = _constants()
    problems = []
    if obj.get("apiVersion") != c.API_VERSION or obj.get("kind") != c.PYTORCHJOB_KIND:
        problems.append(f"(root): must be {c.API_VERSION} {c.PYTORCHJOB_KIND}, got {obj.get('apiVersion')} {obj.get('kind')}")
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    spec = obj.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not DNS1035.match(name):
        problems.append(f"metadata.name: {name!r} must be a DNS-1035 label (lower case, starts with a letter)")
    # Pod and Service names are <name>-<type>-<index> and must stay within 63 characters.
    for rtype, rspec in replicas.items():
        longest = f"{name}-{rtype.lower()}-{max(int(rspec.get('replicas', 1)) - 1, 0)}"
        if len(longest) > 63:
            problems.append(f"metadata.name: {name!r} is too long: pod/service {longest!r} exceeds 63 characters")
    if not meta.get("namespace"):
        problems.append("metadata.namespace: required")
    if not replicas:
        problems.append("spec.pytorchReplicaSpecs: required")
    if "Master" in replicas and replicas["Master"].get("replicas") != 1:
        problems.append("spec.pytorchReplicaSpecs.Master.replicas: must be 1")
    if spec.get("elasticPolicy"):
        if "Worker" not in replicas:
            problems.append("spec.pytorchReplicaSpecs.Worker: required when elasticPolicy is set")
        ep = spec["elasticPolicy"]
        if ep.get("minReplicas", 1) > ep.get("maxReplicas", ep.get("minReplicas", 1)):
            problems.append("spec.elasticPolicy: minReplicas must be <= maxReplicas")
    clean = (spec.get("runPolicy") or {}).get("cleanPodPolicy")
    if clean is not None and clean not in CLEAN_POD_POLICIES:
        problems.append(f"spec.runPolicy.cleanPodPolicy: {clean!r} not one of {list(CLEAN_POD_POLICIES)}")
    for rtype, rspec in replicas.items():
        at = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            problems.append(f"{at}: replica type must be Master or Worker")
        if rspec.get("replicas", 1) < 1:
            problems.append(f"{at}.replicas: must be at least 1")
        if rspec.get("restartPolicy") not in RESTART_POLICIES:
            problems.append(f"{at}.restartPolicy: {rspec.get('restartPolicy')!r} not one of {list(RESTART_POLICIES)}")
        pod = (rspec.get("template") or {}).get("spec") or {}
        containers = pod.get("containers") or []
        if not any(ct.get("name") == CONTAINER_NAME for ct in containers):
            problems.append(f"{at}.template.spec.containers: needs a container named {CONTAINER_NAME!r}")
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
            problems.append(f"{at}.template.spec.securityContext: runAsNonRoot true and a non-zero runAsUser required")
        for i, ct in enumerate(containers):
            cat = f"{at}.template.spec.containers[{i}]"
            if not ct.get("image"):
                problems.append(f"{cat}.image: required")
            res = ct.get("resources") or {}
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(res.get(kind) or {})
                if missing:
                    problems.append(f"{cat}.resources.{kind}: {sorted(missing)} required")
            for key, value in (res.get("requests") or {}).items():
                if key.startswith("nvidia.com/") and (res.get("limits") or {}).get(key) != value:
                    problems.append(f"{cat}.resources: {key} request must equal its limit")
            if (ct.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cat}.securityContext.allowPrivilegeEscalation: must be false")
            for j, var in enumerate(ct.get("env") or []):
                if CREDENTIAL_ENV.search(var.get("name", "")) and "value" in var:
                    problems.append(f"{cat}.env[{j}]: {var['name']} carries a literal credential; use a Secret reference")
    return problems


def validate_pytorchjob(obj: dict, version: str = "v1") -> None:
    """Raise PyTorchJobInvalid listing every problem with its JSON path; return None if valid.
    Our rules run once the schema holds, so they can rely on its types."""
    problems = schema_problems(obj, version) or policy_problems(obj)
    if problems:
        raise PyTorchJobInvalid(problems)


# --------------------------------------------------------------------------------------------
# Launching


class JobBackend(Protocol):
    """What PyTorchJobLauncher needs from a training-job API; PyTorchJob (Training Operator v1)
    is the one implemented. Kubeflow Trainer v2 plugs in here as a `TrainJobBackend`: `render`
    emits a trainer.kubeflow.org/v1alpha1 `TrainJob` (runtimeRef torch-distributed,
    trainer.numNodes/resourcesPerNode from the same train_spec, validated against its CRD) and
    the other methods call the `kubeflow` SDK's TrainerClient (train, wait_for_job_status,
    get_job_logs, delete_job). The launcher's waiting, failure and keep_job logic stays as is."""

    kind: str

    def render(self, job_name: str, args: list[str], env: dict[str, str] | None) -> dict: ...
    def submit(self, job_name: str, args: list[str], env: dict[str, str] | None) -> dict: ...
    def wait(self, job_name: str, timeout: float, poll: float, on_poll: Callable[[dict], None]) -> dict: ...
    def follow_master_log(self, job_name: str) -> bool: ...
    def delete(self, job_name: str) -> None: ...


class PyTorchJobBackend:
    """PyTorchJob through `kubeflow.training.TrainingClient` (in-cluster config by default)."""

    kind = "PyTorchJob"

    def __init__(self, train_spec: dict, namespace: str, image: str, client=None,
                 client_configuration: k8s.Configuration | None = None, **render_options):
        from kubeflow.training import TrainingClient

        self.train_spec, self.namespace, self.image = train_spec, namespace, image
        self.render_options = render_options
        self.client = client or TrainingClient(client_configuration=client_configuration, namespace=namespace)

    def render(self, job_name, args, env):
        obj = build_pytorchjob(self.train_spec, job_name, self.namespace, self.image, args, env, **self.render_options)
        validate_pytorchjob(obj)
        return obj

    def submit(self, job_name, args, env):
        model = pytorchjob_model(self.train_spec, job_name, self.namespace, self.image, args, env, **self.render_options)
        obj = to_dict(model)
        validate_pytorchjob(obj)  # before anything reaches the cluster
        self.client.create_job(job=model, namespace=self.namespace)
        return obj

    def wait(self, job_name, timeout, poll, on_poll):
        c = _constants()
        job = self.client.wait_for_job_conditions(
            job_name, self.namespace, self.kind,
            expected_conditions={c.JOB_CONDITION_SUCCEEDED, c.JOB_CONDITION_FAILED},
            wait_timeout=timeout, polling_interval=poll,
            callback=lambda j: on_poll(to_dict(j.status) or {}),
        )
        return to_dict(job.status) or {}

    def follow_master_log(self, job_name):
        """Stream the master's log to stdout once its pod left Pending; False if not started yet."""
        pods = self.client.get_job_pods(job_name, self.namespace, is_master=True)
        if not any(p.status is not None and p.status.phase not in (None, "Pending") for p in pods):
            return False
        self.client.get_job_logs(job_name, self.namespace, self.kind, is_master=True, follow=True)
        return True

    def delete(self, job_name):
        self.client.delete_job(job_name, self.namespace, self.kind)


def _one_line(err: BaseException, limit: int = 500) -> str:
    """`Type: message` on one line, so a failed submit reads as one line in the task log. The API's
    multi-line errors keep status, reason and body; response headers are noise and dropped."""
    lines = [line for line in str(err).splitlines() if not line.startswith("HTTP response headers")]
    text = " ".join(" ".join(lines).split()) or "no message"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


def _condition(status: dict, kind: str) -> dict | None:
    matches = [c for c in status.get("conditions") or [] if c.get("type") == kind and c.get("status") == "True"]
    return matches[-1] if matches else None


class PyTorchJobLauncher:
    """Run one training job on the cluster to completion: submit, stream logs, wait, clean up.

    `client` is a ready TrainingClient; otherwise one is made from `client_configuration` (a
    kubernetes.client.Configuration whose host is the API server), or from the in-cluster
    service account. `wait_timeout` defaults to the job's activeDeadlineSeconds plus a grace
    period: the operator enforces the deadline itself, our timeout only catches a stuck operator.
    """

    GRACE_SECONDS = 300

    def __init__(self, train_spec: dict, namespace: str, image: str, client=None, *,
                 client_configuration: k8s.Configuration | None = None, backend: JobBackend | None = None,
                 wait_timeout: float | None = None, poll_interval: float = 10.0, log_drain_timeout: float = 30.0,
                 out=None, **render_options):
        keep = train_spec.get("keep_job", "on_failure")
        if keep not in KEEP_JOB:
            raise ValueError(f"training.keep_job {keep!r} not one of {list(KEEP_JOB)}")
        self.train_spec, self.namespace, self.keep_job = train_spec, namespace, keep
        self.backend = backend or PyTorchJobBackend(train_spec, namespace, image, client,
                                                    client_configuration, **render_options)
        self.wait_timeout = wait_timeout or train_spec["active_deadline_seconds"] + self.GRACE_SECONDS
        self.poll_interval = min(poll_interval, self.wait_timeout)
        self.log_drain_timeout = log_drain_timeout
        self.out = out or sys.stdout

    def _say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    def _follow_logs(self, job_name: str, finished: threading.Event) -> None:
        try:
            while True:
                done = finished.is_set()  # read before looking, so a finished job gets one last look
                if self.backend.follow_master_log(job_name) or done:
                    return
                finished.wait(self.poll_interval)
        except Exception as err:  # logs are a convenience; the job's outcome comes from its status
            print(f"warning: could not stream logs of {job_name}: {err}", file=sys.stderr, flush=True)

    def run(self, job_name: str, args: list[str], env: dict[str, str] | None = None) -> dict:
        """Returns the job's final status; raises TrainingJobFailed if it fails or times out."""
        kind = self.backend.kind
        try:
            self.backend.submit(job_name, args, env)
        except PyTorchJobInvalid:
            raise
        except Exception as err:  # API errors, a missing CRD schema, a bad client config: one line, not a traceback
            raise TrainingJobFailed(job_name, self.namespace, "CreateFailed", _one_line(err)) from err
        self._say(f"{kind} {self.namespace}/{job_name} created; waiting up to {self.wait_timeout:.0f}s")

        seen: set[tuple] = set()

        def on_poll(status: dict) -> None:
            for cond in status.get("conditions") or []:
                key = (cond.get("type"), cond.get("status"), cond.get("reason"))
                if cond.get("status") == "True" and key not in seen:
                    seen.add(key)
                    self._say(f"{kind} {job_name}: {cond.get('type')} ({cond.get('reason')}) {cond.get('message') or ''}".rstrip())

        finished = threading.Event()
        logs = threading.Thread(target=self._follow_logs, args=(job_name, finished), daemon=True, name=f"logs-{job_name}")
        logs.start()
        outcome, status = "interrupted", {}
        try:
            try:
                status = self.backend.wait(job_name, self.wait_timeout, self.poll_interval, on_poll)
                outcome = "succeeded" if _condition(status, "Succeeded") else "failed"
            except TimeoutError:
                outcome = "timeout"
            except RuntimeError as err:  # the API stopped answering about the job (or it vanished)
                outcome, status = "lost", {"error": str(err)}
            finally:
                finished.set()
            if outcome in ("succeeded", "failed"):  # the log ends with the container: let it drain
                logs.join(self.log_drain_timeout)
        finally:
            # A job we stopped waiting on is deleted first, which also ends its log stream.
            self._clean_up(job_name, outcome)
        if outcome == "failed":
            cond = _condition(status, "Failed") or {}
            raise TrainingJobFailed(job_name, self.namespace, cond.get("reason") or "Failed",
                                    cond.get("message") or "no message from the operator", status)
        if outcome == "timeout":
            raise TrainingJobFailed(job_name, self.namespace, "Timeout",
                                    f"not finished after {self.wait_timeout:.0f}s", status)
        if outcome == "lost":
            raise TrainingJobFailed(job_name, self.namespace, "WatchFailed", status["error"], status)
        return status

    def _clean_up(self, job_name: str, outcome: str) -> None:
        """keep_job: always | on_failure (keep a failed job and its pods to read) | never.
        A job we stopped waiting on (timeout, interrupt, lost watch) may still hold GPUs, so it
        goes unless keep_job is always."""
        delete = self.keep_job == "never" or (self.keep_job == "on_failure" and outcome != "failed")
        if not delete:
            self._say(f"{self.backend.kind} {self.namespace}/{job_name} kept (keep_job={self.keep_job}, {outcome})")
            return
        try:
            self.backend.delete(job_name)
            self._say(f"{self.backend.kind} {self.namespace}/{job_name} deleted (keep_job={self.keep_job}, {outcome})")
        except Exception as err:  # never hide the job's own outcome behind a clean-up error
            print(f"warning: could not delete {job_name}: {err}", file=sys.stderr, flush=True)
