"""Staleness weights for asynchronous aggregation, and the aggregator wrapper that applies them.

An update trained from server version ``v₀`` that arrives when the server is at version ``v``
has staleness ``τ = v − v₀``. Xie et al. ("Asynchronous Federated Optimization", 2019, §5.2)
weight it by ``s(τ)``:

- ``constant``: ``s(τ) = 1``;
- ``polynomial``: ``s(τ) = (1 + τ)^−a`` (FedBuff uses ``a = 0.5``: Nguyen et al., "Federated
  Learning with Buffered Asynchronous Aggregation", AISTATS 2022);
- ``hinge``: ``s(τ) = 1`` for ``τ ≤ b``, else ``1 / (a (τ − b) + 1)``.

:class:`StalenessWeighted` multiplies each update's (decoded) delta by its weight before the
wrapped aggregator sees it, so FedBuff's step is ``Σᵢ wᵢ s(τᵢ) Δᵢ / Σᵢ wᵢ`` with the mean
(``wᵢ`` the sample weight, as FedAvg weights: with equal weights this is the paper's
``(1/K) Σᵢ s(τᵢ) Δᵢ``), and a robust rule combines the weighted deltas. The weight travels in
the update's metrics under :data:`SCALE` (set by the server, never by a client); extras (an
algorithm's sums, central DP's clipping bit) are not scaled. ``s(τ) ≤ 1``, so a clipped
update stays within its clip norm and central DP's sensitivity holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from consortium.aggregation.base import RoundContext, WrapsAggregator
from consortium.errors import ConfigError
from consortium.types import Update

__all__ = ["SCALE", "Staleness", "StalenessWeighted"]

SCALE = "staleness_weight"
"""The metrics key under which the server puts an update's ``s(τ)``."""


@dataclass(frozen=True)
class Staleness:
    """A staleness function ``s(τ)`` (see the module docstring)."""

    kind: str = "polynomial"
    a: float = 0.5
    b: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("polynomial", "constant", "hinge"):
            raise ConfigError(
                f"server.staleness = {self.kind!r} is not a staleness function: use "
                "\"polynomial\", \"constant\" or \"hinge\"")
        if self.a < 0 or self.b < 0:
            raise ConfigError(
                f"server.staleness_a = {self.a!r} and staleness_b = {self.b!r} must be >= 0")

    def __call__(self, tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness {tau} < 0: an update cannot come from a future version")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + tau) ** -self.a)
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)


def _scaled(u: Update) -> Update:
    s = u.metrics.get(SCALE)
    if s is None or s == 1.0:
        return u
    return dataclasses.replace(u, delta=u.delta * float(s))


class StalenessWeighted(WrapsAggregator):
    """``inner`` fed each update's delta times its staleness weight (streaming when ``inner``
    streams, buffered otherwise; stateful when ``inner`` is)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.linear = bool(getattr(inner, "linear", False))
        if hasattr(inner, "accumulate"):  # keep a streaming aggregator streaming
            self.start = inner.start
            self.finalize = inner.finalize
            self.accumulate = lambda acc, u: inner.accumulate(acc, _scaled(u))
        else:
            self.aggregate = self._aggregate
        if hasattr(inner, "init"):
            self.init = inner.init
        self.stateful = self.inner_stateful

    @property
    def name(self) -> str:
        return f"staleness({self.inner.name})"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset(self.inner.needs)

    def _aggregate(self, updates: list[Update], *, ctx: RoundContext,
                   state: Any = None) -> Any:
        scaled = [_scaled(u) for u in updates]
        if self.stateful:
            return self.inner.aggregate(scaled, ctx=ctx, state=state)
        return self.inner.aggregate(scaled, ctx=ctx)
