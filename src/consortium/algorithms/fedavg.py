"""FedAvg: local SGD from the global model, sample-weighted averaging (McMahan et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from consortium.aggregation.base import Aggregate, RoundContext, StageState
from consortium.algorithms.base import TrainContext, local_update
from consortium.types import Layout, Update

__all__ = ["FedAvg"]


@dataclass(frozen=True)
class FedAvg:
    """Federated Averaging.

    McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of
    Deep Networks from Decentralized Data", AISTATS 2017.
    """

    name: str = "fedavg"

    def init_server(self, layout: Layout) -> StageState:
        return {}

    def make_payload(self, state: StageState) -> dict[str, torch.Tensor]:
        return {}

    def train(self, ctx: TrainContext) -> Update:
        r = local_update(ctx)
        return Update(
            ctx.client_id, r.delta, float(r.examples),
            metrics={"train_loss": r.mean_loss, "steps": float(r.steps)},
        )

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        return aggregate.delta, state
