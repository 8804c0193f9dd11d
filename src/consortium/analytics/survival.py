"""Federated Kaplan–Meier curves and the k-sample log-rank test, from per-site counts.

Each site turns its rows into integer counts on an agreed time grid (:func:`site_counts`):
per group and per grid time ``t_j`` the number of events and the number censored, plus the
number of rows whose time lies beyond the grid. The counts of all sites are summed (in the
clear or through secure aggregation: the layout is fixed by the grid and the groups) and the
server computes, from the totals only, the Kaplan–Meier estimate (:func:`kaplan_meier`) and
the log-rank test (:func:`logrank`). The number at risk is not sent: it follows from the totals
(everyone at the start, minus everyone who had an event or was censored before ``t_j``).

Two grids:

- **exact** — the grid holds every distinct time of every site (``np.unique`` of the pooled
  times). The results equal the pooled computation (lifelines' ``KaplanMeierFitter`` and
  ``multivariate_logrank_test``) to rounding. Agreeing on such a grid discloses every distinct
  time, so it is for data whose times are already coarse (whole days, months) or for checks.
- **coarse** — an agreed grid (:func:`time_grid`). Each time is rounded *up* to the next grid
  point (a time in ``(t_{j-1}, t_j]`` counts at ``t_j``), so the result is the exact
  Kaplan–Meier curve and log-rank test of the rounded-up data, evaluated at the grid points.
  The approximation: within an interval, events and censorings are treated as tied at its end
  (events first, as usual), so a subject censored inside an interval still counts as at risk
  for that interval's events. The curve at ``t_j`` moves by at most the events whose order
  relative to those censorings changed; with intervals short against the follow-up it is small.

Disclosure control: :func:`small_cells` flags grid points with a count in ``(0, min_count)``;
:func:`merge_small_intervals` drops grid points (merging each interval into the next) until
every interval's event count is 0 or at least ``min_count`` in every group; :func:`coarsen`
maps counts onto a subset of their grid, so sites that merged differently can still be summed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from consortium.errors import ConfigError, DataError

__all__ = [
    "KMResult",
    "LogRankResult",
    "SurvivalCounts",
    "coarsen",
    "kaplan_meier",
    "logrank",
    "merge_small_intervals",
    "site_counts",
    "small_cells",
    "sum_counts",
    "time_grid",
]

# A curve that is 0.5 in exact arithmetic may come out one ulp either side; the median is the
# first time S(t) <= 0.5, so compare with a few ulps of slack.
_HALF = 0.5 + 1e-12


# --------------------------------------------------------------------------------------------
# Counts: what a site sends


@dataclass(frozen=True, eq=False)
class SurvivalCounts:
    """Integer counts of one site (or of the sum of sites) on a time grid.

    Attributes:
        grid: the grid times ``t_1 < … < t_m`` (float64, shape ``(m,)``).
        groups: the group labels, in the agreed order (length ``k``).
        events: ``(k, m)`` int64, events at each grid time (times rounded up to the grid).
        censored: ``(k, m)`` int64, censorings at each grid time.
        beyond: ``(k,)`` int64, rows whose time lies after ``t_m`` (at risk at every grid time).
        missing: rows dropped because time, event or group was missing.

    :meth:`to_vector` / :meth:`from_vector` give the fixed flat layout that secure
    aggregation sums; ``a + b`` sums two sites with the same grid and groups.
    """

    grid: np.ndarray
    groups: tuple[Any, ...]
    events: np.ndarray
    censored: np.ndarray
    beyond: np.ndarray
    missing: int = 0

    def __post_init__(self) -> None:
        k, m = len(self.groups), self.grid.shape[0]
        for name, shape in (("events", (k, m)), ("censored", (k, m)), ("beyond", (k,))):
            arr = getattr(self, name)
            if arr.shape != shape or arr.dtype != np.int64:
                raise DataError(
                    f"SurvivalCounts.{name} must be an int64 array of shape {shape} "
                    f"(groups × grid), found {arr.dtype} {arr.shape}"
                )
            if arr.size and arr.min() < 0:
                raise DataError(f"SurvivalCounts.{name} holds a negative count; counts are >= 0")
        if self.missing < 0:
            raise DataError(f"SurvivalCounts.missing must be >= 0, found {self.missing}")

    @property
    def total(self) -> np.ndarray:
        """Rows per group, ``(k,)``: everyone at risk at the start."""
        return self.events.sum(axis=1) + self.censored.sum(axis=1) + self.beyond

    @property
    def at_risk(self) -> np.ndarray:
        """Number at risk just before each grid time, ``(k, m)``."""
        removed = self.events + self.censored
        before = np.cumsum(removed, axis=1) - removed
        return self.total[:, None] - before

    def vector_size(self) -> int:
        """Length of :meth:`to_vector`: ``2·k·m + k + 1``."""
        return 2 * self.events.size + self.beyond.size + 1

    def to_vector(self) -> np.ndarray:
        """The counts as one int64 vector: events, censored (both row-major ``(k, m)``),
        beyond, missing. Its layout depends only on the grid and the groups."""
        return np.concatenate(
            [self.events.ravel(), self.censored.ravel(), self.beyond, [self.missing]]
        ).astype(np.int64)

    @classmethod
    def from_vector(
        cls, vector: np.ndarray, *, grid: np.ndarray, groups: Sequence[Any]
    ) -> SurvivalCounts:
        """Rebuild counts from :meth:`to_vector` (for example a securely aggregated sum)."""
        grid = _check_grid(grid)
        k, m = len(groups), grid.shape[0]
        vec = np.asarray(vector)
        if vec.shape != (2 * k * m + k + 1,):
            raise DataError(
                f"a survival count vector for {k} groups and {m} grid times has "
                f"{2 * k * m + k + 1} entries, found shape {vec.shape}"
            )
        if not np.array_equal(vec, np.round(vec)):
            raise DataError("a survival count vector must hold whole numbers")
        vec = vec.astype(np.int64)
        return cls(
            grid=grid,
            groups=tuple(groups),
            events=vec[: k * m].reshape(k, m),
            censored=vec[k * m : 2 * k * m].reshape(k, m),
            beyond=vec[2 * k * m : 2 * k * m + k],
            missing=int(vec[-1]),
        )

    def __add__(self, other: SurvivalCounts) -> SurvivalCounts:
        if not isinstance(other, SurvivalCounts):
            return NotImplemented
        if not np.array_equal(self.grid, other.grid) or self.groups != other.groups:
            raise DataError(
                "cannot sum survival counts made on different grids or groups "
                f"(groups {self.groups} vs {other.groups}, grid sizes {self.grid.size} vs "
                f"{other.grid.size}); every site must use the agreed grid and group labels, "
                "or map both onto a common grid with coarsen()"
            )
        return SurvivalCounts(
            grid=self.grid,
            groups=self.groups,
            events=self.events + other.events,
            censored=self.censored + other.censored,
            beyond=self.beyond + other.beyond,
            missing=self.missing + other.missing,
        )


def sum_counts(parts: Iterable[SurvivalCounts]) -> SurvivalCounts:
    """Sum the counts of several sites (all on the same grid and groups)."""
    items = list(parts)
    if not items:
        raise DataError("sum_counts needs the counts of at least one site, found none")
    total = items[0]
    for item in items[1:]:
        total = total + item
    return total


def time_grid(
    stop: float | None = None,
    *,
    step: float | None = None,
    points: int | None = None,
    start: float = 0.0,
    edges: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """An agreed time grid for the coarse mode: the right ends of the intervals.

    Give ``stop`` with either ``step`` (``start+step, start+2·step, …`` up to the first point
    >= ``stop``) or ``points`` (``points`` equal intervals of ``(start, stop]``); or give
    ``edges`` (any strictly increasing times, returned as they are, checked). A time ``x``
    counts at the first grid time ``>= x``; times after the last grid time count as
    ``beyond`` (at risk throughout). Raises ``ConfigError`` on an inconsistent request.
    """
    if edges is not None:
        if stop is not None or step is not None or points is not None:
            raise ConfigError("time_grid: give either edges, or stop with step or points")
        return _check_grid(np.asarray(edges, dtype=np.float64))
    if stop is None or (step is None) == (points is None):
        raise ConfigError("time_grid: give stop and exactly one of step or points (or edges)")
    if not (math.isfinite(start) and math.isfinite(stop) and stop > start):
        raise ConfigError(f"time_grid: need finite start < stop, found {start} and {stop}")
    if points is not None:
        if points < 1:
            raise ConfigError(f"time_grid: points must be >= 1, found {points}")
        grid = np.linspace(start, stop, points + 1)[1:]
    else:
        assert step is not None
        if not (math.isfinite(step) and step > 0):
            raise ConfigError(f"time_grid: step must be a positive number, found {step}")
        # a tolerance so that (stop - start) / step = 3.0000000001 does not add a fourth point
        count = max(1, math.ceil((stop - start) / step - 1e-9))
        grid = start + step * np.arange(1, count + 1, dtype=np.float64)
    return _check_grid(grid)


def _check_grid(grid: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ConfigError(f"a time grid is a non-empty 1-D array, found shape {grid.shape}")
    if not np.all(np.isfinite(grid)):
        raise ConfigError("a time grid must hold finite times (no NaN or inf)")
    if np.any(np.diff(grid) <= 0):
        raise ConfigError("a time grid must be strictly increasing; sort it and drop duplicates")
    return grid


def _is_missing(values: np.ndarray) -> np.ndarray:
    """None or NaN, elementwise (object arrays from tables hold None for a missing cell)."""
    if values.dtype == object:
        return np.equal(values, np.array(None, dtype=object)) | np.not_equal(values, values)
    if values.dtype.kind in "fc":
        return np.isnan(values)
    return np.zeros(values.shape, dtype=bool)


def _event_flags(event: np.ndarray, event_values: Sequence[Any] | None) -> np.ndarray:
    """1 for an event, 0 for censored, from non-missing values."""
    if event_values is not None:
        return np.isin(event, list(event_values))
    if event.dtype == bool:
        return event
    if event.dtype == object:  # a table column with None: numbers if they all are
        try:
            event = event.astype(np.float64)
        except (TypeError, ValueError):
            event = event.astype(str)
    if event.dtype.kind in "iuf":
        bad = (event != 0) & (event != 1)
        if bad.any():
            raise DataError(
                f"event values must be 1/0 or true/false, found {np.unique(event[bad])[:5]}; "
                "pass event_values=[...] to say which values mean an event"
            )
        return event == 1
    text = np.char.lower(event.astype(str))
    is_event = np.isin(text, ["1", "true"])
    bad = ~is_event & ~np.isin(text, ["0", "false"])
    if bad.any():
        raise DataError(
            f"event values must be 1/0 or true/false, found {np.unique(event[bad])[:5]}; "
            "pass event_values=[...] to say which values mean an event"
        )
    return is_event


def _group_index(group: np.ndarray, groups: tuple[Any, ...]) -> np.ndarray:
    """Position of each row's group label in ``groups`` (the loop runs over distinct labels)."""
    labels, inverse = np.unique(group, return_inverse=True)
    lookup = {label: i for i, label in enumerate(groups)}
    unknown = [label for label in labels.tolist() if label not in lookup]
    if unknown:
        raise DataError(
            f"group values {unknown[:5]} are not among the agreed groups {list(groups)}; "
            "add them to groups= or harmonise the column first"
        )
    position = np.array([lookup[label] for label in labels.tolist()], dtype=np.int64)
    return position[inverse.reshape(-1)]


def site_counts(
    time: np.ndarray,
    event: np.ndarray,
    grid: np.ndarray,
    group: np.ndarray | None = None,
    groups: Sequence[Any] | None = None,
    *,
    event_values: Sequence[Any] | None = None,
) -> SurvivalCounts:
    """Count one site's events and censorings per group on the agreed time grid.

    Args:
        time: time to event or censoring, >= 0, one per row.
        event: 1/0, true/false (also as text), or any values with ``event_values`` naming
            those that mean an event (every other value means censored).
        grid: the agreed grid (every distinct time for the exact mode, or
            :func:`time_grid`); a time counts at the first grid time ``>= time``.
        group: optional group label per row; ``groups`` must then list the agreed labels,
            whose order fixes the layout at every site.
        groups: the agreed labels; without ``group`` there is one group, ``("all",)``.
        event_values: the values of ``event`` that mean an event.

    Rows with a missing time, event or group (None or NaN) are dropped and counted in
    ``missing``. Raises ``DataError`` for negative or infinite times, unknown event codes or
    group labels outside ``groups``; ``ConfigError`` for a bad grid or groups.
    """
    grid = _check_grid(grid)
    time_arr = np.asarray(time)
    event_arr = np.asarray(event)
    if time_arr.ndim != 1 or event_arr.shape != time_arr.shape:
        raise DataError(
            f"time and event must be 1-D and of equal length, found {time_arr.shape} "
            f"and {event_arr.shape}"
        )
    drop = _is_missing(time_arr) | _is_missing(event_arr)
    if group is None:
        if groups is not None:
            raise ConfigError("groups= was given without group=: pass the group column too")
        labels: tuple[Any, ...] = ("all",)
    else:
        if groups is None:
            raise ConfigError(
                "group= needs groups=, the agreed group labels in a fixed order, so that every "
                "site's counts have the same layout"
            )
        labels = tuple(groups)
        if len(set(labels)) != len(labels) or not labels:
            raise ConfigError(f"groups must be distinct labels, at least one; found {labels}")
        group_arr = np.asarray(group)
        if group_arr.shape != time_arr.shape:
            raise DataError(f"group has shape {group_arr.shape}, time has {time_arr.shape}")
        drop |= _is_missing(group_arr)

    keep = ~drop
    try:
        times = time_arr[keep].astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"time must be numeric, found values of type {time_arr.dtype}") from exc
    if times.size and not (np.all(np.isfinite(times)) and times.min() >= 0):
        raise DataError("times must be finite and >= 0 (time since the origin); fix the column")
    flags = _event_flags(event_arr[keep], event_values)
    gidx = (
        np.zeros(times.shape, dtype=np.int64)
        if group is None
        else _group_index(np.asarray(group)[keep], labels)
    )

    k, m = len(labels), grid.size
    slot = np.searchsorted(grid, times, side="left")  # first grid time >= t
    inside = slot < m
    cell = gidx[inside] * m + slot[inside]
    hit = flags[inside]
    events = np.bincount(cell[hit], minlength=k * m).reshape(k, m)
    censored = np.bincount(cell[~hit], minlength=k * m).reshape(k, m)
    beyond = np.bincount(gidx[~inside], minlength=k)
    return SurvivalCounts(
        grid=grid,
        groups=labels,
        events=events.astype(np.int64),
        censored=censored.astype(np.int64),
        beyond=beyond.astype(np.int64),
        missing=int(drop.sum()),
    )


# --------------------------------------------------------------------------------------------
# Server side: Kaplan–Meier and log-rank from the totals


@dataclass(frozen=True, eq=False)
class KMResult:
    """Kaplan–Meier estimates per group at the grid times (arrays are ``(k, m)`` or ``(k,)``).

    Attributes:
        grid, groups: as in the counts.
        survival: S(t_j), the product-limit estimate (right-continuous: events at t_j count).
        std_error: Greenwood's standard error of S(t_j).
        ci_lower, ci_upper: the pointwise confidence interval, log-log (exponential
            Greenwood) transformed — lifelines' and R ``survfit(conf.type="log-log")``'s.
        at_risk: number at risk just before t_j; events, censored: the counts.
        median: first grid time with S(t) <= 0.5 (lifelines' rule; R's ``survfit`` takes the
            midpoint when S is exactly 0.5 over an interval); ``inf`` when not reached. On a
            coarse grid the median lies in the interval that ends at this time.
        median_ci: ``(k, 2)``, first times the lower and the upper band reach 0.5 (``inf``
            when not reached).
        confidence: the level of the intervals (0.95 by default).
    """

    grid: np.ndarray
    groups: tuple[Any, ...]
    survival: np.ndarray
    std_error: np.ndarray
    ci_lower: np.ndarray
    ci_upper: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray
    censored: np.ndarray
    median: np.ndarray
    median_ci: np.ndarray
    confidence: float


def kaplan_meier(counts: SurvivalCounts, *, alpha: float = 0.05) -> KMResult:
    """Kaplan–Meier survival curves with Greenwood standard errors, from summed counts.

    ``S(t_j) = Π_{i<=j} (1 − d_i / n_i)`` (Kaplan & Meier 1958, "Nonparametric estimation
    from incomplete observations", JASA 53:457–481); ``Var S(t_j) = S(t_j)² Σ_{i<=j}
    d_i / (n_i (n_i − d_i))`` (Greenwood 1926, "The natural duration of cancer", Reports on
    Public Health and Medical Subjects 33). The ``1 − alpha`` interval is the log-log one
    (Kalbfleisch & Prentice 1980; "exponential Greenwood"), lifelines' default:
    ``S^exp(±z σ / log S)`` with ``σ² = Σ d/(n(n−d))``; it stays inside [0, 1]. At S = 1 it
    is [1, 1], at S = 0 it is [0, 0]; a term with ``n = d`` (everyone at risk has the event)
    adds 0 to ``σ²``, as in lifelines. The median's interval is where the band crosses 0.5
    (Brookmeyer & Crowley 1982, Biometrics 38:29–41, with the same transform as R's
    ``survfit`` and lifelines' ``median_survival_times(confidence_interval_)``).

    Exact grid: equal to the pooled Kaplan–Meier estimate. Coarse grid: the estimate of the
    data rounded up to the grid (see the module docstring).
    """
    from scipy.stats import norm

    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), found {alpha}")
    d = counts.events.astype(np.float64)
    n = counts.at_risk.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(n > 0, 1.0 - d / n, 1.0)
        survival = np.cumprod(factor, axis=1)
        term = np.where(n - d > 0, d / (n * (n - d)), 0.0)
        cum = np.cumsum(term, axis=1)
        sigma = np.sqrt(cum)
        z = float(norm.ppf(1 - alpha / 2))
        log_s = np.log(survival)
        # log S < 0 strictly between 0 and 1; the limits are handled below
        shift = np.exp(z * sigma / log_s)
        lower = np.power(survival, 1.0 / shift)
        upper = np.power(survival, shift)
    one = survival >= 1.0
    lower = np.where(one, 1.0, np.where(survival <= 0.0, 0.0, lower))
    upper = np.where(one, 1.0, np.where(survival <= 0.0, 0.0, upper))
    median = _first_time_at_or_below(survival, counts.grid)
    median_ci = np.stack(
        [_first_time_at_or_below(lower, counts.grid), _first_time_at_or_below(upper, counts.grid)],
        axis=1,
    )
    return KMResult(
        grid=counts.grid,
        groups=counts.groups,
        survival=survival,
        std_error=survival * sigma,
        ci_lower=lower,
        ci_upper=upper,
        at_risk=counts.at_risk,
        events=counts.events,
        censored=counts.censored,
        median=median,
        median_ci=median_ci,
        confidence=1 - alpha,
    )


def _first_time_at_or_below(curves: np.ndarray, grid: np.ndarray) -> np.ndarray:
    below = curves <= _HALF
    first = np.argmax(below, axis=1)
    return np.where(below.any(axis=1), grid[first], np.inf)


class LogRankResult(NamedTuple):
    """The k-sample log-rank test: ``chi2`` on ``dof`` degrees of freedom, and its p-value."""

    chi2: float
    dof: int
    p_value: float


def logrank(counts: SurvivalCounts) -> LogRankResult:
    """The k-sample log-rank test that the groups' survival curves are equal.

    Per grid time: observed events ``O_g`` minus expected ``E_g = n_g d / n`` under the null,
    summed over time into ``Z``; covariance ``V_gh = Σ d (n − d)/(n − 1) · n_g (δ_gh n − n_h)
    / n²`` (hypergeometric); ``chi2 = Z' V⁻ Z`` on the first ``k − 1`` groups with
    ``k − 1`` degrees of freedom (Mantel 1966, Cancer Chemotherapy Reports 50:163–170;
    Peto & Peto 1972, JRSS A 135:185–207). Groups without any rows are left out. p from
    ``scipy.stats.chi2``. Exact grid: equal to lifelines' ``multivariate_logrank_test`` (and
    ``logrank_test`` for two groups); coarse grid: the test on the data rounded up to it.

    Raises ``DataError`` with fewer than two non-empty groups.
    """
    from scipy.stats import chi2 as chi2_dist

    present = counts.total > 0
    if present.sum() < 2:
        raise DataError(
            f"the log-rank test compares at least two groups with rows, found "
            f"{int(present.sum())} among {list(counts.groups)}"
        )
    d_g = counts.events[present].astype(np.float64)  # (k, m)
    n_g = counts.at_risk[present].astype(np.float64)
    d = d_g.sum(axis=0)
    n = n_g.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(n > 0, n_g * d / n, 0.0)
        # (n − d)/(n − 1) is 1 when n = 1 (then d ≤ 1 and the term has no spread anyway)
        ties = np.where(n > 1, (n - d) / (n - 1), 1.0)
        weight = np.where(n > 0, ties * d / n**2, 0.0)  # (m,)
    z = (d_g - expected).sum(axis=1)
    cov = np.diag((n_g * (weight * n)).sum(axis=1)) - (n_g * weight) @ n_g.T
    k = int(present.sum())
    stat = float(z[:-1] @ np.linalg.pinv(cov[:-1, :-1]) @ z[:-1])
    stat = max(stat, 0.0)
    return LogRankResult(chi2=stat, dof=k - 1, p_value=float(chi2_dist.sf(stat, k - 1)))


# --------------------------------------------------------------------------------------------
# Disclosure control


def small_cells(counts: SurvivalCounts, min_count: int, *, censored: bool = False) -> np.ndarray:
    """``(k, m)`` bool: grid cells whose event count (and, with ``censored=True``, censored
    count) is in ``(0, min_count)`` — what a minimum-cell-count rule would suppress."""
    if min_count < 1:
        raise ConfigError(f"min_count must be >= 1, found {min_count}")
    flagged = (counts.events > 0) & (counts.events < min_count)
    if censored:
        flagged |= (counts.censored > 0) & (counts.censored < min_count)
    return flagged


def coarsen(counts: SurvivalCounts, grid: np.ndarray) -> SurvivalCounts:
    """Map counts onto a coarser grid made of some of their grid times.

    Each old grid time's counts move to the first new grid time at or after it (later ones
    to ``beyond``) — the same counts ``site_counts`` gives on the new grid from the rows, so
    sites that merged differently can be summed on the common points of their grids.
    Raises ``ConfigError`` when ``grid`` holds a time that is not on the old grid.
    """
    new = _check_grid(grid)
    if not np.all(np.isin(new, counts.grid)):
        raise ConfigError(
            "coarsen needs a grid made of some of the counts' grid times (a new time between "
            "two old ones would split an interval whose rows are no longer known)"
        )
    slot = np.searchsorted(new, counts.grid, side="left")
    k, m_new = len(counts.groups), new.size
    inside = slot < m_new

    # old grid times are in order, so each new interval gathers a contiguous run of them
    ends = np.searchsorted(slot[inside], np.arange(m_new), side="right")

    def move(cells: np.ndarray) -> np.ndarray:
        running = np.concatenate(
            [np.zeros((k, 1), dtype=np.int64), np.cumsum(cells[:, inside], axis=1)], axis=1
        )
        return np.diff(running[:, ends], axis=1, prepend=0).astype(np.int64)

    beyond = counts.beyond + (counts.events + counts.censored)[:, ~inside].sum(axis=1)
    return SurvivalCounts(
        grid=new,
        groups=counts.groups,
        events=move(counts.events),
        censored=move(counts.censored),
        beyond=beyond.astype(np.int64),
        missing=counts.missing,
    )


def merge_small_intervals(
    counts: SurvivalCounts, min_count: int, *, censored: bool = False
) -> SurvivalCounts:
    """Merge adjacent grid intervals until every interval's event count is 0 or at least
    ``min_count`` in every group (with ``censored=True``, the censored counts too).

    Walks the grid from the start and closes an interval as soon as it satisfies the rule
    (merging an interval into the next drops the grid time between them, as
    :func:`coarsen`); a short tail is merged backwards into the intervals before it. Counts
    ``beyond`` the grid are not a released interval and are left as they are. Returns the
    counts on the coarser grid. Raises ``DataError`` when a group's total is itself in
    ``(0, min_count)``: no merging can hide it — drop the group or lower ``min_count``.
    """
    if min_count < 1:
        raise ConfigError(f"min_count must be >= 1, found {min_count}")
    cells = [counts.events] + ([counts.censored] if censored else [])
    stacked = np.concatenate(cells, axis=0)  # (c, m): every row must be 0 or >= min_count

    def ok(column: np.ndarray) -> bool:
        return bool(np.all((column == 0) | (column >= min_count)))

    if not ok(stacked.sum(axis=1)):
        raise DataError(
            f"some group has fewer than min_count={min_count} events"
            + (" or censorings" if censored else "")
            + " in total; no merging of intervals can release it: leave the group out or "
            "lower min_count"
        )
    # Sequential by nature (each decision depends on the last); the loop runs over grid
    # intervals, not rows.
    kept: list[int] = []
    sums: list[np.ndarray] = []
    running = np.zeros(stacked.shape[0], dtype=np.int64)
    for j in range(stacked.shape[1]):
        running = running + stacked[:, j]
        if ok(running):
            kept.append(j)
            sums.append(running)
            running = np.zeros_like(running)
    if kept and kept[-1] != stacked.shape[1] - 1:
        # the tail after the last closed interval: fold it into the intervals before it
        tail = running
        while kept and not ok(tail):
            kept.pop()
            tail = tail + sums.pop()
        kept.append(stacked.shape[1] - 1)
        sums.append(tail)
    return coarsen(counts, counts.grid[kept])
