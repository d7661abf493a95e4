"""Layer 1, the typed contracts a stage receives: pydantic models, no KFP, no torch.

Environments (`pipelines.config`) are composed of these; plain stage functions take them; KFP
ops re-validate the dicts they receive into them at the boundary.
"""
from specs.base import Strict
from specs.cron import check_cron
from specs.data import DatasetSpec, DistributionShift, Features
from specs.evaluation import EvaluationSpec, Thresholds, TrackingSpec
from specs.fleet import AuthSpec, ClusterSpec, FleetSpec, GpuPool, QueueSpec
from specs.monitoring import MonitoringSpec, RetrainingSpec, SinkSpec
from specs.quantity import Cpu, Memory
from specs.serving import DeploySpec, PayloadLogging, ServingSpec
from specs.training import Elastic, Gpu, Hyperparameters, Resources, Toleration, TrainingSpec, TrainSpec
from specs.tuning import TuningSpec

__all__ = [
    "AuthSpec", "ClusterSpec", "Cpu", "DatasetSpec", "DeploySpec", "DistributionShift", "Elastic",
    "EvaluationSpec", "Features", "FleetSpec", "Gpu", "GpuPool", "Hyperparameters", "Memory",
    "MonitoringSpec", "PayloadLogging", "QueueSpec", "Resources", "RetrainingSpec", "ServingSpec", "SinkSpec",
    "Strict", "Thresholds", "Toleration", "TrackingSpec", "TrainSpec", "TrainingSpec", "TuningSpec",
    "check_cron",
]
