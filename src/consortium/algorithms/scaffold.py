"""SCAFFOLD: control variates that correct client drift (option II)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from consortium.aggregation.base import Aggregate, RoundContext, StageState
from consortium.algorithms.base import TrainContext, local_update, split_like
from consortium.client.training import LocalTraining, TrainHooks
from consortium.errors import ConfigError
from consortium.types import Layout, Update

__all__ = ["Scaffold"]

_DC = "scaffold.delta_c"


@dataclass(frozen=True)
class Scaffold:
    """Stochastic Controlled Averaging.

    Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled
    Averaging for Federated Learning", ICML 2020, Algorithm 1 with option II:

    - local step uses ``g − c_i + c``;
    - ``c_i⁺ = c_i − c + (x − y_i) / (K η_l)`` with K the steps taken and η_l the local lr;
    - the client sends ``Δy_i`` and ``Δc_i = c_i⁺ − c_i``;
    - server: ``x ← x + η_g · mean(Δy)`` (our mean is sample-weighted, as in FedAvg) and
      ``c ← c + (1/N) Σ_{i∈S} Δc_i`` with N the number of clients in the federation.

    Option II assumes plain local SGD; with momentum the control variates are an approximation.
    """

    name: str = "scaffold"

    def init_server(self, layout: Layout) -> StageState:
        return {"c": torch.zeros(layout.size)}

    def make_payload(self, state: StageState) -> dict[str, torch.Tensor]:
        return {"c": state["c"]}

    def check_settings(self, settings: LocalTraining) -> None:
        """Raise :class:`ConfigError` unless the local optimiser is plain SGD (momentum allowed)."""
        if settings.optimizer != "sgd":
            raise ConfigError(
                f"SCAFFOLD needs local optimizer 'sgd' (its control variates assume SGD steps); found "
                f'{settings.optimizer!r}. Set algorithm.optimizer = "sgd"'
            )

    def train(self, ctx: TrainContext) -> Update:
        self.check_settings(ctx.settings)
        c = ctx.payload["c"]
        c_i = ctx.client_state.get("c_i", torch.zeros_like(c))
        correction = c - c_i
        params = list(ctx.module.parameters())
        # The local loop hands the hook only the trainable tensors' gradients; match them.
        parts = [k for k, p in zip(split_like(correction, params), params) if p.requires_grad]

        def correct(grads: Sequence[torch.Tensor | None]) -> None:
            for g, k in zip(grads, parts):
                if g is not None:  # a parameter the loss does not reach has no gradient
                    g.add_(k)

        r = local_update(ctx, TrainHooks(correct_grad=correct))
        c_i_new = c_i - c - r.delta / (r.steps * ctx.settings.lr)
        ctx.client_state["c_i"] = c_i_new
        return Update(
            ctx.client_id,
            r.delta,
            float(r.examples),
            metrics={"train_loss": r.mean_loss, "steps": float(r.steps)},
            extras={_DC: c_i_new - c_i},
        )

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        c = state["c"] + aggregate.extras[_DC] / ctx.population
        return aggregate.delta, {"c": c}
