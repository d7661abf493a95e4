"""What the InferenceService render (deployment/inferenceservice.py) and its policy checks
(deployment/isvc_policy.py) share: KServe's names, annotations, ports and modes, the served model,
the serializer and the error. Both import it; callers keep importing from deployment.inferenceservice.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from gateways.kube_api import INFERENCE_SERVICES, serialize

API_VERSION, KIND = INFERENCE_SERVICES.api_version, INFERENCE_SERVICES.kind
CRD_VERSION = "v1beta1"
PREDICTOR_CONTAINER = "kserve-container"        # KServe's name for a component's main container
TRANSFORMER_CONTAINER = "transformer-container"  # the name KServe collocates in the predictor pod

HTTP_PORT, GRPC_PORT = 8080, 8081                # ModelServer defaults; what the ingress reaches
COLLOCATED_HTTP_PORT, COLLOCATED_GRPC_PORT = 8085, 8086  # the predictor beside a collocated transformer
READY_PATH, LIVE_PATH, METRICS_PATH = "/v2/health/ready", "/v2/health/live", "/metrics"

DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
DEPLOYMENT_MODES = ("Standard", "Knative")
TAG_ROUTING = "serving.kserve.io/enable-tag-routing"
PROMETHEUS_SCRAPING = "serving.kserve.io/enable-prometheus-scraping"
KNATIVE_AUTOSCALER_CLASS = "autoscaling.knative.dev/class"
KNATIVE_HPA = "hpa.autoscaling.knative.dev"
MODEL_VERSION = "flywheel/model-version"
MODEL_URI = "flywheel/model-uri"
REGISTERED_MODEL = "flywheel/registered-model"
ENV_LABEL = "flywheel/env"
# Annotation/label prefixes this module owns on a live object (a re-render may drop such a key;
# anything else on the object belongs to someone else and is left alone).
MANAGED_PREFIXES = ("flywheel/", "app.kubernetes.io/", "serving.kserve.io/", "prometheus.io/",
                    "autoscaling.knative.dev/")

HPA_METRICS = ("cpu", "memory")           # what an HPA scales on (Standard mode; Knative's HPA class)
KPA_METRICS = ("concurrency", "rps")      # what the Knative Pod Autoscaler scales on
OBJECT_STORE_SCHEMES = ("s3", "s3a", "minio", "gs", "gcs")
# A literal secret in a value: URL user-info, or an AWS access key id.
LITERAL_SECRET = re.compile(r"://[^/\s:@]+:[^/\s@]+@|\bAKIA[0-9A-Z]{16}\b")
HOST_LABEL_MAX = 63
COMPONENTS = ("predictor", "transformer")


class InferenceServiceInvalid(ValueError):
    """The InferenceService breaks the CRD's schema or Flywheel's rules; `problems` are
    `json.path: message` lines, all of them at once."""

    def __init__(self, name: str, problems: list[str]):
        self.name, self.problems = name, list(problems)
        super().__init__(f"InferenceService {name!r} is invalid:\n" + "\n".join(f"  {p}" for p in self.problems))


@dataclass(frozen=True)
class ServedModel:
    """A registered model version as the cluster serves it: the registry's name and version, and
    the storage URI of its flywheel model directory (what `--model_dir` loads)."""

    name: str
    version: str
    uri: str


def isvc_name(model_name: str) -> str:
    """A DNS-1035 label from a registered model's name (`credit-default` stays as it is)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)
    if not name:
        raise ValueError(f"cannot make an InferenceService name from {model_name!r}")
    return name[:HOST_LABEL_MAX].rstrip("-")


def to_dict(obj) -> dict:
    """Serialize an SDK model the way the Kubernetes client sends it (camelCase, no nulls)."""
    if isinstance(obj, dict):
        return copy.deepcopy(obj)
    return serialize(obj)
