"""Frozen parameters stay bit-identical at the server: the round's step never moves them.

A model's frozen parameters (``requires_grad = False``: ``[model] freeze``, or a factory that
freezes its own body) never train at a client, so every honest client sends exact zeros for
them. What the server does to the round's aggregate can still make those zeros non-zero:
central DP adds Gaussian noise to every coordinate of the sum (McMahan et al. 2018),
distributed DP's sites add discrete Gaussian noise to every coordinate before secure
aggregation (Kairouz, Liu, Steinke 2021), and secure aggregation's stochastic rounding maps a
zero to a level above or below it (Bonawitz et al. 2017) — so a frozen body would drift by the
noise every round. :func:`keep_frozen` wraps the server optimiser so that the frozen
coordinates of the step's delta are exactly zero and the frozen parameters come out of the
step bit for bit as they went in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from consortium.aggregation.base import ServerOptimizer, StageState
from consortium.errors import PipelineError
from consortium.models.zoo import statistics_names
from consortium.types import Layout

__all__ = ["KeepFrozen", "frozen_mask", "keep_frozen"]


def frozen_mask(module: torch.nn.Module, layout: Layout) -> torch.Tensor | None:
    """Where ``module``'s frozen parameters (``requires_grad = False``) sit in ``layout``'s
    flat vector: a bool vector of ``layout.size``, ``True`` at frozen coordinates; ``None``
    when every parameter trains.

    Batch-norm running statistics held as parameters
    (:func:`~consortium.models.zoo.statistics_names`) have ``requires_grad = False`` but are
    not frozen: local training moves them and the server averages them like any coordinate.

    Raises:
        PipelineError: ``layout`` names a tensor that is not a parameter of ``module``.
    """
    statistics = statistics_names(module)
    trains = {name: p.requires_grad or name in statistics for name, p in module.named_parameters()}
    missing = [spec.name for spec in layout.specs if spec.name not in trains]
    if missing:
        raise PipelineError(
            f"the layout names {missing[:5]}, which are not parameters of the model; build the "
            "layout from this model (Parameters.from_module)"
        )
    if all(trains[spec.name] for spec in layout.specs):
        return None
    return torch.cat([
        torch.full((spec.numel,), not trains[spec.name], dtype=torch.bool) for spec in layout.specs
    ])


@dataclass(frozen=True, eq=False)
class KeepFrozen:
    """A server optimiser whose step leaves frozen coordinates exactly as they were.

    The round's delta (after aggregation, every server half — central DP's noise, secure
    aggregation's decoding, distributed DP's scaling — and the algorithm's server step) gets
    exact zeros at the frozen coordinates before ``inner`` sees it, so ``inner``'s state
    (FedAdam's moments, FedAvgM's momentum) stays zero there too; the frozen coordinates of
    the new parameters are then copied from the old ones, so no arithmetic of ``inner``
    (``x + 0`` turns ``-0.0`` into ``+0.0``) can change a single bit of them. The name,
    the state and its checkpoint are ``inner``'s.

    Privacy: the mask is a fixed function of the released aggregate and of the model's
    definition (which parameters are frozen), not of any client's data, so by the
    post-processing property of differential privacy (Dwork & Roth, "The Algorithmic
    Foundations of Differential Privacy", 2014, Proposition 2.1) every central and
    distributed DP guarantee holds unchanged. It also means a site cannot move a frozen
    parameter by sending a non-zero delta for it.

    Attributes:
        inner: the server optimiser that makes the step (SGD, FedAvgM, FedAdam ...).
        frozen: bool vector of the layout's size, ``True`` at frozen coordinates
            (:func:`frozen_mask`).
    """

    inner: ServerOptimizer
    frozen: torch.Tensor

    @property
    def name(self) -> str:
        return self.inner.name

    def init(self, layout: Layout) -> StageState:
        if layout.size != self.frozen.numel():
            raise PipelineError(
                f"keep_frozen's mask has {self.frozen.numel()} coordinates but the model has "
                f"{layout.size}; build the mask from the same model (frozen_mask(module, layout))"
            )
        return self.inner.init(layout)

    def step(
        self, params: torch.Tensor, delta: torch.Tensor, state: StageState
    ) -> tuple[torch.Tensor, StageState]:
        kept = delta.masked_fill(self.frozen, 0.0)
        new_params, new_state = self.inner.step(params, kept, state)
        return torch.where(self.frozen, params, new_params), new_state


def keep_frozen(optimizer: ServerOptimizer, frozen: torch.Tensor) -> KeepFrozen:
    """``optimizer`` whose steps never move the coordinates ``frozen`` marks (see
    :class:`KeepFrozen`; post-processing, so DP guarantees are unaffected).

    Args:
        optimizer: the server optimiser to wrap.
        frozen: a 1-D bool tensor, ``True`` at the flat vector's frozen coordinates.

    Raises:
        PipelineError: ``frozen`` is not a 1-D bool tensor, or marks every coordinate (then
            nothing would train).
    """
    if not isinstance(frozen, torch.Tensor) or frozen.dtype != torch.bool or frozen.ndim != 1:
        found = f"{frozen.dtype} of shape {tuple(frozen.shape)}" if isinstance(
            frozen, torch.Tensor) else type(frozen).__name__
        raise PipelineError(
            f"keep_frozen needs a 1-D bool tensor (True at frozen coordinates), found {found}; "
            "use frozen_mask(module, layout)"
        )
    if bool(frozen.all()):
        raise PipelineError(
            "keep_frozen's mask freezes every coordinate, so nothing would train; leave at "
            "least the output layer trainable"
        )
    return KeepFrozen(optimizer, frozen.clone())
