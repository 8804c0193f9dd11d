"""Coordinate-wise rules: the median and the trimmed mean (Yin et al. 2018), and Bulyan's last step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from consortium.aggregation.base import Aggregate, RoundContext
from consortium.aggregation.robust._base import (
    NEEDS,
    FaultTolerant,
    Round,
    blocks,
    check_f,
    prepare,
)
from consortium.errors import PipelineError
from consortium.types import Update

__all__ = [
    "Median",
    "TrimmedMean",
    "coordinate_median",
    "coordinatewise",
    "mean_around_median",
    "median",
    "mostly_discarded",
    "sampled_tails",
    "trimmed_mean",
]

DEFAULT_BETA = 0.25
"""Trimmed mean's default fraction trimmed from each end (see :func:`trimmed_mean`)."""

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sorted values ``[c, n]`` (one row a coordinate) → one float64 value a coordinate."""


def _sorted(
    x: torch.Tensor, rows: torch.Tensor | None, cols: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    # A [c, n] copy sorted along its contiguous rows is several times faster than sorting the
    # [n, c] slice along dim 0.
    block = x[:, cols] if rows is None else x[rows, cols]
    values, order = block.T.contiguous().sort(dim=1)
    return values, order


def _middle(v: torch.Tensor) -> torch.Tensor:
    n = v.shape[1]
    if n % 2:
        return v[:, n // 2].to(torch.float64)
    return (v[:, n // 2 - 1].to(torch.float64) + v[:, n // 2].to(torch.float64)) / 2


def _median_of_rows(v: torch.Tensor) -> torch.Tensor:
    """The median of each row of an unsorted ``[c, n]`` block, float64 ``[c]``.

    ``kthvalue`` selects without sorting (about half the time of a sort); for an even ``n``
    the upper middle value is the smallest value above the lower one, unless the lower one
    repeats past the middle.
    """
    n = v.shape[1]
    lower = v.kthvalue((n + 1) // 2, dim=1).values
    if n % 2:
        return lower.to(torch.float64)
    col = lower[:, None]
    above = torch.where(v > col, v, float("inf")).amin(dim=1)
    repeats = (v <= col).sum(dim=1) > n // 2
    upper = torch.where(repeats, lower, above)
    return (lower.to(torch.float64) + upper.to(torch.float64)) / 2


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of the rows of ``x``, float32 ``[d]``."""
    out = torch.empty(x.shape[1], dtype=torch.float32)
    for cols in blocks(x.shape[1]):
        out[cols] = _median_of_rows(x[:, cols].T.contiguous()).to(torch.float32)
    return out


SAMPLE = 1 << 16
"""Coordinates a median looks at to tell who sits in the tails (an operator's signal only)."""


def sampled_tails(x: torch.Tensor, f: int) -> tuple[torch.Tensor, int]:
    """Per row, in how many of (at most ``SAMPLE``) evenly spaced coordinates it is in an ``f``-tail.

    Returns the counts and the number of coordinates looked at. For the median's flags: the
    value itself comes from a selection that does not say who was in the tails.
    """
    n, d = x.shape
    step = max(1, -(-d // SAMPLE))
    sample = x[:, ::step].T.contiguous()
    tails = torch.zeros(n, dtype=torch.int64)
    if f and d:
        order = sample.argsort(dim=1)
        tails += torch.bincount(order[:, :f].flatten(), minlength=n)
        tails += torch.bincount(order[:, n - f :].flatten(), minlength=n)
    return tails, sample.shape[0]


def coordinatewise(
    x: torch.Tensor, f: int, reduce: Reduce, *, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reduce`` over each column's sorted values, and per row the coordinates it was in a tail.

    Returns the float32 ``[d]`` result and, for each row, in how many coordinates its value
    was among the ``f`` smallest or ``f`` largest (what a trimmed mean discards).
    """
    n = x.shape[0] if rows is None else rows.numel()
    out = torch.empty(x.shape[1], dtype=torch.float32)
    tails = torch.zeros(n, dtype=torch.int64)
    for cols in blocks(x.shape[1]):
        values, order = _sorted(x, rows, cols)
        out[cols] = reduce(values).to(torch.float32)
        if f:
            tails += torch.bincount(order[:, :f].flatten(), minlength=n)
            tails += torch.bincount(order[:, n - f :].flatten(), minlength=n)
    return out, tails


def mean_around_median(
    x: torch.Tensor, keep: int, *, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate, the mean of the ``keep`` values closest to the median (Bulyan's step).

    The ``keep`` closest values are consecutive in sorted order, so the window is found among
    the ``n − keep + 1`` windows as the one whose farther end is nearest the median; ties go
    to the lower window. Returns the float32 ``[d]`` result and, per row, in how many
    coordinates its value fell outside the window.
    """
    n = x.shape[0] if rows is None else rows.numel()
    out = torch.empty(x.shape[1], dtype=torch.float32)
    outside = torch.zeros(n, dtype=torch.int64)
    position = torch.arange(n)[None, :]
    for cols in blocks(x.shape[1]):
        values, order = _sorted(x, rows, cols)
        v64 = values.to(torch.float64)
        med = _middle(values)[:, None]
        lo, hi = v64[:, : n - keep + 1], v64[:, keep - 1 :]
        start = torch.maximum((med - lo).abs(), (hi - med).abs()).argmin(dim=1)[:, None]
        dropped = (position < start) | (position >= start + keep)
        # masked sum, not a cumulative sum: one huge Byzantine value in a prefix sum would
        # cancel every honest digit of the window after it
        out[cols] = (v64.masked_fill(dropped, 0.0).sum(dim=1) / keep).to(torch.float32)
        outside += torch.bincount(order[dropped], minlength=n)
    return out, outside


def mostly_discarded(counts: torch.Tensor, d: int, rows: list[int]) -> dict[int, float]:
    """``{row: fraction of coordinates kept}`` for the rows discarded in most coordinates.

    An honest client lands in the discarded part of a coordinate now and then (a trimmed mean
    drops ``2f`` of ``n`` values); one discarded in most coordinates is an outlier overall.
    """
    frac = (counts.to(torch.float64) / max(d, 1)).tolist()
    return {row: 1.0 - x for row, x in zip(rows, frac) if x > 0.5}


def tail_record(r: Round, rule: str, counts: torch.Tensor, coordinates: int) -> dict[str, Any]:
    kept = mostly_discarded(counts, coordinates, list(range(r.n)))
    return r.record(rule, flagged=kept, weights={i: w for i, w in kept.items() if w > 0})


@dataclass(frozen=True)
class Median(FaultTolerant):
    """Coordinate-wise median of the updates.

    Yin, Chen, Kannan, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018. Each coordinate of the aggregate is the median of the
    clients' values (for an even count, the mean of the two middle values). Sample weights are
    ignored, as in the paper. Tolerates ``f`` faulty clients when ``n ≥ 2f + 1``; ``f`` does
    not change the result, only that check and what is flagged.

    Info: ``robust_flagged`` lists clients whose value was among the ``f`` smallest or ``f``
    largest in more than half of the coordinates, ``robust_weights`` the fraction of
    coordinates in which they were not (counted on at most 65,536 evenly spaced coordinates:
    the median itself is found by selection, which does not tell who was in the tails).
    Extras are summed over every client.
    """

    f: int = 1
    name: str = "median"
    needs: frozenset[str] = NEEDS

    def aggregate(self, updates: list[Update], *, ctx: RoundContext) -> Aggregate:
        r = prepare(self, updates, ctx, self.f)
        tails, looked_at = sampled_tails(r.matrix, r.f)
        info = tail_record(r, self.name, tails, looked_at)
        return r.result(coordinate_median(r.matrix), keep=None, info=info)


@dataclass(frozen=True)
class TrimmedMean(FaultTolerant):
    """Coordinate-wise trimmed mean: drop the ``f`` largest and ``f`` smallest values, average the rest.

    Yin, Chen, Kannan, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018. ``f`` is fixed, or ``beta`` gives it per round as
    ``⌊beta·n⌋``. Sample weights are ignored, as in the paper. Needs ``n ≥ 2f + 1``.

    Info: ``robust_flagged`` lists clients trimmed in more than half of the coordinates,
    ``robust_weights`` the fraction of coordinates in which they were kept. Extras are summed
    over every client.
    """

    f: int = 1
    beta: float | None = None
    name: str = "trimmed-mean"
    needs: frozenset[str] = NEEDS

    def faults(self) -> int:
        return 0 if self.beta is not None else self.f

    def trimmed(self, n: int) -> int:
        """Values dropped from each end in a round of ``n`` updates."""
        # the epsilon keeps 0.29·100 = 28.999999999999996 at 29
        return math.floor(self.beta * n + 1e-9) if self.beta is not None else self.f

    def aggregate(self, updates: list[Update], *, ctx: RoundContext) -> Aggregate:
        f = self.trimmed(len(updates))
        r = prepare(self, updates, ctx, f)
        n, k = r.n, r.f

        def mean_of_middle(v: torch.Tensor) -> torch.Tensor:
            return v[:, k : n - k].sum(dim=1, dtype=torch.float64) / (n - 2 * k)

        delta, tails = coordinatewise(r.matrix, k, mean_of_middle)
        info = tail_record(r, self.name, tails, r.matrix.shape[1])
        info["robust_trimmed"] = k
        return r.result(delta, keep=None, info=info)


def median(f: int = 1) -> Median:
    """Coordinate-wise median (Yin et al. 2018), tolerating ``f`` faulty clients (``n ≥ 2f+1``).

    Raises:
        PipelineError: ``f`` is not a whole number >= 0.
    """
    return Median(check_f("median", f))


def trimmed_mean(beta: float | None = None, *, f: int | None = None) -> TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    Args:
        beta: fraction trimmed from each end, ``0 <= beta < 0.5``: ``⌊beta·n⌋`` values a
            round (``trimmed_mean(0.1)``).
        f: or a fixed number trimmed from each end (``n ≥ 2f + 1``).

    Neither: ``beta = 0.25``, the interquartile mean, the classical compromise between the
    mean's efficiency and the median's breakdown point; it tolerates up to a quarter of a
    round's clients faulty in every coordinate. (The old default, ``f = 1``, trimmed one value
    from each end and fell to chance when 20 % of clients ran IPM on digits; β = 0.25 holds
    better, β nearer 0.5 better still at a small cost without attack:
    benchmarks/RESULTS.md, "Robust defaults".)

    Raises:
        PipelineError: both given, or a value out of range.
    """
    if beta is not None and f is not None:
        raise PipelineError("robust rule 'trimmed-mean': give beta or f, not both")
    if beta is None and f is None:
        beta = DEFAULT_BETA
    if beta is None:
        return TrimmedMean(f=check_f("trimmed-mean", f))
    ok = isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 <= beta < 0.5
    if not ok:
        raise PipelineError(
            f"robust rule 'trimmed-mean': beta = {beta!r} must be a fraction in [0, 0.5)"
        )
    return TrimmedMean(f=0, beta=float(beta))
