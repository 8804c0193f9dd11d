"""The update norm bound: no client moves the model further than a multiple of the round's median update norm.

Why a server needs it even with honest-looking sites: FedAvg's mean lets one update of
unbounded norm take the model wherever its sender wants in one round (Bagdasaryan et al.,
"How To Backdoor Federated Learning", AISTATS 2020: model replacement; a ×4 scaled update
did it in issue 13's review). Capping each update's norm is the classic defence (Sun et al.,
"Can You Really Backdoor Federated Learning?", 2019); FLAME (Nguyen et al., USENIX Security
2022) makes the cap adaptive by clipping to the round's median norm. This stage keeps FLAME's
median but allows a *multiple* of it, so that honest heterogeneity (sites with more data or
more skewed labels take longer steps) is left alone while an update many times longer than a
typical one is scaled down.

Choosing the default multiple (``DEFAULT_MULTIPLIER = 3.0``): ``benchmarks/update_bound.py``
records every honest update's norm over the median of its round (FedAvg, 30 rounds, no
attacker) and counts the share a bound of 2, 3 or 4 times the median would have scaled down:

==========================================  ======  ======  ======  =========
honest run                                    ×2      ×3      ×4    max ratio
==========================================  ======  ======  ======  =========
heart-disease, 4 hospitals (120 updates)     4.2 %    0       0       2.15
digits, dirichlet α=0.5, 10 clients (300)    3.3 %    0       0       2.28
breast-cancer, quantity σ=1, 10 clients      6.0 %   0.67 %  0.33 %   6.25
synthetic(1, 1), 10 clients (300)            7.0 %    0       0       2.91
==========================================  ======  ======  ======  =========

×2 clips honest sites every few rounds in every setting; ×3 touched two honest updates in
1,020 (a site holding far more data than the median in the quantity-skewed partition), while
an attacker is held to three typical updates; ×4 spares one of the two but lets an attacker
go a third further. Rounds that clip nothing are bit-identical to rounds without the bound.

The stage needs every update of the round before the first is folded (the median needs all the
norms): it is a buffered aggregator that wraps the configured one. In a deployment this costs
no memory: the remote executor's futures already hold every result of the round until the
round ends, so the wrapper adds only references (and one scaled copy per clipped update).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from consortium.aggregation.base import (
    SUM_ONLY,
    Aggregate,
    Aggregator,
    RoundContext,
    StageState,
    WrapsAggregator,
)
from consortium.errors import ConfigError
from consortium.types import Layout, Update

__all__ = ["DEFAULT_MULTIPLIER", "BoundedUpdates", "bound_updates", "check_multiplier"]

DEFAULT_MULTIPLIER = 3.0
"""What ``consortium server`` uses when ``aggregation.update_bound`` is 0 (see the module
docstring for the measurement behind it)."""



def check_multiplier(multiplier: object, *, where: str = "aggregation.update_bound") -> float:
    """``multiplier`` as a float ≥ 0 (0: off), or a :class:`ConfigError` naming the fix."""
    ok = isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool)
    x = float(multiplier) if ok else math.nan  # type: ignore[arg-type]
    if not (x >= 0 and math.isfinite(x)):
        raise ConfigError(
            f"{where} = {multiplier!r} is not allowed: expected a finite number >= 0, the "
            "multiple of the round's median update norm that bounds each update (e.g. 3.0; "
            "0 leaves it to where the run happens: off in a simulation, "
            f"{DEFAULT_MULTIPLIER:g} in `consortium server`)"
        )
    return x


def update_norm(delta: torch.Tensor) -> float:
    """‖Δ‖₂ accumulated in float64 (no overflow for float32 values); inf or NaN when a value
    is. Not ``torch.linalg.vector_norm(x, dtype=float64)``, which casts the whole input to a
    float64 copy first (2 MB per 1 MB update, left as heap fragments between a round's held
    updates): ``numpy.einsum`` accumulates in float64 through a small buffer."""
    flat = delta.detach().reshape(-1)
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64, torch.float16):
        return float(torch.linalg.vector_norm(flat, dtype=torch.float64))
    a = flat.contiguous().numpy()
    return math.sqrt(float(np.einsum("i,i->", a, a, dtype=np.float64)))


@dataclasses.dataclass(frozen=True)
class BoundedUpdates(WrapsAggregator):
    """Scale every update's delta to norm at most ``multiplier × median(‖Δᵢ‖)``, then aggregate.

    ``inner`` is any aggregator (the weighted mean, a robust rule, a stateful one): it receives
    the round's updates with only the deltas of the updates above the bound replaced by
    ``Δᵢ · B / ‖Δᵢ‖`` (weights, extras and metrics kept; updates within the bound are passed
    as the very same objects, so an honest round is bit-identical to one without the bound).
    A convex combination of vectors of norm ≤ B has norm ≤ B, so with the weighted mean the
    round's aggregate delta is within ``B`` however much weight a site claims.

    An update with a NaN or infinite value has no norm to scale: it is left out of the round
    (a deployment's validation rejects it before it gets here). The median is over the other
    updates, so it is an honest norm whenever honest updates are the majority of the round; a
    round of one or two updates gives an attacker the median itself (no protection there).

    Info: ``update_bound`` (B), and when something was clipped or dropped
    ``update_bound_clipped`` ({client: factor}) and ``update_bound_dropped`` ([clients]).
    """

    inner: Aggregator
    multiplier: float = DEFAULT_MULTIPLIER

    @property
    def name(self) -> str:
        return f"update_bound({self.multiplier:g}×median) → {self.inner.name}"

    @property
    def stateful(self) -> bool:
        """Whether the wrapped rule keeps state across rounds (centered clipping)."""
        return self.inner_stateful

    def init(self, layout: Layout) -> StageState:
        inner: Any = self.inner
        return inner.init(layout) if self.stateful else {}

    def bound(self, updates: Iterable[Update]) -> tuple[list[Update], dict[str, Any]]:
        """The updates with every delta scaled to norm ≤ B, and the info record."""
        updates = list(updates)
        sizes = [update_norm(u.delta) for u in updates]
        finite = [s for s in sizes if math.isfinite(s)]
        limit = self.multiplier * statistics.median(finite) if finite else 0.0
        kept: list[Update] = []
        clipped: dict[str, float] = {}
        dropped: list[str] = []
        for u, size in zip(updates, sizes):
            if not math.isfinite(size):
                dropped.append(u.client_id)
            elif size > limit:
                factor = limit / size
                # in float64, so that a factor near float32's smallest normal (a delta of
                # 3e38) does not lose precision
                delta = (u.delta.to(torch.float64) * factor).to(u.delta.dtype)
                kept.append(dataclasses.replace(u, delta=delta))
                clipped[u.client_id] = float(f"{factor:.4g}")
            else:
                kept.append(u)
        info: dict[str, Any] = {"update_bound": limit}
        if clipped:
            info["update_bound_clipped"] = clipped
        if dropped:
            info["update_bound_dropped"] = sorted(dropped)
        return kept, info

    def aggregate(
        self, updates: list[Update], *, ctx: RoundContext, state: StageState | None = None
    ) -> Any:
        """The inner aggregate of the bounded updates; ``(aggregate, state)`` when the inner
        rule is stateful (``state`` is then its state)."""
        bounded, info = self.bound(updates)
        inner: Any = self.inner
        new_state = None
        agg: Aggregate
        if self.stateful:
            agg, new_state = inner.aggregate(bounded, ctx=ctx, state=state)
        elif hasattr(inner, "aggregate"):
            agg = inner.aggregate(bounded, ctx=ctx)
        else:
            acc = inner.start(ctx.layout)
            for u in bounded:
                acc = inner.accumulate(acc, u)
            agg = inner.finalize(acc)
        agg.info = {**agg.info, **info}
        return (agg, new_state) if self.stateful else agg


def bound_updates(aggregator: Aggregator, multiplier: float, *, stages: Iterable[Any] = ()) -> Aggregator:
    """``aggregator`` behind the update norm bound, where the server can apply one.

    The one place that decides it, for simulation and deployment alike (``simulate`` calls it
    with ``aggregation.update_bound``; ``consortium server`` resolves 0 to
    :data:`DEFAULT_MULTIPLIER` first). Returns ``aggregator`` unchanged when:

    - ``multiplier`` is 0 (off);
    - a stage hides single updates (secure aggregation: the server only sees the sum, so the
      bound on each site is the secure-aggregation clip range, applied at the site);
    - a stage calibrates noise to a sum of clipped updates (central DP): its clip ``C`` is the
      bound, re-applied by its server half to every update, and a median-dependent scale would
      let one site change the others' contributions, breaking the noise's sensitivity.

    Raises:
        ConfigError: ``multiplier`` negative, NaN or infinite.
    """
    m = check_multiplier(multiplier)
    if m == 0 or not bound_applies(stages):
        return aggregator
    return BoundedUpdates(aggregator, m)


def bound_applies(stages: Iterable[Any]) -> bool:
    """Whether the server sees single updates it may scale (no secure aggregation, no
    stage whose noise assumes a plain sum of its own clipped updates)."""
    for stage in stages:
        if SUM_ONLY in getattr(stage, "gives", ()) or getattr(stage, "needs_linear_aggregator", False):
            return False
    return True
