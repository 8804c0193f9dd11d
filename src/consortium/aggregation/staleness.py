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

**Buffer weights** (``server.async_weighting``, :func:`buffer_weight`): the sample weight
``wᵢ`` of an update in a buffer.

- ``examples`` (the default): ``wᵢ = nᵢ``, the client's training examples, as FedAvg;
- ``equal``: ``wᵢ = 1``, FedBuff's Algorithm 1 as written (``(1/K) Σᵢ s(τᵢ) Δᵢ``);
- ``time``: ``wᵢ = nᵢ · Tᵢ / T̄``, with ``Tᵢ`` the update's round trip (dispatch to arrival,
  which the server observes) and ``T̄`` the buffer's mean round trip. Derivation: when each
  client trains again as soon as it is done while online (FedBuff's production setting,
  Nguyen et al. 2022 and Huba et al., "Papaya", MLSys 2022: clients check in when
  eligible), client ``i``'s updates arrive at a rate ``λᵢ ∝ 1/Tᵢ``, so over a stretch of
  time the server moves by ``Σᵢ λᵢ wᵢ s(τᵢ) Δᵢ``; ``wᵢ ∝ nᵢ Tᵢ`` makes that
  ``∝ Σᵢ nᵢ s(τᵢ) Δᵢ``, FedAvg's weighting of the clients, where ``wᵢ = nᵢ`` would weight
  them by ``nᵢ / Tᵢ`` (with ``Tᵢ`` growing with ``nᵢ``, about equally: the unweighted mean
  of the clients' losses). That the faster clients' more frequent updates bias
  asynchronous FL ("heterogeneity amplification") is the analysis of Chang et al.,
  "Mitigating Participation Imbalance Bias in Asynchronous Federated Learning", 2025
  (arXiv:2511.19066); weighting by ``1/λᵢ`` is the inverse-frequency correction of that
  bias. When the server instead dispatches
  ``server.concurrency`` clients drawn uniformly among the idle ones, every client's
  updates arrive about equally often and ``time`` over-weights the slow clients (the
  benchmark measures both; RESULTS.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from consortium.aggregation.base import RoundContext, WrapsAggregator
from consortium.errors import ConfigError
from consortium.types import Update

__all__ = ["SCALE", "WEIGHTINGS", "Staleness", "StalenessWeighted", "buffer_weight",
           "buffer_weights", "check_weighting"]

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


WEIGHTINGS = ("examples", "equal", "time")
"""The values of ``server.async_weighting`` (see the module docstring)."""


def buffer_weight(kind: str, examples: float, duration: float, mean_duration: float) -> float:
    """The sample weight of one update in a buffer (see the module docstring).

    Args:
        kind: ``"examples"``, ``"equal"`` or ``"time"``.
        examples: the update's weight as sent (its client's training examples).
        duration: the update's round trip, dispatch to arrival (simulated seconds).
        mean_duration: the buffer's mean round trip (``> 0``).
    """
    if kind == "examples":
        return float(examples)
    if kind == "equal":
        return 1.0
    if kind == "time":
        if not mean_duration > 0 or duration < 0:
            raise ValueError(f"round trip {duration!r} s of a buffer whose mean is "
                             f"{mean_duration!r} s: durations must be >= 0 with a mean > 0")
        return float(examples) * float(duration) / float(mean_duration)
    raise ConfigError(f"server.async_weighting = {kind!r}: use one of {', '.join(WEIGHTINGS)}")


def buffer_weights(kind: str, examples: list[float], durations: list[float]) -> list[float]:
    """:func:`buffer_weight` of each update of a buffer (``T̄`` their mean round trip)."""
    if kind == "examples":
        return [float(n) for n in examples]
    mean = sum(durations) / len(durations) if durations else 0.0
    if kind == "time" and not mean > 0:  # every round trip 0: nothing to tell them apart
        return [float(n) for n in examples]
    return [buffer_weight(kind, n, d, mean) for n, d in zip(examples, durations)]


def check_weighting(cfg: Any, *, remote: bool = False) -> None:
    """Refuse ``server.async_weighting`` where the server cannot set an update's weight.

    Raises:
        ConfigError: over gRPC (built for the simulated clock in this version), under
            secure aggregation (the server sees only the buffer's sum, each update already
            multiplied by its client's own weight) or central DP (each update has weight 1,
            the noise is calibrated to that sum)."""
    kind = getattr(cfg.server, "async_weighting", "examples")
    if kind not in WEIGHTINGS:
        raise ConfigError(f"server.async_weighting = {kind!r}: use one of {', '.join(WEIGHTINGS)}")
    if kind == "examples":
        return
    if remote:
        raise ConfigError(
            f"server.async_weighting = {kind!r} over gRPC: built for the simulated clock "
            "(consortium run) in this version; use async_weighting = \"examples\"")
    if cfg.secure_aggregation.enabled:
        raise ConfigError(
            f"server.async_weighting = {kind!r} with secure aggregation: the server sees only "
            "each buffer's sum, whose terms the clients weighted themselves; use "
            "async_weighting = \"examples\"")
    if cfg.privacy.mode == "central":
        raise ConfigError(
            f"server.async_weighting = {kind!r} with central DP: every update has weight 1 so "
            "the noise covers the sum of clipped updates; a larger weight would break that "
            "bound; use async_weighting = \"examples\"")


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
