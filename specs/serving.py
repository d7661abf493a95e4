"""How the champion is served: one KServe process, or a KServe predictor + transformer, locally and as an
InferenceService."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from specs.base import Strict
from specs.quantity import Cpu, Memory


class PayloadLogging(Strict):
    """Request/response payload events for monitoring, as the KServe logger agent sends them
    (CloudEvents, binary mode). On a cluster the InferenceService `logger` sends them; locally the
    server clients call does (the one process, or the transformer)."""

    url: str | None = Field(None, description="where events go (the monitor service's sink); null turns logging off")
    mode: Literal["all", "request", "response"] = "all"
    sample_rate: Annotated[float, Field(ge=0.0, le=1.0)] = Field(1.0, description="fraction of calls logged")


class ServingSpec(Strict):
    deployer: Literal["local", "inferenceservice"] = Field(
        "inferenceservice", description="local: the serving processes on this machine's loopback; "
                                        "inferenceservice: a KServe InferenceService on the env's cluster")
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    canary_percent: Annotated[int, Field(ge=0, le=100)] = Field(
        0, description="Knative mode: share of traffic the new revision gets until its smoke test passes; "
                       "0 = no canary")
    deployment_mode: Literal["Standard", "Knative"] = Field(
        "Standard", description="KServe deployment mode: Standard (Deployment + HPA) or Knative (revisions, canary)")
    topology: Literal["single", "collocated", "separate"] = Field(
        "single", description="single: one process validates, preprocesses, runs the model and answers (the "
                              "predictor's container, no transformer; for a predictor on CPU); collocated: a "
                              "transformer container beside the predictor in its pod (localhost hop); separate: "
                              "the transformer as its own component, scaled apart (e.g. CPU transformer, GPU "
                              "predictor)")
    hop_protocol: Literal["grpc-v2", "v2", "v1"] = Field(
        "grpc-v2", description="how the transformer calls the predictor (collocated and separate)")
    scale_metric: Literal["cpu", "memory", "concurrency", "rps"] = "cpu"
    scale_target: Annotated[int, Field(gt=0)] = Field(80, description="autoscaling target for scale_metric")
    cpu: Cpu = "1"
    memory: Memory = "1Gi"
    max_batch_rows: Annotated[int, Field(gt=0)] = Field(1000, description="rows per request; more is a 413")
    max_body_bytes: Annotated[int, Field(gt=0)] = Field(4 << 20, description="request body limit; more is a 413")
    ready_timeout_seconds: Annotated[int, Field(gt=0)] = 300
    payload_logging: PayloadLogging = PayloadLogging()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "transformer" in data:
            raise ValueError(f"serving.transformer ({data['transformer']!r}) was replaced by serving.topology: "
                             "single (one process), collocated or separate")
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("serving.max_replicas must be >= serving.min_replicas")
        if self.canary_percent and self.deployment_mode != "Knative":
            raise ValueError("serving.canary_percent needs deployment_mode 'Knative' (KServe reads "
                             "canaryTrafficPercent only there); Standard mode rolls out with a smoke test and rollback")
        if self.payload_logging.url and self.payload_logging.mode != "all":
            raise ValueError("serving.payload_logging.mode must be 'all' when a url is set: the monitor's sink pairs "
                             "each request with its response, and one half alone records nothing")
        if self.min_replicas == 0 and self.deployment_mode != "Knative":
            raise ValueError("serving.min_replicas 0 (scale to zero) needs deployment_mode 'Knative'")
        return self


class DeploySpec(Strict):
    """What the deploy task receives: the env's serving section plus where the model is served."""

    serving: ServingSpec
    model_name: str = Field(description="the registered model's name, also the served model's name")
    image: str
    namespace: str
    env: str
    object_store_endpoint: str | None = None
    decision_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.5, description="P(positive) at or above which the transformer answers the positive label (evaluation's)")
