"""The one way to the Kubernetes API: KServe InferenceServices, Istio VirtualServices (the shadow
route), Training Operator PyTorchJobs and Trainer TrainJobs (custom objects), Deployments, pods and
their logs.

    kube = KubeApi()                          # in a pod its service account, else $KUBECONFIG / ~/.kube/config
    kube = KubeApi(configuration)             # or a `kubernetes.client.Configuration` (tests: a fake server)
    kube.get(INFERENCE_SERVICES, ns, name)    # a dict, or None when there is none
    kube.create / patch / replace / delete / list
    kube.wait_for(TRAINJOBS, ns, name, done, timeout=..., poll=...)
    kube.read_deployment(ns, name), kube.list_pods(ns, selector), kube.follow_log(ns, pod, container)

Everything in and out is a plain dict as the API server speaks it (camelCase, no nulls): callers
build objects with the SDKs' model classes and `serialize` them, and read status as dicts. Nothing
here goes through `kserve.KServeClient` or `kubeflow.training.TrainingClient`: both load a
kubeconfig into the process-wide default even when given a Configuration, and `KServeClient.patch`
serializes a model, which drops None, so it cannot send the JSON-merge-patch nulls that remove a
field (`canaryTrafficPercent`). Their requests are the same custom-object calls made here.

Reaching the server: the connection is made on first use (rendering and validating need no
cluster), after a TCP probe (storage/endpoints.py) so a server that is not there fails in seconds,
not after the client's retries of connects that have no timeout; every call but a followed log has
a (connect, read) timeout, since the Kubernetes client waits forever by default
(`_request_timeout`, kubernetes/client/rest.py).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kubernetes import client as k8s
from kubernetes import config as kube_config
from kubernetes import watch
from urllib3.exceptions import HTTPError

from storage.endpoints import one_line, probe

REQUEST_TIMEOUT = (5, 60)  # (connect, read) seconds for each API call; waits are our own polling loops
SERVICE = "the Kubernetes API"


@dataclass(frozen=True)
class Resource:
    """A custom resource type: where its objects live in the API."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


INFERENCE_SERVICES = Resource("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService")
PYTORCHJOBS = Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
TRAINJOBS = Resource("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
VIRTUAL_SERVICES = Resource("networking.istio.io", "v1", "virtualservices", "VirtualService")


class KubeApiError(RuntimeError):
    """A call the API server refused (`status`, `reason`, its own `message`) or never answered
    (`status` None). `str()` is one line: `get TrainJob ns/name: 403 Forbidden: <message>`."""

    def __init__(self, doing: str, status: int | None, reason: str, message: str):
        self.doing, self.status, self.reason, self.message = doing, status, reason, message
        head = f"{status} {reason}" if status is not None else reason
        super().__init__(f"{doing}: {head}: {message}" if message and message != reason else f"{doing}: {head}")


class NotConfigured(KubeApiError):
    """Neither a pod's service account nor a kubeconfig says where the API server is."""

    def __init__(self, detail: str):
        RuntimeError.__init__(self, f"no Kubernetes API configured: {detail} (run in a pod, or point $KUBECONFIG "
                                    "or ~/.kube/config at the cluster)")
        self.doing, self.status, self.reason, self.message = "configuring", None, "NotConfigured", detail


def serialize(obj) -> dict | list | None:
    """An SDK model (kubernetes.client V1*, kserve V1beta1*, kubeflow.training models) as the
    Kubernetes client sends it: camelCase, no nulls. Dicts are copied as they are."""
    if isinstance(obj, dict):
        return json.loads(json.dumps(obj))
    return k8s.ApiClient().sanitize_for_serialization(obj)


def load_configuration() -> k8s.Configuration:
    """In a pod (KUBERNETES_SERVICE_HOST set) its service account, else the kubeconfig; NotConfigured
    when neither is there."""
    configuration = k8s.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config(client_configuration=configuration)
        else:
            kube_config.load_kube_config(client_configuration=configuration)
    except (kube_config.ConfigException, OSError) as err:
        raise NotConfigured(one_line(err)) from None
    return configuration


def _error(doing: str, err: Exception) -> KubeApiError:
    if isinstance(err, k8s.ApiException):
        try:  # the server's Status object: its own reason (AlreadyExists, Invalid, ...) and message
            body = json.loads(err.body)
            message = ": ".join(p for p in (body.get("reason"), body.get("message")) if p) or err.body
        except (TypeError, ValueError, AttributeError):
            message = err.body or ""
        return KubeApiError(doing, err.status, str(err.reason or ""), one_line(message or ""))
    return KubeApiError(doing, None, type(err).__name__, one_line(err))


class KubeApi:
    """One API server. `configuration` (a `kubernetes.client.Configuration`) or, when None, the
    one `load_configuration` finds; nothing is read or reached until the first call."""

    def __init__(self, configuration: k8s.Configuration | None = None):
        self._configuration = configuration
        self._api_client: k8s.ApiClient | None = None

    @property
    def connected(self) -> bool:
        """Whether anything was read or reached yet (a dry run never is)."""
        return self._api_client is not None

    def connect(self) -> k8s.ApiClient:
        """Load the configuration and probe the server (once); raises NotConfigured or
        storage.endpoints.Unreachable."""
        if self._api_client is None:
            configuration = self._configuration or load_configuration()
            probe(SERVICE, configuration.host, proxy=configuration.proxy)  # seconds, not minutes
            self._api_client = k8s.ApiClient(configuration)
        return self._api_client

    def _call(self, doing: str, call: Callable, *args, missing_ok: bool = False, **kwargs):
        api = self.connect()
        try:
            return call(api)(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except k8s.ApiException as err:
            if missing_ok and err.status == 404:
                return None
            raise _error(doing, err) from None
        except HTTPError as err:  # no answer at all (urllib3 gave up)
            raise _error(doing, err) from None

    # custom objects ----------------------------------------------------------------------------

    def create(self, kind: Resource, namespace: str, body: dict) -> dict:
        name = (body.get("metadata") or {}).get("name")
        return self._call(f"create {kind.kind} {namespace}/{name}", lambda a: k8s.CustomObjectsApi(
            a).create_namespaced_custom_object, kind.group, kind.version, namespace, kind.plural, body)

    def get(self, kind: Resource, namespace: str, name: str) -> dict | None:
        """The object, or None when it does not exist."""
        return self._call(f"get {kind.kind} {namespace}/{name}", lambda a: k8s.CustomObjectsApi(
            a).get_namespaced_custom_object, kind.group, kind.version, namespace, kind.plural, name, missing_ok=True)

    def patch(self, kind: Resource, namespace: str, name: str, body: dict) -> dict:
        """A JSON merge patch (RFC 7386: None removes a key), the content type the Kubernetes
        client sends for a dict body."""
        return self._call(f"patch {kind.kind} {namespace}/{name}", lambda a: k8s.CustomObjectsApi(
            a).patch_namespaced_custom_object, kind.group, kind.version, namespace, kind.plural, name, body)

    def delete(self, kind: Resource, namespace: str, name: str) -> None:
        self._call(f"delete {kind.kind} {namespace}/{name}", lambda a: k8s.CustomObjectsApi(
            a).delete_namespaced_custom_object, kind.group, kind.version, namespace, kind.plural, name)

    def wait_for(self, kind: Resource, namespace: str, name: str, done: Callable[[dict], bool], *, timeout: float,
                 poll: float, on_poll: Callable[[dict], None] | None = None) -> dict:
        """Poll the object until `done(obj)`; return it. TimeoutError after `timeout` seconds;
        KubeApiError when the API stops answering about it (or it vanished)."""
        deadline = time.monotonic() + timeout
        while True:
            obj = self.get(kind, namespace, name)
            if obj is None:
                raise KubeApiError(f"get {kind.kind} {namespace}/{name}", 404, "NotFound", "it no longer exists")
            if on_poll is not None:
                on_poll(obj)
            if done(obj):
                return obj
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{kind.kind} {namespace}/{name} not done after {timeout:.0f}s")
            time.sleep(min(poll, left))

    # workloads ---------------------------------------------------------------------------------

    def read_deployment(self, namespace: str, name: str) -> dict | None:
        """The apps/v1 Deployment as a dict, or None when there is none or no right to read it."""
        try:
            found = self._call(f"read Deployment {namespace}/{name}",
                               lambda a: k8s.AppsV1Api(a).read_namespaced_deployment, name, namespace, missing_ok=True)
        except KubeApiError as err:
            if err.status == 403:
                return None
            raise
        return serialize(found) if found is not None else None

    def list_pods(self, namespace: str, label_selector: str) -> list[dict]:
        found = self._call(f"list pods {label_selector} in {namespace}",
                           lambda a: k8s.CoreV1Api(a).list_namespaced_pod, namespace, label_selector=label_selector)
        return serialize(found.items) or []

    def follow_log(self, namespace: str, pod: str, container: str) -> Iterator[str]:
        """The container's log lines as they come, until it ends. No read timeout: a training
        step may stay silent for longer than any request timeout."""
        core = k8s.CoreV1Api(self.connect())
        try:
            yield from watch.Watch().stream(core.read_namespaced_pod_log, name=pod, namespace=namespace,
                                            container=container)
        except (k8s.ApiException, HTTPError) as err:
            raise _error(f"follow log of {namespace}/{pod}", err) from None
