"""What a site computes for a query, and what it withholds (disclosure control) before anything
leaves it.

The rules, applied here at the site, whoever asks (DataSHIELD's disclosure settings are the
model: ``nfilter.tab``, ``nfilter.subset``):

- every released count is 0 or at least ``min_count``; a smaller one is withheld (``null``), or
  the query is refused when ``suppress = "refuse"``;
- a cohort or group smaller than ``min_count`` releases nothing but that fact;
- means and variances are released only over at least ``min_count`` values;
- no minimum or maximum of raw values: the range a site shares is its ``min_count``-th smallest
  and largest value rounded outward to two significant digits of their distance
  (:func:`~consortium.analytics.query.coarse_range`);
- a histogram is coarsened until every released bin holds 0 or at least ``min_count`` values
  (adjacent bins merged); the server's quantiles then carry the merged bins' width as their
  error bound;
- under secure aggregation (``Query.secure``) the site's sums are seen by no one, only their
  total across sites: the site withholds nothing itself and the server applies the same rules
  to the totals.

Everything is whole-column numpy/pyarrow work: no Python loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from consortium.analytics.query import ColumnSpec, Query, Schema, coarse_ceil, coarse_range
from consortium.data._tables import Table, label_codes, numbers, sort_key
from consortium.errors import DataError

__all__ = ["Answer", "DisclosureError", "Profile", "SiteData", "describe", "profile"]


class DisclosureError(DataError):
    """A site refused a query that would release a count below its minimum."""


@dataclass
class Profile:
    """Phase 1: what a site says about its columns (no single record's value)."""

    site: str
    n: int | None  # the cohort's size; None when below min_count or under secure aggregation
    answers: bool = True  # whether the site takes part in phase 2
    numeric: dict[str, bool] = field(default_factory=dict)
    levels: dict[str, bool] = field(default_factory=dict)  # integer codes, ≤ max_levels values
    categories: dict[str, list[Any]] = field(default_factory=dict)  # each held ≥ min_count times
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    survival_times: list[float] = field(default_factory=list)


@dataclass
class Answer:
    """Phase 2: a site's sums (float64 arrays) and which entries it withheld."""

    site: str
    values: dict[str, np.ndarray] = field(default_factory=dict)
    withheld: dict[str, np.ndarray] = field(default_factory=dict)

    def put(self, key: str, value: Any, withheld: Any = False) -> None:
        v = np.asarray(value, dtype=np.float64)
        w = np.broadcast_to(np.asarray(withheld, dtype=bool), v.shape).copy()
        self.values[key] = np.where(w, 0.0, v)
        self.withheld[key] = w


class SiteData:
    """A site's table with the query's cohort filter applied, its columns read once."""

    def __init__(self, table: Table, query: Query, *, budget: Any = None) -> None:
        self.site = table.site
        self.query = query
        self.budget = budget  # a consortium.analytics.dp.Budget, charged before a DP answer
        if query.bands:
            table = _with_bands(table, query.bands)
        wanted = list(query.columns) or [c for c in table.names]
        for name in (*wanted, *query.needed()):
            if name not in table.columns:
                raise DataError(
                    f"site {table.site!r} has no column {name!r}; its columns are "
                    f"{', '.join(table.names)} (check [analysis] columns, or harmonise the names "
                    "with a [rename] table in harmonize.toml)"
                )
        self.names = wanted
        mask = np.ones(table.rows, dtype=bool)
        if query.where:
            from consortium.analytics.expr import evaluate, parse

            mask = np.asarray(evaluate(parse(query.where), table.columns, table.rows), dtype=bool)
        self._mask = mask
        self._table = table
        self.n = int(mask.sum())
        self._numbers: dict[str, np.ndarray | None] = {}
        self._codes: dict[str, tuple[np.ndarray, list[Any]]] = {}

    def numbers(self, name: str) -> np.ndarray | None:
        if name not in self._numbers:
            full = numbers(self._table.columns[name])
            self._numbers[name] = None if full is None else full[self._mask]
        return self._numbers[name]

    def codes(self, name: str) -> tuple[np.ndarray, list[Any]]:
        """Each cohort row's index into the column's distinct values (-1 missing), and the
        values (``"1"``, 1 and 1.0 are one value)."""
        if name not in self._codes:
            codes, keys = label_codes(self._table.columns[name])
            self._codes[name] = (codes[self._mask], keys)
        return self._codes[name]

    def missing(self, name: str) -> np.ndarray:
        x = self.numbers(name)
        if x is not None:
            return np.isnan(x)
        return self.codes(name)[0] < 0


def band_labels(edges: tuple[float, ...]) -> list[str]:
    """``"<e0"``, ``"e0-e1'"`` (with ``e1' = e1 − 1`` for integer edges), …, ``">=eK"``."""
    def show(v: float) -> str:
        return f"{v:g}"

    labels = [f"<{show(edges[0])}"]
    for a, b in zip(edges, edges[1:]):
        upper = b - 1 if float(a).is_integer() and float(b).is_integer() else b
        labels.append(f"{show(a)}-{show(upper)}")
    labels.append(f">={show(edges[-1])}")
    return labels


def _with_bands(table: Table, bands: tuple[tuple[str, tuple[float, ...]], ...]) -> Table:
    """``table`` with a ``<column>_band`` text column per band spec (missing stays missing)."""
    import pyarrow as pa

    columns = dict(table.columns)
    names = list(table.names)
    for column, edges in bands:
        if column not in columns:
            raise DataError(f"site {table.site!r} has no column {column!r} to band")
        x = numbers(columns[column])
        if x is None:
            raise DataError(f"site {table.site!r}: column {column!r} holds text; bands need numbers")
        labels = np.array(band_labels(edges) + [None], dtype=object)
        idx = np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right")
        idx[np.isnan(x)] = len(labels) - 1
        name = f"{column}_band"
        columns[name] = pa.array(labels[idx], pa.string())
        if name not in names:
            names.append(name)
    return Table(table.path, table.site, names, columns, table.where)


def _small(counts: np.ndarray, k: int) -> np.ndarray:
    return (counts > 0) & (counts < k)


def profile(data: SiteData) -> Profile:
    """Phase 1 at a site (see :mod:`consortium.analytics.query`)."""
    q = data.query
    k = q.min_count
    if q.secure:  # no per-site count leaves the site: its cohort enters the secure total
        prof = Profile(data.site, None, answers=True)
    else:
        small = 0 < data.n < k
        prof = Profile(data.site, None if small else data.n, answers=not small)
        if small:
            _refuse_or_note(q, data.site, f"its cohort has {data.n} rows, fewer than {k}")
            return prof
    for name in dict.fromkeys([*data.names, *q.needed()]):
        x = data.numbers(name)
        prof.numeric[name] = x is not None
        if x is not None:
            present = x[~np.isnan(x)]
            integer = bool(np.all(np.isfinite(present)) and np.all(present == np.round(present)))
            prof.levels[name] = integer and np.unique(present).size <= q.max_levels
            if present.size >= 2 * k and np.all(np.isfinite(present)):
                part = np.partition(present, (k - 1, present.size - k))
                prof.ranges[name] = coarse_range(float(part[k - 1]), float(part[present.size - k]))
        if x is None or prof.levels.get(name) or name in q.categorical or name == q.group_by:
            codes, keys = data.codes(name)
            counts = np.bincount(codes[codes >= 0], minlength=len(keys))
            prof.categories[name] = sorted((keys[i] for i in np.flatnonzero(counts >= k)),
                                           key=sort_key)
    if q.survival is not None:
        prof.survival_times = _survival_times(data, q)
    return prof


def _survival_times(data: SiteData, q: Query) -> list[float]:
    """The distinct times at which at least ``min_count`` of the site's patients have an event
    or are censored, rounded to two significant digits (the grid the curves are drawn on)."""
    assert q.survival is not None
    t = data.numbers(q.survival[0])
    if t is None:
        raise DataError(
            f"site {data.site!r}: survival_time column {q.survival[0]!r} holds text; it must "
            "hold numbers (the time to the event or to censoring)"
        )
    t = t[np.isfinite(t)]
    distinct, inverse = np.unique(t, return_inverse=True)
    rounded = np.array([coarse_ceil(float(v)) for v in distinct], dtype=np.float64)[inverse]
    values, counts = np.unique(rounded, return_counts=True)
    return [float(v) for v in values[counts >= q.min_count]]


def describe(data: SiteData, schema: Schema) -> Answer:
    """Phase 2 at a site: every sum the schema asks for, with small cells withheld (unless the
    query is secure, when only the total across sites is ever seen)."""
    q = schema.query
    k = q.min_count
    names = list(q.columns) if q.columns else data.names
    guard = not q.secure and q.dp is None
    if q.dp is not None:  # refuse before computing anything past the budget
        if data.budget is None:
            raise DataError(
                f"site {data.site!r} has no privacy budget set up; a DP query needs one "
                "(its policy's max_epsilon and a ledger)"
            )
        data.budget.charge(q.dp, f"analysis of {', '.join(names)}")
    ans = Answer(data.site)
    groups: list[tuple[str, np.ndarray]] = [("all", np.ones(data.n, dtype=bool))]
    if q.group_by:
        codes, keys = data.codes(q.group_by)
        index = {key: i for i, key in enumerate(keys)}
        for g, value in enumerate(schema.groups):
            i = index.get(value, -2)
            groups.append((f"g{g}", codes == i))
    for gname, mask in groups:
        n = int(mask.sum())
        small_n = guard and 0 < n < k
        ans.put(f"{gname}|n", n, small_n)
        if small_n:
            _refuse_or_note(q, data.site, f"group {gname} has {n} rows, fewer than {k}")
        for name in names:
            spec = schema.spec(name)
            key = f"{gname}|{name}"
            if small_n:
                _withhold_column(ans, key, spec)
                continue
            if spec.kind == "numeric":
                _numeric(ans, key, data, name, spec, mask, k, guard, q)
            else:
                _categorical(ans, key, data, name, spec, mask, k, guard, q)
    for a, b in q.crosstabs:
        _crosstab(ans, data, schema.spec(a), schema.spec(b), k, guard, q)
    if q.correlation:
        _correlation(ans, data, [schema.spec(c) for c in q.correlation], k, guard, q)
    if q.survival is not None:
        _survival(ans, data, schema, k, guard, q)
    if q.dp is not None:
        from consortium.analytics.dp import privatize
        from consortium.privacy.randomness import SystemRandomness

        privatize(ans, schema, q.dp, SystemRandomness())  # the site's own OS randomness
    return ans


def _refuse_or_note(q: Query, site: str, why: str) -> None:
    if q.suppress == "refuse" and not q.secure:
        raise DisclosureError(
            f"site {site!r} refuses the query: {why} (min_count = {q.min_count}); widen the "
            "cohort, merge categories, or let small cells be suppressed (suppress = \"suppress\")"
        )


def _withhold_column(ans: Answer, key: str, spec: ColumnSpec) -> None:
    if spec.kind == "numeric":
        for part in ("count", "s1", "s2", "missing"):
            ans.put(f"{key}|{part}", 0.0, True)
        if spec.edges:
            ans.put(f"{key}|cdf", np.zeros(len(spec.edges) + 1), True)
    else:
        ans.put(f"{key}|counts", np.zeros(len(spec.categories) + 1), True)
        ans.put(f"{key}|missing", 0.0, True)


def _numeric(
    ans: Answer, key: str, data: SiteData, name: str, spec: ColumnSpec, mask: np.ndarray,
    k: int, guard: bool, q: Query,
) -> None:
    x = data.numbers(name)
    if x is None:  # text here although numeric elsewhere: the schema check names it
        raise DataError(
            f"site {data.site!r}: column {name!r} holds text, but it is numeric at the other "
            "sites; map its codes with harmonize.toml or list it in analysis.categorical"
        )
    x = x[mask]
    present = x[~np.isnan(x)]
    if q.dp is not None and spec.edges:  # bounded contributions: clamp to the public bounds
        present = np.clip(present, spec.edges[0], spec.edges[-1])
    count = present.size
    missing = x.size - count
    few = guard and 0 < count < k
    if few:
        _refuse_or_note(q, data.site, f"column {name!r} has {count} values, fewer than {k}")
    ans.put(f"{key}|count", count, few)
    d = present - spec.shift
    ans.put(f"{key}|s1", d.sum(), few)
    ans.put(f"{key}|s2", (d * d).sum(), few)
    small_missing = guard and _small(np.array(missing), k)
    if small_missing:
        _refuse_or_note(q, data.site, f"column {name!r} has {missing} missing values")
    ans.put(f"{key}|missing", missing, small_missing)
    if spec.edges:
        edges = np.asarray(spec.edges)
        # bin 0: below the first edge; bin i: [e(i-1), e(i)); the last: at or above the last edge
        hist = np.bincount(np.searchsorted(edges, present, side="right"), minlength=edges.size + 1)
        if q.dp is not None:  # one row changes one bin (a cumulative count would move many)
            ans.put(f"{key}|hist", hist)
            return
        cdf = np.cumsum(hist).astype(np.float64)  # cdf[i] = values below e(i); cdf[-1] = all
        known = np.ones(cdf.size, dtype=bool) if not guard else _coarsen(hist, k)
        ans.put(f"{key}|cdf", cdf, (~known) | few)


def _coarsen(hist: np.ndarray, k: int) -> np.ndarray:
    """Which cumulative counts (one at the end of each bin) a site may release: adjacent bins
    are merged left to right until each merged bin holds at least ``k`` values; what is left
    at the end joins the last merged bin. A cumulative count of 0 or of every value releases
    nothing about any record and is always given."""
    known = np.zeros(hist.size, dtype=bool)
    total = 0
    last = -1
    for i, c in enumerate(hist):  # one pass over the bins (≤ 100,002), not over rows
        total += int(c)
        if total >= k:
            known[i] = True
            last = i
            total = 0
    if total and last >= 0:  # the leftover (< k) merges into the last released bin
        known[last] = False
    cdf = np.cumsum(hist)
    known |= (cdf == 0) | (cdf == cdf[-1])
    return known


def _categorical(
    ans: Answer, key: str, data: SiteData, name: str, spec: ColumnSpec, mask: np.ndarray,
    k: int, guard: bool, q: Query,
) -> None:
    codes = _agreed_codes(data, name, spec)[mask]
    counts = np.bincount(codes[codes >= 0], minlength=len(spec.categories) + 1).astype(float)
    missing = float((codes == -1).sum())
    small = guard & _small(counts, k)
    if small.any():
        which = [str(c) for c, s in zip((*spec.categories, "other"), small) if s]
        _refuse_or_note(q, data.site, f"column {name!r} has fewer than {k} rows at {which}")
    ans.put(f"{key}|counts", counts, small)
    small_missing = guard and _small(np.array(missing), k)
    if small_missing:
        _refuse_or_note(q, data.site, f"column {name!r} has {int(missing)} missing values")
    ans.put(f"{key}|missing", missing, small_missing)


def _agreed_codes(data: SiteData, name: str, spec: ColumnSpec) -> np.ndarray:
    """Each cohort row's index into the agreed categories; ``len(categories)`` for a value not
    among them ("other"), -1 for missing."""
    codes, keys = data.codes(name)
    index = {v: i for i, v in enumerate(spec.categories)}
    lookup = np.array([index.get(v, len(spec.categories)) for v in keys] + [-1], dtype=np.int64)
    return lookup[np.where(codes < 0, len(keys), codes)]


def _crosstab(
    ans: Answer, data: SiteData, a: ColumnSpec, b: ColumnSpec, k: int, guard: bool, q: Query
) -> None:
    for spec in (a, b):
        if spec.kind != "categorical":
            raise DataError(
                f"analysis.crosstabs: column {spec.name!r} is numeric; cross-tabulate "
                "categorical columns (or list it in analysis.categorical)"
            )
    ca = _agreed_codes(data, a.name, a)
    cb = _agreed_codes(data, b.name, b)
    both = (ca >= 0) & (cb >= 0)
    width = len(b.categories) + 1
    cells = np.bincount(ca[both] * width + cb[both], minlength=(len(a.categories) + 1) * width)
    table = cells.reshape(len(a.categories) + 1, width).astype(float)
    small = guard & _small(table, k)
    if small.any():
        _refuse_or_note(q, data.site, f"crosstab {a.name}*{b.name} has cells below {k}")
    ans.put(f"xt|{a.name}|{b.name}", table, small)


def _correlation(
    ans: Answer, data: SiteData, specs: list[ColumnSpec], k: int, guard: bool, q: Query
) -> None:
    cols = []
    for spec in specs:
        x = data.numbers(spec.name)
        if x is None or spec.kind != "numeric":
            raise DataError(
                f"analysis.correlation: column {spec.name!r} is not numeric at site "
                f"{data.site!r}; correlate numeric columns"
            )
        cols.append(x - spec.shift)
    m = np.column_stack(cols)
    m = m[~np.isnan(m).any(axis=1)]
    few = guard and 0 < len(m) < k
    if few:
        _refuse_or_note(q, data.site, f"only {len(m)} complete rows for the correlation")
    ans.put("corr|n", len(m), few)
    ans.put("corr|s1", m.sum(axis=0), few)
    ans.put("corr|s2", m.T @ m, few)


def nested_points(size: int, level: int) -> np.ndarray:
    """The grid indices kept at coarsening ``level``: every ``2**level``-th time and the last.
    The levels nest, so sites at different levels still share the coarser one's times."""
    step = 1 << level
    idx = np.arange(step - 1, size, step)
    return np.union1d(idx, [size - 1]) if size else idx


def _survival_level(counts: Any, k: int, sv: Any) -> int | None:
    """The finest nested level at which every released count (events and censorings, each
    group and time) is 0 or at least ``k``; None if none is (a group too small)."""
    size = counts.grid.size
    level = 0
    while True:
        keep = nested_points(size, level)
        c = sv.coarsen(counts, counts.grid[keep])
        if not sv.small_cells(c, k, censored=True).any():
            return level
        if keep.size <= 1:
            return None
        level += 1


def _survival(ans: Answer, data: SiteData, schema: Schema, k: int, guard: bool, q: Query) -> None:
    """Events and censorings per group at the agreed times (rounded up to them). Outside
    secure aggregation the site coarsens its grid to the finest of a fixed ladder of nested
    grids (every time, every 2nd, every 4th … and the last) at which every released count is 0
    or at least ``min_count``, and marks the times it dropped as withheld; the server sums the
    sites on the coarsest grid any of them needed, which every site's grid contains."""
    from consortium.analytics import survival as sv

    assert q.survival is not None
    time_col, event_col, group_col = q.survival
    t = data.numbers(time_col)
    if t is None:
        raise DataError(
            f"site {data.site!r}: survival_time column {time_col!r} holds text; it must hold "
            "numbers (the time to the event or to censoring)"
        )
    codes, keys = data.codes(event_col)
    event = np.array([*keys, None], dtype=object)[np.where(codes < 0, len(keys), codes)]
    grid = np.asarray(schema.survival_times, dtype=np.float64)
    if group_col:
        spec = schema.spec(group_col)
        if spec.kind != "categorical":
            raise DataError(
                f"analysis.survival_group {group_col!r} is numeric; group by a categorical "
                "column (or list it in analysis.categorical)"
            )
        labels = np.array([*spec.categories, None], dtype=object)
        agreed = _agreed_codes(data, group_col, spec)  # "other" and missing: left out
        group = labels[np.where((agreed < 0) | (agreed >= len(spec.categories)),
                                len(spec.categories), agreed)]
        counts = sv.site_counts(t, event, grid, group=group, groups=spec.categories)
    else:
        counts = sv.site_counts(t, event, grid)
    known = np.ones(grid.size, dtype=bool)
    withhold_all = False
    if guard:
        level = _survival_level(counts, k, sv)
        if level is None:
            withhold_all = True
            _refuse_or_note(q, data.site, "a group has fewer than min_count events or censorings")
        else:
            known = np.isin(np.arange(grid.size), nested_points(grid.size, level))
            merged = sv.coarsen(counts, grid[known])
            events = np.zeros_like(counts.events)
            censored = np.zeros_like(counts.censored)
            events[:, known] = merged.events
            censored[:, known] = merged.censored
            counts = sv.SurvivalCounts(grid, counts.groups, events, censored, merged.beyond,
                                       merged.missing)
    hidden = np.broadcast_to(~known, counts.events.shape) | withhold_all
    ans.put("surv|events", counts.events, hidden)
    ans.put("surv|censored", counts.censored, hidden)
    ans.put("surv|beyond", counts.beyond, withhold_all)
    ans.put("surv|missing", counts.missing, withhold_all or (guard and 0 < counts.missing < k))
