"""FedAvg: local SGD from the global model, sample-weighted averaging (McMahan et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass

from consortium.algorithms.base import LocalResult, PlainServer, TrainContext
from consortium.client.training import LocalTerms
from consortium.types import Update

__all__ = ["FedAvg", "plain_update"]


def plain_update(ctx: TrainContext, result: LocalResult) -> Update:
    """The update FedAvg sends: the delta, weighted by the number of training examples."""
    return Update(
        ctx.client_id, result.delta, float(result.examples),
        metrics={"train_loss": result.mean_loss, "steps": float(result.steps)},
    )


@dataclass(frozen=True)
class FedAvg(PlainServer):
    """Federated Averaging.

    McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of
    Deep Networks from Decentralized Data", AISTATS 2017.
    """

    name: str = "fedavg"

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        return LocalTerms()

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        return plain_update(ctx, result)
