"""FedAvg: local SGD from the global model, sample-weighted averaging (McMahan et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from consortium.aggregation.base import Aggregate, ExtraSpec, RoundContext, StageState
from consortium.algorithms.base import LocalResult, TrainContext, train_with
from consortium.client.training import LocalTerms, LocalTraining
from consortium.types import Layout, Update

__all__ = ["FedAvg", "plain_update"]


def plain_update(ctx: TrainContext, result: LocalResult) -> Update:
    """The update FedAvg sends: the delta, weighted by the number of training examples."""
    return Update(
        ctx.client_id, result.delta, float(result.examples),
        metrics={"train_loss": result.mean_loss, "steps": float(result.steps)},
    )


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

    def check_settings(self, settings: LocalTraining) -> None:
        pass

    def expected_extras(
        self, layout: Layout, settings: LocalTraining, max_weight: float
    ) -> dict[str, ExtraSpec]:
        """None: the update is the delta and the weight."""
        return {}

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        return LocalTerms()

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        return plain_update(ctx, result)

    def train(self, ctx: TrainContext) -> Update:
        return train_with(self, ctx)

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        return aggregate.delta, state
