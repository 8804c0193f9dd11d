"""FedProx: FedAvg with a proximal term that keeps local models near the global one."""

from __future__ import annotations

from dataclasses import dataclass

from consortium.algorithms.base import LocalResult, PlainServer, TrainContext
from consortium.algorithms.fedavg import plain_update
from consortium.client.training import LocalTerms
from consortium.errors import ConfigError
from consortium.types import Update

__all__ = ["FedProx"]


@dataclass(frozen=True)
class FedProx(PlainServer):
    """Local objective ``F_k(w) + (mu/2)·‖w − w_global‖²``; with ``mu = 0`` it is FedAvg.

    The proximal term enters as its gradient ``mu·(w − w_global)``, added to each local
    gradient; ``train_loss`` reports ``F_k`` alone.

    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous
    Networks", MLSys 2020.
    """

    mu: float = 0.01
    name: str = "fedprox"

    def __post_init__(self) -> None:
        if not self.mu >= 0:
            raise ConfigError(f"algorithm.mu = {self.mu!r} is not allowed; expected a number >= 0")

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        if self.mu == 0:
            return LocalTerms()
        return LocalTerms(prox_mu=self.mu, anchor=ctx.global_params.vector)

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        return plain_update(ctx, result)
