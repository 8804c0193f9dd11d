"""What an analysis asks of every site: the query, and the schema the server agrees on after
the sites' first answers.

A query runs in two phases, as a DataSHIELD or NVFlare federated-statistics job does:

1. **profile** — each site says, per column, whether its values are numbers, whether they are
   integer codes with few levels, which categories it holds at least ``min_count`` times, and a
   coarsened range (the ``min_count``-th smallest and largest value, rounded outward to two
   significant digits): never a single record's value;
2. **describe** — the server fixes the :class:`Schema` (each column's kind, the agreed category
   list, histogram edges over the union of the ranges) and every site answers with sums over it.

Both phases are plain data (this module): they travel to a site in process, on Ray or over
gRPC alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from consortium.errors import ConfigError

__all__ = ["ColumnSpec", "Query", "Schema", "coarse_ceil", "coarse_floor"]

Kind = Literal["numeric", "categorical"]


@dataclass(frozen=True)
class Query:
    """One analysis, as the server sends it to every site.

    Attributes:
        columns: the columns to describe; empty: every column of the site's table.
        where: a cohort filter (:mod:`consortium.analytics.expr`); empty: every row.
        group_by: a categorical column described group by group, or empty.
        categorical: numeric columns to describe as categories.
        max_levels: integer-valued columns with at most this many distinct values at every
            site are categorical.
        min_count: the smallest nonzero count a site releases.
        suppress: ``"suppress"`` (a small cell is withheld, ``null``) or ``"refuse"`` (the
            site refuses the query with the reason).
        bins: histogram bins over the agreed range, behind medians and quantiles.
        quantiles: extra quantiles of every numeric column (the median and quartiles always).
        histograms: numeric columns whose histogram is released.
        bounds: ``(column, low, high)``: given histogram ranges (public), instead of the range
            the sites' coarsened ranges agree on.
        crosstabs: pairs of categorical columns to cross-tabulate.
        correlation: numeric columns for a covariance/correlation matrix (complete cases).
        survival: ``(time, event, group)`` columns for Kaplan–Meier curves, or None.
        bands: ``(column, edges)``: a derived categorical column ``<column>_band`` with the
            labels ``"40-49"`` (``[40, 50)``), ``"<40"`` and ``">=70"``, computed at each site.
        dp: the differential-privacy noise every site adds (:mod:`consortium.analytics.dp`);
            then nothing is suppressed and the schema is the public declaration.
        secure: the sums are released only as a secure-aggregation total across sites: a site
            does not withhold its own small cells (no one sees them), the totals are checked
            against ``min_count`` instead, and no per-site table exists.
    """

    columns: tuple[str, ...] = ()
    where: str = ""
    group_by: str = ""
    categorical: tuple[str, ...] = ()
    max_levels: int = 10
    min_count: int = 5
    suppress: Literal["suppress", "refuse"] = "suppress"
    bins: int = 200
    quantiles: tuple[float, ...] = ()
    histograms: tuple[str, ...] = ()
    bounds: tuple[tuple[str, float, float], ...] = ()
    crosstabs: tuple[tuple[str, str], ...] = ()
    correlation: tuple[str, ...] = ()
    survival: tuple[str, str, str] | None = None
    bands: tuple[tuple[str, tuple[float, ...]], ...] = ()
    secure: bool = False
    dp: Any = None  # a consortium.analytics.dp.NoisePlan: every released sum is noised

    @classmethod
    def from_config(cls, analysis: Any, *, secure: bool = False) -> Query:
        """The query an ``[analysis]`` section (:class:`~consortium.config.AnalysisConfig`) asks."""
        pairs = []
        for text in analysis.crosstabs:
            parts = [p.strip() for p in str(text).split("*")]
            if len(parts) != 2 or not all(parts):
                raise ConfigError(
                    f"analysis.crosstabs entry {text!r} is not a pair; write two column names "
                    "joined by '*', e.g. \"sex*cp\""
                )
            pairs.append((parts[0], parts[1]))
        survival = None
        if analysis.survival_time or analysis.survival_event:
            if not (analysis.survival_time and analysis.survival_event):
                raise ConfigError(
                    "analysis.survival_time and analysis.survival_event go together; set both "
                    "(the time-to-event column and the event indicator)"
                )
            survival = (analysis.survival_time, analysis.survival_event, analysis.survival_group)
        if len(analysis.correlation) == 1:
            raise ConfigError(
                "analysis.correlation names one column; a correlation needs two or more"
            )
        return cls(
            columns=tuple(analysis.columns), where=analysis.where, group_by=analysis.group_by,
            categorical=tuple(analysis.categorical), max_levels=analysis.max_levels,
            min_count=analysis.min_count, suppress=analysis.suppress, bins=analysis.bins,
            quantiles=tuple(analysis.quantiles), histograms=tuple(analysis.histograms),
            bounds=_bounds(analysis.bounds), crosstabs=tuple(pairs),
            correlation=tuple(analysis.correlation), survival=survival, secure=secure,
        )

    def given_range(self, name: str) -> tuple[float, float] | None:
        for col, lo, hi in self.bounds:
            if col == name:
                return lo, hi
        return None

    def needed(self) -> tuple[str, ...]:
        """Every column the query reads besides ``columns`` (group, crosstab, correlation,
        survival), in first-use order."""
        seen: dict[str, None] = {}
        for name in (*(c for c, _ in self.bands), self.group_by, *[c for p in self.crosstabs for c in p], *self.correlation,
                     *(self.survival or ())):
            if name:
                seen.setdefault(name, None)
        return tuple(seen)


def _bounds(entries: Sequence[str]) -> tuple[tuple[str, float, float], ...]:
    from consortium.analytics.dp import parse_bounds

    return tuple((c, lo, hi) for c, (lo, hi) in parse_bounds(entries).items())


@dataclass(frozen=True)
class ColumnSpec:
    """One column as every site describes it in phase 2."""

    name: str
    kind: Kind
    categories: tuple[Any, ...] = ()
    edges: tuple[float, ...] = ()  # bins + 1 histogram edges; empty: no histogram
    shift: float = 0.0  # sums are of (x − shift): exact means and variances far from 0


@dataclass(frozen=True)
class Schema:
    """The agreed description of every column (phase 2's request)."""

    query: Query
    columns: Mapping[str, ColumnSpec]
    groups: tuple[Any, ...] = ()  # the agreed values of ``query.group_by``
    survival_times: tuple[float, ...] = ()
    notes: Sequence[str] = field(default_factory=tuple)

    def spec(self, name: str) -> ColumnSpec:
        return self.columns[name]


def coarse_floor(v: float, digits: int = 2) -> float:
    """``v`` rounded down to ``digits`` significant digits (1234 → 1200, −1234 → −1300)."""
    if v == 0 or not math.isfinite(v):
        return float(v)
    step = 10.0 ** (math.floor(math.log10(abs(v))) - digits + 1)
    return float(math.floor(v / step) * step)


def coarse_ceil(v: float, digits: int = 2) -> float:
    """``v`` rounded up to ``digits`` significant digits (1234 → 1300, −1234 → −1200)."""
    return -coarse_floor(-v, digits)


def coarse_range(low: float, high: float, digits: int = 2) -> tuple[float, float]:
    """``[low, high]`` widened outward to a grid of ``digits`` significant digits of its
    width (of its magnitude when the width is 0): ``(1e9 − 3, 1e9 + 3)`` becomes
    ``(999999997, 1000000003)``, ``(17.3, 81.6)`` becomes ``(17, 82)``. Relative to the
    spread, so the midpoint is a shift that keeps a variance's digits far from 0."""
    width = high - low
    if not width > 0 or not math.isfinite(width):
        return coarse_floor(low, digits), coarse_ceil(high, digits)
    step = 10.0 ** (math.floor(math.log10(width)) - digits + 1)
    return float(math.floor(low / step) * step), float(math.ceil(high / step) * step)


def histogram_edges(low: float, high: float, bins: int) -> np.ndarray:
    """``bins + 1`` equal-width edges from ``low`` to ``high`` (one unit wide when equal)."""
    if not high > low:
        low, high = low - 0.5, low + 0.5
    return np.linspace(low, high, bins + 1)
