"""SCAFFOLD: control variates that correct client drift (option II)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from consortium.aggregation.base import Aggregate, ExtraSpec, RoundContext, StageState
from consortium.algorithms.base import LocalResult, TrainContext, train_with
from consortium.client.training import LocalTerms, LocalTraining
from consortium.errors import ConfigError
from consortium.types import Layout, Update

__all__ = ["Scaffold"]

_DC = "scaffold.delta_c"
SECURE_BOUND = 10.0
"""Default per-coordinate range of ``c_i⁺ − c_i`` under secure aggregation."""


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

    def secure_bounds(self, settings: LocalTraining, weight_bound: float) -> dict[str, float]:
        """Secure aggregation's range for the control-variate change ``c_i⁺ − c_i`` (a change of
        mean gradients): ``SECURE_BOUND`` per coordinate; larger values are clipped and counted
        in ``secagg_clipped`` (set ``secure_aggregation.extras_bound`` to widen it)."""
        return {_DC: SECURE_BOUND}

    def expected_extras(
        self, layout: Layout, settings: LocalTraining, max_weight: float
    ) -> dict[str, ExtraSpec]:
        """The control-variate change ``c_i⁺ − c_i``: one value per parameter. A change of
        mean gradients has no bound of its own; the server's absurd-magnitude cap applies."""
        return {_DC: ExtraSpec((layout.size,))}

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        c = ctx.payload["c"]
        c_i = ctx.client_state.get("c_i")
        return LocalTerms(offset=c - c_i if c_i is not None else c.clone())

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        c = ctx.payload["c"]
        c_i = ctx.client_state.get("c_i", torch.zeros_like(c))
        c_i_new = c_i - c - result.delta / (result.steps * ctx.settings.lr)
        ctx.client_state["c_i"] = c_i_new
        return Update(
            ctx.client_id, result.delta, float(result.examples),
            metrics={"train_loss": result.mean_loss, "steps": float(result.steps)},
            extras={_DC: c_i_new - c_i},
        )

    def train(self, ctx: TrainContext) -> Update:
        return train_with(self, ctx)

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        c = state["c"] + aggregate.extras[_DC] / ctx.population
        return aggregate.delta, {"c": c}
