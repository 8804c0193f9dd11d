"""The weighted mean of updates (FedAvg's aggregation rule), streaming in constant memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from consortium.aggregation.base import Aggregate
from consortium.errors import PipelineError
from consortium.types import Layout, Update

__all__ = ["weighted_mean"]


@dataclass
class _MeanAccumulator:
    total: torch.Tensor
    weight: float
    count: int
    extras: dict[str, torch.Tensor]


@dataclass(frozen=True)
class WeightedMean:
    """``Σ wᵢ Δᵢ / Σ wᵢ`` (McMahan et al. 2017), summed in float64 to keep order effects tiny.

    Extras are summed, not averaged (see :class:`consortium.types.Update`).
    """

    name: str = "weighted_mean"
    needs: frozenset[str] = frozenset()
    linear: bool = True  # delta × weight is Σ wᵢ Δᵢ: central DP may add its noise to it

    def start(self, layout: Layout) -> _MeanAccumulator:
        return _MeanAccumulator(torch.zeros(layout.size, dtype=torch.float64), 0.0, 0, {})

    def accumulate(self, acc: _MeanAccumulator, update: Update) -> _MeanAccumulator:
        if not update.weight >= 0:
            raise PipelineError(
                f"client {update.client_id!r} sent weight {update.weight}; weights must be >= 0"
            )
        if update.delta.numel() != acc.total.numel():
            raise PipelineError(
                f"client {update.client_id!r} sent {update.delta.numel()} values, expected "
                f"{acc.total.numel()}; is it training the same model?"
            )
        acc.total.add_(update.delta.to(torch.float64), alpha=update.weight)
        acc.weight += update.weight
        acc.count += 1
        for k, v in update.extras.items():
            v64 = v.to(torch.float64)
            acc.extras[k] = acc.extras[k] + v64 if k in acc.extras else v64.clone()
        return acc

    def finalize(self, acc: _MeanAccumulator) -> Aggregate:
        if acc.weight <= 0:
            raise PipelineError("the total weight of the round's updates is 0; nothing to average")
        delta = (acc.total / acc.weight).to(torch.float32)
        extras = {k: v.to(torch.float32) for k, v in acc.extras.items()}
        return Aggregate(delta=delta, weight=acc.weight, count=acc.count, extras=extras)


def weighted_mean() -> WeightedMean:
    """Aggregate by the sample-weighted mean of the deltas (FedAvg, McMahan et al. 2017)."""
    return WeightedMean()
