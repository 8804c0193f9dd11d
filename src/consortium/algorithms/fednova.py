"""FedNova: normalised averaging that removes the bias of unequal local steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from consortium.aggregation.base import Aggregate, ExtraSpec, RoundContext, StageState
from consortium.algorithms.base import LocalResult, TrainContext, train_with
from consortium.client.training import LocalTerms, LocalTraining, planned_steps
from consortium.errors import ConfigError
from consortium.types import Layout, Update

__all__ = ["FedNova", "normalising_factor"]

_A = "fednova.weighted_a"


def normalising_factor(steps: int, momentum: float) -> float:
    """``a_i`` for ``steps`` local SGD steps with momentum ρ (Wang et al. 2020, §4):
    ``a = τ`` for plain SGD, ``a = [τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ)`` with momentum."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


@dataclass(frozen=True)
class FedNova:
    """Federated Normalised Averaging.

    Wang, Liu, Liang, Joshi, Poor. "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", NeurIPS 2020. Client i sends ``d_i = Δ_i / a_i``;
    the server steps by ``τ_eff · Σ p_i d_i`` with ``τ_eff = Σ p_i a_i`` and ``p_i = n_i / n``.
    With equal ``a_i`` this is FedAvg.
    """

    name: str = "fednova"

    def init_server(self, layout: Layout) -> StageState:
        return {}

    def make_payload(self, state: StageState) -> dict[str, torch.Tensor]:
        return {}

    def check_settings(self, settings: LocalTraining) -> None:
        """Raise :class:`ConfigError` unless the local optimiser is plain SGD (momentum allowed)."""
        if settings.optimizer != "sgd":
            raise ConfigError(
                f"FedNova needs local optimizer 'sgd' (its normalisation is defined for local SGD, with or without momentum); found "
                f'{settings.optimizer!r}. Set algorithm.optimizer = "sgd"'
            )

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        return LocalTerms()

    def secure_bounds(self, settings: LocalTraining, weight_bound: float) -> dict[str, float]:
        """The largest ``w·a`` of one client, for secure aggregation's quantisation range:
        ``weight_bound`` examples doing their planned local steps."""
        steps = planned_steps(max(1, math.ceil(weight_bound)), settings)
        return {_A: weight_bound * normalising_factor(steps, settings.momentum)}

    def expected_extras(
        self, layout: Layout, settings: LocalTraining, max_weight: float
    ) -> dict[str, ExtraSpec]:
        """``w·a``, one value in ``[0, w·a_max]``: ``a`` grows with the local steps, and a
        client with at most ``max_weight`` examples plans at most
        ``planned_steps(max_weight)`` of them. Bounded per unit of weight because
        ``τ_eff = Σ wᵢaᵢ / Σ wᵢ`` scales the whole step: a site sending weight 1 with a large
        ``w·a`` would otherwise multiply the round's step at will."""
        steps = planned_steps(max(1, math.ceil(max_weight)), settings)
        return {_A: ExtraSpec((1,), low=0.0, high=normalising_factor(steps, settings.momentum),
                              per_weight=True)}

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        a = normalising_factor(result.steps, ctx.settings.momentum)
        weight = float(result.examples)
        return Update(
            ctx.client_id, result.delta / a, weight,
            metrics={"train_loss": result.mean_loss, "steps": float(result.steps)},
            extras={_A: torch.tensor([weight * a])},
        )

    def train(self, ctx: TrainContext) -> Update:
        return train_with(self, ctx)

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        if not aggregate.weight > 0:  # e.g. FLTrust trusted no client: nothing to step by
            return torch.zeros_like(aggregate.delta), state
        tau_eff = float(aggregate.extras[_A][0]) / aggregate.weight
        return tau_eff * aggregate.delta, state
