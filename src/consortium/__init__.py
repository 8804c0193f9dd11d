"""consortium: federated learning and federated analytics that run the same in simulation and deployment.

The public API is re-exported here. Importing this package loads torch but not grpc, ray
or matplotlib; those load when a feature that needs them is used.
"""

from __future__ import annotations

from consortium.aggregation.base import Aggregate, Pipeline, Stage, pipeline
from consortium.aggregation.clipping import clip_by_l2_norm
from consortium.aggregation.mean import weighted_mean
from consortium.aggregation.optimizers import adagrad, adam, avgm, sgd, yogi
from consortium.algorithms import FedAvg, FedNova, FedProx, Scaffold, build_algorithm
from consortium.config import ExperimentConfig, load_config
from consortium.errors import (
    CheckpointError,
    ClientError,
    ConfigError,
    ConsortiumError,
    DataError,
    MissingExtraError,
    ModelError,
    PipelineError,
)
from consortium.messages import EvaluationResult, Result, Task
from consortium.seed_runs import simulate_seeds
from consortium.server.sampling import UniformSampler
from consortium.simulation import SimulationResult, simulate
from consortium.types import Layout, Parameters, Update

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "CheckpointError",
    "ClientError",
    "ConfigError",
    "ConsortiumError",
    "DataError",
    "EvaluationResult",
    "ExperimentConfig",
    "FedAvg",
    "FedNova",
    "FedProx",
    "Layout",
    "MissingExtraError",
    "ModelError",
    "Parameters",
    "Pipeline",
    "PipelineError",
    "Result",
    "Scaffold",
    "SimulationResult",
    "Stage",
    "Task",
    "UniformSampler",
    "Update",
    "__version__",
    "adagrad",
    "adam",
    "avgm",
    "build_algorithm",
    "clip_by_l2_norm",
    "load_config",
    "pipeline",
    "sgd",
    "simulate",
    "simulate_seeds",
    "weighted_mean",
    "yogi",
]
