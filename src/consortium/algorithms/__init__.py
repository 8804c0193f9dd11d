"""Federated optimisation algorithms, one module each; ``build_algorithm`` picks one by name."""

from __future__ import annotations

from consortium.algorithms.apfl import APFL
from consortium.algorithms.base import Algorithm, TrainContext, local_update
from consortium.algorithms.ditto import Ditto
from consortium.algorithms.fedavg import FedAvg
from consortium.algorithms.fedbn import FedBN
from consortium.algorithms.fednova import FedNova
from consortium.algorithms.fedprox import FedProx
from consortium.algorithms.ifca import IFCA
from consortium.algorithms.personal import FedPer, FedRep, PersonalLayers
from consortium.algorithms.qffl import QFedAvg
from consortium.algorithms.scaffold import Scaffold
from consortium.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "APFL",
    "IFCA",
    "Algorithm",
    "Ditto",
    "FedAvg",
    "FedBN",
    "FedNova",
    "FedPer",
    "FedProx",
    "FedRep",
    "PersonalLayers",
    "QFedAvg",
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
    "fedper": "shared body, personal head trained jointly (Arivazhagan et al. 2019)",
    "fedrep": "shared representation, personal head; head then body each round (Collins et al. 2021)",
    "ditto": "FedAvg + a personal model per client, proximal to the global one (Li et al. 2021)",
    "apfl": "personal model mixed with the global one by a learned weight (Deng et al. 2020)",
    "qffl": "q-FedAvg: fair allocation, clients weighted up by loss^q (Li et al. 2020)",
    "fedbn": "FedAvg, each client's batch-norm layers kept local (Li et al. 2021); mlp_bn, cnn_bn",
    "ifca": "clustered FL: k models, each client trains the one with its lowest loss (Ghosh et al. 2020)",
}


def build_algorithm(
    name: str, *, mu: float = 0.01, local_layers: tuple[str, ...] = (), local_count: int = 0,
    head_epochs: int = 1, q: float = 1.0, ditto_lambda: float = 0.1, personal_steps: int = 0,
    apfl_alpha: float = 0.25, clusters: int = 2,
) -> Algorithm:
    """The algorithm called ``name`` (see :data:`ALGORITHMS`).

    ``local_layers`` / ``local_count`` (``[personalization]``) name the personal layers of
    ``fedper`` and ``fedrep`` (default: the final layer); ``head_epochs`` is FedRep's;
    ``ditto_lambda`` and ``personal_steps`` are Ditto's, ``apfl_alpha`` APFL's initial mixing
    weight, ``q`` q-FFL's exponent, ``clusters`` IFCA's number of cluster models.

    Raises:
        ConfigError: an unknown name, or personal layers given to an algorithm that shares
            every parameter.
    """
    personal = PersonalLayers(tuple(local_layers), local_count)
    if name == "fedper":
        return FedPer(personal)
    if name == "fedrep":
        return FedRep(personal, head_epochs=head_epochs)
    if local_layers or local_count:
        raise ConfigError(
            f"personalization.local_layers/local_count are set, but algorithm.name = {name!r} "
            "does not take them (fedbn keeps exactly the batch-norm layers; the others share "
            'every parameter); use algorithm.name = "fedper" or "fedrep"'
        )
    if name == "fedavg":
        return FedAvg()
    if name == "fedbn":
        return FedBN()
    if name == "ditto":
        return Ditto(lam=ditto_lambda, personal_steps=personal_steps)
    if name == "apfl":
        return APFL(alpha=apfl_alpha)
    if name == "ifca":
        return IFCA(clusters=clusters)
    if name == "qffl":
        return QFedAvg(q=q)
    if name == "fedprox":
        return FedProx(mu=mu)
    if name == "scaffold":
        return Scaffold()
    if name == "fednova":
        return FedNova()
    raise ConfigError(f"algorithm.name = {name!r} is not known; expected one of {', '.join(ALGORITHMS)}")
