"""FedProx: FedAvg with a proximal term that keeps local models near the global one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from consortium.aggregation.base import Aggregate, RoundContext, StageState
from consortium.algorithms.base import TrainContext, local_update, split_like
from consortium.client.training import TrainHooks
from consortium.errors import ConfigError
from consortium.types import Layout, Update

__all__ = ["FedProx"]


@dataclass(frozen=True)
class FedProx:
    """Local objective ``F_k(w) + (mu/2)·‖w − w_global‖²``; with ``mu = 0`` it is FedAvg.

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

    def hooks(self, ctx: TrainContext) -> TrainHooks:
        params = list(ctx.module.parameters())
        # The local loop hands the penalty only the trainable tensors; match them one to one.
        anchors = [
            a.detach().clone()
            for a, p in zip(split_like(ctx.global_params.vector, params), params)
            if p.requires_grad
        ]
        mu = self.mu

        def penalty(params: Sequence[torch.Tensor]) -> torch.Tensor:
            total = torch.zeros(())
            for p, a in zip(params, anchors):
                total = total + ((p - a) ** 2).sum()
            return 0.5 * mu * total

        return TrainHooks(penalty=penalty if mu > 0 else None)

    def train(self, ctx: TrainContext) -> Update:
        r = local_update(ctx, self.hooks(ctx))
        return Update(
            ctx.client_id, r.delta, float(r.examples),
            metrics={"train_loss": r.mean_loss, "steps": float(r.steps)},
        )

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        return aggregate.delta, state
