"""Federated optimisation algorithms, one module each; ``build_algorithm`` picks one by name."""

from __future__ import annotations

from consortium.algorithms.base import Algorithm, TrainContext, local_update
from consortium.algorithms.fedavg import FedAvg
from consortium.algorithms.fednova import FedNova
from consortium.algorithms.fedprox import FedProx
from consortium.algorithms.scaffold import Scaffold
from consortium.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "FedAvg",
    "FedNova",
    "FedProx",
    "Scaffold",
    "TrainContext",
    "build_algorithm",
    "local_update",
]

ALGORITHMS = {
    "fedavg": "Federated Averaging (McMahan et al. 2017)",
    "fedprox": "FedAvg + proximal term mu (Li et al. 2020)",
    "scaffold": "control variates against client drift, option II (Karimireddy et al. 2020)",
    "fednova": "normalised averaging for unequal local steps (Wang et al. 2020)",
}


def build_algorithm(name: str, *, mu: float = 0.01) -> Algorithm:
    """The algorithm called ``name`` (see :data:`ALGORITHMS`)."""
    if name == "fedavg":
        return FedAvg()
    if name == "fedprox":
        return FedProx(mu=mu)
    if name == "scaffold":
        return Scaffold()
    if name == "fednova":
        return FedNova()
    raise ConfigError(f"algorithm.name = {name!r} is not known; expected one of {', '.join(ALGORITHMS)}")
