"""A fake Kubernetes API server, held to the real contract; what gateways/kube_api.py (`KubeApi`)
talks to in tests, over real HTTP, given the fake's `configuration()`.

It stands in only for what cannot run here (a cluster with the Training Operator, Kubeflow Trainer
and KServe) and is put together from one file per concern:

    kube_core.py               the HTTP server, routes, recorded requests, `Status` bodies, the CRD
                               schemas read on their own (unknown fields, pruning), pods and logs
    kube_operators.py          `JobScript`: what a test scripts the training operators to do
    kube_pytorchjobs.py        PyTorchJobs and the Training Operator's pods
    kube_trainjobs.py          TrainJobs and JobSet's node pods
    kube_inferenceservices.py  InferenceServices (validation, webhook, patches), Deployments
    kube_isvc_controllers.py   the KServe/Knative controllers' part, scripted (`IsvcScript`)
    kube_virtualservices.py    Istio VirtualServices (the shadow route)
    json_patch.py              JSON merge patch and JSON patch

`FakeKubernetesApi` serves the training jobs (fixture `fake_k8s`); `FakeKServeApi` serves all of
that plus InferenceServices, Deployments and VirtualServices (fixture `fake_kserve`).
"""
from __future__ import annotations

import pytest

from tests.fakes.kube_inferenceservices import InferenceServices
from tests.fakes.kube_pytorchjobs import PyTorchJobs
from tests.fakes.kube_trainjobs import TrainJobs
from tests.fakes.kube_virtualservices import VirtualServices


class FakeKubernetesApi(TrainJobs, PyTorchJobs):
    """PyTorchJobs, TrainJobs and their pods, on a free loopback port once `start()`ed."""


class FakeKServeApi(VirtualServices, InferenceServices, FakeKubernetesApi):
    """InferenceServices and their Deployments, Istio VirtualServices, and all FakeKubernetesApi serves."""


@pytest.fixture
def fake_k8s():
    """A started FakeKubernetesApi on a free loopback port; stopped after the test."""
    api = FakeKubernetesApi().start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def fake_kserve():
    """A started FakeKServeApi (InferenceServices, Deployments, VirtualServices, and all FakeKubernetesApi serves)."""
    api = FakeKServeApi().start()
    try:
        yield api
    finally:
        api.stop()
