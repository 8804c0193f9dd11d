"""Byzantine-robust aggregation rules: buffered aggregators over the round's ``[n, d]`` updates.

Each rule replaces the weighted mean ``Σ wᵢ Δᵢ / Σ wᵢ`` with an estimate that a minority of
faulty or malicious clients cannot drag far, and needs every individual update (so it
cannot sit behind secure aggregation):

================= ================================================ ==================
name              rule                                             clients per round
================= ================================================ ==================
median            coordinate-wise median (Yin et al. 2018)         n ≥ 2f + 1
trimmed-mean      coordinate-wise trimmed mean (Yin et al. 2018)   n ≥ 2f + 1
krum              Krum (Blanchard et al. 2017)                     n ≥ 2f + 3
multi-krum        Multi-Krum (Blanchard et al. 2017)               n ≥ 2f + 3, n ≥ m
bulyan            Bulyan over Krum (El Mhamdi et al. 2018)         n ≥ 4f + 3
geometric-median  smoothed Weiszfeld, RFA (Pillutla et al. 2022)   n ≥ 2f + 1
centered-clipping centered clipping (Karimireddy et al. 2021)      n ≥ 2f + 1
norm-bound        clip to a norm, then the mean (Sun et al. 2019)  n ≥ 2f + 1 (median)
fltrust           trust by a root update (Cao et al. 2021)         n ≥ 1
flame             cluster, clip, noise (Nguyen et al. 2022)        n ≥ 2f + 1
================= ================================================ ==================

``make_rule(name, **params)`` builds one by name (``RULES`` maps the names to factories).
Every rule has ``min_clients()`` and ``check_clients(n)``, which raises
:class:`~consortium.errors.PipelineError` when rounds of ``n`` clients are too few for its
``f``; ``aggregate`` raises the same when a round has too few usable updates.

Defaults defend without tuning or a guess of ``f``: centered clipping's radius is the round's
median distance to its center, Krum, Multi-Krum and Bulyan take the most faults the round's
count tolerates, the trimmed mean trims a quarter from each end, norm bounding and FLAME clip
to the round's median norm. (Fixed defaults did not: τ = 10 never clipped a logistic model's
updates of norm ≈ 0.2, and ``f = 1`` let 20 attackers of 100 through; see each factory.)

Common behaviour:

- Updates are taken in client-id order, so ties (Krum's equal scores) go to the smaller id
  and the result does not depend on the order updates arrived in.
- An update with a NaN or infinite value is dropped before the rule runs and reported in
  ``robust_non_finite``; it was certainly faulty, so ``f`` drops by one for each.
- The aggregate is float32; distances, sums and means are computed in float64, on blocks of
  columns so the float64 copies stay small.
- ``Aggregate.weight`` and ``Aggregate.extras`` are the total sample weight and the **sums**
  of the extras over the clients the rule kept (those not excluded as a whole); rules that
  exclude no client (median, trimmed mean, geometric median, clipping rules) sum every
  client's extras. The rules make the deltas robust, not the extras.
- ``Aggregate.info`` (written into each round's metrics record) holds ``robust_rule``,
  ``robust_flagged`` (client ids excluded or treated as outliers this round, sorted) and
  ``robust_weights`` (``{id: factor}``, only factors below 1: clip factors, trust scores, the
  fraction of coordinates kept), plus rule-specific keys (``robust_clip``,
  ``robust_iterations`` ...). Each rule's docstring says what exactly it flags.

Centered clipping is stateful (the center carried across rounds, and with
``worker_momentum`` each client's momentum): it has ``init(layout)`` and
``aggregate(updates, ctx=..., state=...) -> (Aggregate, state)``, see
:class:`StatefulBufferedAggregator`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from consortium.aggregation.robust._base import (
    FaultTolerant,
    RobustAggregator,
    StatefulBufferedAggregator,
)
from consortium.aggregation.robust._clipping import (
    CenteredClipping,
    NormBound,
    centered_clipping,
    norm_bound,
)
from consortium.aggregation.robust._coordinate import Median, TrimmedMean, median, trimmed_mean
from consortium.aggregation.robust._flame import Flame, flame
from consortium.aggregation.robust._fltrust import FLTrust, RootUpdate, fltrust
from consortium.aggregation.robust._geometric import GeometricMedian, geometric_median
from consortium.aggregation.robust._krum import Bulyan, Krum, MultiKrum, bulyan, krum, multi_krum
from consortium.errors import PipelineError

__all__ = [
    "RULES",
    "Bulyan",
    "CenteredClipping",
    "FLTrust",
    "FaultTolerant",
    "Flame",
    "GeometricMedian",
    "Krum",
    "Median",
    "MultiKrum",
    "NormBound",
    "RobustAggregator",
    "RootUpdate",
    "StatefulBufferedAggregator",
    "TrimmedMean",
    "bulyan",
    "centered_clipping",
    "flame",
    "fltrust",
    "geometric_median",
    "krum",
    "make_rule",
    "median",
    "multi_krum",
    "norm_bound",
    "trimmed_mean",
]

RULES: dict[str, Callable[..., RobustAggregator]] = {
    "median": median,
    "trimmed-mean": trimmed_mean,
    "krum": krum,
    "multi-krum": multi_krum,
    "bulyan": bulyan,
    "geometric-median": geometric_median,
    "centered-clipping": centered_clipping,
    "norm-bound": norm_bound,
    "fltrust": fltrust,
    "flame": flame,
}
"""Rule names (kebab-case, as in ``[aggregation] rule = "trimmed-mean"``) → factories."""


def make_rule(name: str, **params: Any) -> RobustAggregator:
    """Build robust rule ``name`` with ``params`` (``_`` is accepted for ``-`` in both).

    ``make_rule("trimmed-mean", beta=0.1)``, ``make_rule("multi-krum", f=2, m=5)``.

    Raises:
        PipelineError: an unknown name (the message lists the known ones), a parameter the
            rule does not take or a required one missing (the message lists what it takes),
            or a value out of range.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in RULES:
        raise PipelineError(
            f"unknown robust aggregation rule {name!r}; known rules: {', '.join(sorted(RULES))}"
        )
    signature = inspect.signature(RULES[key])
    takes = list(signature.parameters)
    kwargs = {k.replace("-", "_"): v for k, v in params.items()}
    listing = ", ".join(takes) if takes else "no parameters"
    for k in kwargs:
        if k not in takes:
            raise PipelineError(f"robust rule {key!r} has no parameter {k!r}; it takes {listing}")
    for p in signature.parameters.values():
        if p.default is p.empty and p.name not in kwargs:
            raise PipelineError(
                f"robust rule {key!r} needs parameter {p.name!r}; it takes {listing}"
            )
    return RULES[key](**kwargs)
