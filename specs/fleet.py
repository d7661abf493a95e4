"""Where an environment runs: its clusters, who may call it, how its GPU jobs queue, how strict its pods are.

A cluster environment (one with `kfp.host`) lists its clusters; `flywheel render` writes a GitOps
tree with one `manifests/clusters/<name>/` per cluster from these fields (see manifests/README.md).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from specs.base import Strict
from specs.quantity import Cpu, Memory
from specs.training import Toleration

Runs = Literal["training", "serving", "monitoring"]
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class GpuPool(Strict):
    """The GPUs a cluster lends this environment: one Kueue ResourceFlavor and its nominal quota."""

    product: str = Field(description="the nodes' nvidia.com/gpu.product label, e.g. NVIDIA-A100-SXM4-80GB")
    resource: Annotated[str, Field(pattern=r"^nvidia\.com/(gpu|mig-\d+g\.\d+gb)$")] = Field(
        "nvidia.com/gpu", description="whole GPUs (nvidia.com/gpu) or a MIG profile (nvidia.com/mig-1g.5gb)")
    quota: Annotated[int, Field(ge=1)] = Field(
        description="GPUs (or MIG slices) the env's ClusterQueue may use at once")


class ClusterSpec(Strict):
    """One Kubernetes cluster of the fleet and what of the lifecycle runs on it."""

    name: Annotated[str, Field(pattern=DNS_LABEL)]
    zone: str = Field(description="topology.kubernetes.io/zone of its nodes, e.g. eu-west-1a")
    gpu: GpuPool | None = Field(None, description="null: no GPUs here (training cannot run on it)")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="the GPU pool's node labels (Kueue's ResourceFlavor puts training there)")
    tolerations: list[Toleration] = Field(default_factory=list, description="the GPU pool's taints training tolerates")
    serving_node_selector: dict[str, str] = Field(
        default_factory=dict, description="where the serving and monitor pods run (CPU nodes: not the GPU pool)")
    serving_tolerations: list[Toleration] = Field(default_factory=list,
                                                  description="taints the serving and monitor pods tolerate")
    predictor_replicas: Annotated[int | None, Field(ge=0)] = Field(
        None, description="serving.min_replicas on this cluster; 0 scales to zero (Knative mode only); null: the env's")
    runs: list[Runs] = Field(["training", "serving", "monitoring"], description="what of the lifecycle runs here")
    server: str | None = Field(
        None, description="its API server URL as Argo CD knows it (the ApplicationSet's destination.server); "
                          "null: Argo CD finds it by `name` (`argocd cluster add CONTEXT --name NAME`)")

    @model_validator(mode="after")
    def _consistent(self):
        if "training" in self.runs and self.gpu is None:
            raise ValueError(f"cluster {self.name!r} runs training but declares no gpu pool")
        if len(set(self.runs)) != len(self.runs):
            raise ValueError(f"cluster {self.name!r}: runs lists an entry twice")
        return self


class AuthSpec(Strict):
    """Who may call the inference endpoint and the monitor (Istio RequestAuthentication +
    AuthorizationPolicy on the pods; upstream KServe has no auth of its own)."""

    issuer: str | None = Field(None, description="JWT issuer (the `iss` claim); null: no token is required")
    jwks_uri: str | None = Field(None, description="where the issuer's signing keys are published")
    audiences: list[str] = Field(default_factory=list, description="accepted `aud` values; empty: any")
    principals: list[str] = Field(
        default_factory=list, description="request principals (`<iss>/<sub>`) allowed to call the model; empty: "
                                          "any valid token")
    ingress_namespace: str = Field("istio-system", description="namespace of the Istio ingress gateway")
    caller_namespaces: list[str] = Field(
        default_factory=list, description="namespaces whose workloads call the model over the mesh (with a token) "
                                          "instead of through the ingress gateway: admitted to its entry port; a "
                                          "shadow route mirrors their requests")
    knative_namespace: str = Field("knative-serving", description="where the activator runs (Knative mode)")
    prometheus: str = Field("cluster.local/ns/monitoring/sa/prometheus-k8s",
                            description="Prometheus' mTLS identity (scrapes the metrics ports)")
    alertmanager: str = Field("cluster.local/ns/monitoring/sa/alertmanager-main",
                              description="Alertmanager's mTLS identity (the only caller of /alerts)")
    monitoring_namespace: str = Field("monitoring", description="namespace of Prometheus and Alertmanager")

    @model_validator(mode="after")
    def _consistent(self):
        if bool(self.issuer) != bool(self.jwks_uri):
            raise ValueError("auth.issuer and auth.jwks_uri go together")
        if self.principals and not self.issuer:
            raise ValueError("auth.principals needs auth.issuer")
        return self


class QueueSpec(Strict):
    """Kueue: GPU jobs wait in a queue instead of failing on quota."""

    enabled: bool = True
    cohort: str = Field("flywheel", description="ClusterQueues of one cohort borrow each other's unused quota")
    cpu: Cpu = Field("64", description="the env's ClusterQueue nominal CPU")
    memory: Memory = Field("256Gi", description="the env's ClusterQueue nominal memory")
    borrowing_limit_gpus: Annotated[int, Field(ge=0)] = Field(
        0, description="GPUs the env may borrow from its cohort beyond its quota")


class GitOpsSpec(Strict):
    """Where Flux and Argo CD read the generated tree (manifests/gitops/): one repository for the fleet."""

    repo_url: str = Field("https://github.com/flywheel-ml/flywheel.git", description="the Git repository to sync")
    branch: str = Field("main", description="the branch Flux and Argo CD track")
    path: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")] = Field(
        "manifests", description="the manifests/ folder's path inside the repository")
    argocd_project: str = Field("default", description="the Argo CD AppProject the generated Applications belong to")


class FleetSpec(Strict):
    """What a cluster environment runs on; an embedded environment (no kfp.host) leaves it empty."""

    clusters: list[ClusterSpec] = Field(default_factory=list)
    auth: AuthSpec = AuthSpec()
    queue: QueueSpec = QueueSpec()
    pod_security: Literal["restricted", "baseline"] = Field(
        "restricted", description="the namespace's enforced Pod Security level")
    gitops: GitOpsSpec = GitOpsSpec()

    @model_validator(mode="after")
    def _unique(self):
        names = [c.name for c in self.clusters]
        if len(set(names)) != len(names):
            raise ValueError("fleet.clusters: cluster names must be unique")
        return self
