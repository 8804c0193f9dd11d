"""FedProx: FedAvg with a proximal term that keeps local models near the global one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from consortium.aggregation.base import Aggregate, ExtraSpec, RoundContext, StageState
from consortium.algorithms.base import LocalResult, TrainContext, train_with
from consortium.algorithms.fedavg import plain_update
from consortium.client.training import LocalTerms, LocalTraining
from consortium.errors import ConfigError
from consortium.types import Layout, Update

__all__ = ["FedProx"]


@dataclass(frozen=True)
class FedProx:
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

    def init_server(self, layout: Layout) -> StageState:
        return {}

    def make_payload(self, state: StageState) -> dict[str, torch.Tensor]:
        return {}

    def check_settings(self, settings: LocalTraining) -> None:
        pass

    def expected_extras(
        self, layout: Layout, settings: LocalTraining, max_weight: float
    ) -> dict[str, ExtraSpec]:
        """None: the update is the delta and the weight."""
        return {}

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        if self.mu == 0:
            return LocalTerms()
        return LocalTerms(prox_mu=self.mu, anchor=ctx.global_params.vector)

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        return plain_update(ctx, result)

    def train(self, ctx: TrainContext) -> Update:
        return train_with(self, ctx)

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        return aggregate.delta, state
