"""consortium: federated learning and federated analytics that run the same in simulation and deployment.

The public API is re-exported here and loaded on first use (PEP 562): ``import consortium``
loads neither torch nor grpc, ray or matplotlib, so the ``consortium`` command answers
``--help`` and ``--version`` at once; ``consortium.simulate`` (any name below) imports the
module that defines it, and with it torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    **dict.fromkeys(("Aggregate", "Pipeline", "Stage", "pipeline"), "consortium.aggregation.base"),
    "clip_by_l2_norm": "consortium.aggregation.clipping",
    "weighted_mean": "consortium.aggregation.mean",
    **dict.fromkeys(("adagrad", "adam", "avgm", "sgd", "yogi"), "consortium.aggregation.optimizers"),
    **dict.fromkeys(("FedAvg", "FedNova", "FedProx", "Scaffold", "build_algorithm"),
                    "consortium.algorithms"),
    **dict.fromkeys(("ExperimentConfig", "load_config"), "consortium.config"),
    **dict.fromkeys(("CheckpointError", "ClientError", "ConfigError", "ConsortiumError",
                     "DataError", "MissingExtraError", "ModelError", "PipelineError"),
                    "consortium.errors"),
    **dict.fromkeys(("EvaluationResult", "Result", "Task"), "consortium.messages"),
    "simulate_seeds": "consortium.seed_runs",
    "UniformSampler": "consortium.server.sampling",
    **dict.fromkeys(("SimulationResult", "simulate"), "consortium.simulation"),
    **dict.fromkeys(("Layout", "Parameters", "Update"), "consortium.types"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'consortium' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
