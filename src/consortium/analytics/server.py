"""The server's half of an analysis: agree on a schema from the sites' profiles, then turn the
sums the sites answered into statistics.

Every statistic follows from sums, so the federated value equals the pooled one: counts and
contingency tables exactly; means and variances from ``Σ(x − c)`` and ``Σ(x − c)²`` with a
shift ``c`` inside the data's range (the textbook ``Σx² − (Σx)²/n`` loses digits far from 0;
Chan, Golub & LeVeque 1983); quantiles from histograms over agreed edges, reported with the
interval they are guaranteed to lie in (:func:`quantile`). A cell a site withheld makes every
total it enters unknown (``None``): the server never guesses a withheld count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from consortium.analytics.query import ColumnSpec, Query, Schema, histogram_edges
from consortium.analytics.site import Answer, Profile
from consortium.data._tables import sort_key
from consortium.errors import DataError

__all__ = ["QuantileEstimate", "agree", "combine", "quantile"]

QUARTILES = (0.5, 0.25, 0.75)


def agree(profiles: Sequence[Profile], query: Query) -> Schema:
    """Phase 1 at the server: each column's kind, categories and histogram edges.

    A column is categorical when the query says so, when some site holds text in it, or when
    every site holds integer codes with at most ``max_levels`` values; its categories are the
    union of those some site holds at least ``min_count`` times (rarer ones are "other").
    A numeric column's edges span the union of the sites' coarsened ranges.
    """
    answering = [p for p in profiles if p.answers]
    if not answering:
        raise DataError(
            f"no site can answer: every site's cohort is smaller than min_count = "
            f"{query.min_count}; widen the filter (analysis.where) or lower analysis.min_count"
        )
    names: dict[str, None] = dict.fromkeys(answering[0].numeric)
    for p in answering[1:]:
        if set(p.numeric) != set(names):
            odd = sorted(set(p.numeric) ^ set(names))[0]
            has, lacks = (p.site, answering[0].site) if odd in p.numeric else (answering[0].site, p.site)
            raise DataError(
                f"column {odd!r} is at site {has!r} but not at site {lacks!r}; give every site "
                "the same columns, rename them with a [rename] table in harmonize.toml, or "
                "list the shared ones in analysis.columns"
            )
    specs: dict[str, ColumnSpec] = {}
    notes: list[str] = []
    for name in names:
        numeric = all(p.numeric.get(name, True) for p in answering)
        levels = all(p.levels.get(name, True) for p in answering if p.numeric.get(name, True))
        categorical = name in query.categorical or not numeric or levels or name == query.group_by
        if categorical:
            cats: set[Any] = set()
            for p in answering:
                cats.update(p.categories.get(name, ()))
            specs[name] = ColumnSpec(name, "categorical", tuple(sorted(cats, key=sort_key)))
            continue
        ranges = [p.ranges[name] for p in answering if name in p.ranges]
        given = query.given_range(name)
        if given is not None:
            ranges = [given]
        if not ranges:
            notes.append(f"{name}: no site holds 2 × min_count values; no median or quartiles")
            specs[name] = ColumnSpec(name, "numeric")
            continue
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        edges = histogram_edges(low, high, query.bins)
        specs[name] = ColumnSpec(
            name, "numeric", edges=tuple(float(e) for e in edges),
            shift=float((edges[0] + edges[-1]) / 2),
        )
    groups = specs[query.group_by].categories if query.group_by else ()
    times: set[float] = set()
    for p in answering:
        times.update(p.survival_times)
    return Schema(query, specs, groups=tuple(groups), survival_times=tuple(sorted(times)),
                  notes=tuple(notes))


@dataclass(frozen=True)
class QuantileEstimate:
    """A quantile from histograms: ``value`` lies in ``[low, high]``, the interval the true
    (inverted-CDF) quantile of the pooled values is guaranteed to lie in; ``bound`` is
    ``high − low``, the largest possible error."""

    q: float
    value: float | None
    low: float | None
    high: float | None

    @property
    def bound(self) -> float | None:
        return None if self.low is None or self.high is None else self.high - self.low


def quantile(parts: Sequence[tuple[np.ndarray, np.ndarray]], edges: np.ndarray, q: float) -> QuantileEstimate:
    """The ``q``-quantile of the pooled values from each site's cumulative histogram.

    ``parts``: per site, ``(cdf, known)`` over ``len(edges) + 1`` points — ``cdf[i]`` the
    number of the site's values below edge ``i``, the last entry all its values — and
    ``known[i]`` whether the site released it (a coarsened histogram releases fewer). Where a
    site did not release a point, its count lies between the released points around it (0
    before the first); summing those bounds over sites brackets the pooled count ``C(e)``
    below each edge. The quantile ``Q`` (the ``⌈qn⌉``-th smallest value, numpy's
    ``inverted_cdf``) satisfies ``Q ≥ e`` where even the upper bound ``U(e) < qn``, and
    ``Q < e`` where the lower bound ``L(e) ≥ qn``: that is the bracket ``[low, high)``. Inside
    a single bin the estimate interpolates linearly; the bracket reaching past the first or
    last edge gives ``None`` for that end (and for the value).
    """
    points = len(edges) + 1
    lower = np.zeros(points)
    upper = np.zeros(points)
    idx = np.arange(points + 1)
    for cdf, known in parts:
        c = np.concatenate([[0.0], cdf])  # a point at -inf, always 0
        k = np.concatenate([[True], known])
        k[-1] = True
        prev = np.maximum.accumulate(np.where(k, idx, 0))
        nxt = np.minimum.accumulate(np.where(k, idx, points)[::-1])[::-1]
        lower += c[prev][1:]
        upper += c[nxt][1:]
    n = upper[-1]
    if not n > 0:
        return QuantileEstimate(q, None, None, None)
    target = q * n
    at_edges_lower, at_edges_upper = lower[:-1], upper[:-1]
    below = np.flatnonzero(at_edges_upper < target)
    above = np.flatnonzero(at_edges_lower >= target)
    lo = int(below.max()) if below.size else None
    hi = int(above.min()) if above.size else None
    a = float(edges[lo]) if lo is not None else None
    b = float(edges[hi]) if hi is not None else None
    if a is None or b is None:
        return QuantileEstimate(q, None, a, b)
    assert lo is not None and hi is not None
    c_lo = (lower[lo] + upper[lo]) / 2
    c_hi = (lower[hi] + upper[hi]) / 2
    if hi == lo + 1 and c_hi > c_lo:
        value = a + (target - c_lo) / (c_hi - c_lo) * (b - a)
    else:
        value = (a + b) / 2
    return QuantileEstimate(q, float(min(max(value, a), b)), a, b)


def _ints(a: np.ndarray) -> Any:
    """Counts as (nested lists of) ints, ``None`` for NaN (unknown)."""
    if a.ndim == 0:
        return None if math.isnan(float(a)) else int(round(float(a)))
    return [_ints(row) for row in a]


class _Totals:
    """Sums over a set of answers, with a key unknown when any site withheld it."""

    def __init__(self, answers: Sequence[Answer], query: Query) -> None:
        self.answers = list(answers)
        self.k = query.min_count
        self.secure = query.secure
        self.noisy = query.dp is not None
        self.values: dict[str, np.ndarray] = {}
        self.unknown: dict[str, np.ndarray] = {}
        for a in self.answers:
            for key, v in a.values.items():
                w = a.withheld[key]
                if key in self.values:
                    self.values[key] = self.values[key] + v
                    self.unknown[key] = self.unknown[key] | w
                else:
                    self.values[key] = v.copy()
                    self.unknown[key] = w.copy()

    def count(self, key: str) -> Any:
        """An int, a list of ints, or None where unknown — and, under secure aggregation,
        where the total itself is a small cell."""
        v, u = self.values[key], self.unknown[key].copy()
        if self.noisy:  # post-processing of noisy counts: whole and not negative
            v = np.maximum(np.round(v), 0)
        if self.secure and not self.noisy:
            u |= (v > 0) & (v < self.k)
        return _ints(np.where(u, np.nan, v))

    def known(self, key: str) -> bool:
        return not bool(self.unknown[key].any())

    def small_total(self, key: str) -> bool:
        v = float(self.values[key].sum())
        return self.secure and not self.noisy and 0 < v < self.k


def _numeric_column(t: _Totals, key: str, spec: ColumnSpec, quantiles: Sequence[float]) -> tuple[dict[str, Any], dict[str, Any]]:
    out: dict[str, Any] = {"mean": None, "sd": None, "median": None, "q1": None, "q3": None}
    bounds: dict[str, Any] = {}
    out["missing"] = t.count(f"{key}|missing")
    ok = all(t.known(f"{key}|{p}") for p in ("count", "s1", "s2"))
    count = float(t.values[f"{key}|count"])
    if t.noisy and count < 2:
        return out, bounds
    if ok and count > 0 and not t.small_total(f"{key}|count"):
        s1 = float(t.values[f"{key}|s1"])
        s2 = float(t.values[f"{key}|s2"])
        out["mean"] = spec.shift + s1 / count
        if count > 1:
            out["sd"] = math.sqrt(max((s2 - s1 * s1 / count) / (count - 1), 0.0))
        if spec.edges and t.noisy:  # quantiles of the noisy histogram: no guaranteed bracket
            edges = np.asarray(spec.edges)
            cdf = np.cumsum(np.maximum(t.values[f"{key}|hist"], 0))
            for name, q in zip(("median", "q1", "q3"), QUARTILES):
                out[name] = quantile([(cdf, np.ones(len(edges) + 1, dtype=bool))], edges, q).value
                bounds[name] = None
        elif spec.edges:
            edges = np.asarray(spec.edges)
            parts = [(a.values[f"{key}|cdf"], ~a.withheld[f"{key}|cdf"]) for a in t.answers]
            if t.secure:  # one exact total, every edge known
                parts = [(t.values[f"{key}|cdf"], np.ones(len(edges) + 1, dtype=bool))]
            for name, q in zip(("median", "q1", "q3"), QUARTILES):
                est = quantile(parts, edges, q)
                out[name] = est.value
                bounds[name] = est.bound
            for q in quantiles:
                est = quantile(parts, edges, q)
                bounds[f"q{q:g}"] = {"value": est.value, "low": est.low, "high": est.high}
    return out, bounds


def _categorical_column(t: _Totals, key: str, spec: ColumnSpec) -> dict[str, Any]:
    counts = t.count(f"{key}|counts")
    labels = [str(c) for c in spec.categories]
    out = dict(zip(labels, counts[:-1]))
    other = counts[-1]
    if other is None or other > 0:
        out["(other)"] = other
    return {"counts": out, "missing": t.count(f"{key}|missing")}


def _table(t: _Totals, group: str, schema: Schema, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    n = t.count(f"{group}|n")
    cols: dict[str, Any] = {}
    bounds: dict[str, Any] = {}
    for name in names:
        spec = schema.spec(name)
        key = f"{group}|{name}"
        if spec.kind == "numeric":
            cols[name], b = _numeric_column(t, key, spec, schema.query.quantiles)
            if b:
                bounds[name] = b
        else:
            cols[name] = _categorical_column(t, key, spec)
    return {"n": n, "columns": cols}, bounds


def combine(answers: Sequence[Answer], schema: Schema, names: Sequence[str]) -> dict[str, Any]:
    """Phase 2 at the server: the analysis (``analysis.json``'s content) from the answers."""
    q = schema.query
    total = _Totals(answers, q)
    overall, overall_bounds = _table(total, "all", schema, names)
    result: dict[str, Any] = {"table1": {"overall": overall, "sites": {}}}
    bounds: dict[str, Any] = {"overall": overall_bounds, "sites": {}}
    if not q.secure:
        for a in answers:
            one = _Totals([a], q)
            result["table1"]["sites"][a.site], bounds["sites"][a.site] = _table(one, "all", schema, names)
    if q.group_by:
        tables = {}
        for g, value in enumerate(schema.groups):
            tables[str(value)], _ = _table(total, f"g{g}", schema, names)
        result["groups"] = {"column": q.group_by, "tables": tables}
    result["quantile_bounds"] = bounds
    if q.histograms:
        result["histograms"] = {name: _histogram(total, schema, name) for name in q.histograms}
    if q.crosstabs:
        result["crosstabs"] = [_crosstab(total, schema, a, b) for a, b in q.crosstabs]
    if q.correlation:
        result["correlation"] = _correlation(total, list(q.correlation))
    if q.survival is not None:
        result["survival"] = _survival(total, schema)
    result["schema"] = {
        name: ({"kind": "categorical", "categories": [str(c) for c in s.categories]}
               if s.kind == "categorical" else
               {"kind": "numeric", "range": [s.edges[0], s.edges[-1]] if s.edges else None,
                "bins": len(s.edges) - 1 if s.edges else 0})
        for name, s in schema.columns.items()
    }
    result["notes"] = list(schema.notes)
    return result


def _histogram(t: _Totals, schema: Schema, name: str) -> dict[str, Any]:
    """Counts between the edges every site released (all edges under secure aggregation or
    DP), first and last bin open-ended; under secure aggregation adjacent bins of the total
    are merged until each holds 0 or at least ``min_count``."""
    spec = schema.spec(name)
    if spec.kind != "numeric" or not spec.edges:
        raise DataError(f"analysis.histograms: {name!r} is not a numeric column with a range")
    key = f"all|{name}"
    edges = np.asarray(spec.edges)
    if t.noisy:
        counts = np.maximum(np.round(t.values[f"{key}|hist"]), 0)
        return {"edges": edges.tolist(), "counts": counts.astype(int).tolist(), "open_ends": True}
    cdf = t.values[f"{key}|cdf"]
    known = ~t.unknown[f"{key}|cdf"] if not t.secure else np.ones(cdf.size, dtype=bool)
    if t.secure:
        from consortium.analytics.site import _coarsen

        known = _coarsen(np.diff(cdf, prepend=0.0), t.k)
    points = np.flatnonzero(known)  # point i: values below edge i (the last: all values)
    if points.size == 0:
        return {"edges": [], "counts": [], "withheld": True}
    kept = points[points < edges.size]
    counts = np.diff(np.concatenate([[0.0], cdf[points]]))
    bounds_out = [None] + [float(edges[i]) for i in kept] + ([None] if points[-1] == edges.size else [])
    return {"edges": bounds_out, "counts": [int(round(c)) for c in counts], "open_ends": True}


def _crosstab(t: _Totals, schema: Schema, a: str, b: str) -> dict[str, Any]:
    sa, sb = schema.spec(a), schema.spec(b)
    return {
        "rows": a, "columns": b,
        "row_values": [str(c) for c in sa.categories] + ["(other)"],
        "column_values": [str(c) for c in sb.categories] + ["(other)"],
        "counts": t.count(f"xt|{a}|{b}"),
    }


def _correlation(t: _Totals, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"columns": names, "n": t.count("corr|n"), "covariance": None,
                           "correlation": None}
    if not (t.known("corr|n") and t.known("corr|s1") and t.known("corr|s2")):
        return out
    n = float(t.values["corr|n"])
    if n < 2 or t.small_total("corr|n"):
        return out
    s1 = t.values["corr|s1"]
    s2 = t.values["corr|s2"]
    cov = (s2 - np.outer(s1, s1) / n) / (n - 1)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd, sd)
    out["covariance"] = cov.tolist()
    out["correlation"] = [[None if not math.isfinite(v) else float(v) for v in row] for row in corr]
    return out


def _survival(t: _Totals, schema: Schema) -> dict[str, Any]:
    """Kaplan–Meier per group and the log-rank test, on the times every site released."""
    from consortium.analytics import survival as sv

    q = schema.query
    assert q.survival is not None
    grid = np.asarray(schema.survival_times, dtype=np.float64)
    group_col = q.survival[2]
    groups = schema.spec(group_col).categories if group_col else ("all",)
    common = np.ones(grid.size, dtype=bool)
    for a in t.answers:
        if a.withheld["surv|beyond"].any():
            return {"withheld": True, "note": f"site {a.site!r} withheld its counts: a group "
                    "has fewer than min_count events there"}
        common &= ~a.withheld["surv|events"].any(axis=0)
    parts = []
    for a in t.answers:
        counts = sv.SurvivalCounts(
            grid, tuple(groups), a.values["surv|events"].astype(np.int64),
            a.values["surv|censored"].astype(np.int64), a.values["surv|beyond"].astype(np.int64),
            int(a.values["surv|missing"]),
        )
        parts.append(sv.coarsen(counts, grid[common]))
    total = sv.sum_counts(parts)
    if t.secure:  # the total's own small cells are merged away before release
        total = sv.merge_small_intervals(total, t.k, censored=True)
    km = sv.kaplan_meier(total)

    def finite(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    out: dict[str, Any] = {
        "time": total.grid.tolist(),
        "groups": [str(g) for g in groups],
        "survival": km.survival.tolist(),
        "ci_lower": km.ci_lower.tolist(),
        "ci_upper": km.ci_upper.tolist(),
        "at_risk": km.at_risk.tolist(),
        "median": [finite(m) for m in km.median],
        "note": "times are rounded up to the agreed grid (two significant digits, kept where "
                "at least min_count rows share a time); each curve is the exact Kaplan–Meier "
                "estimate of the rounded times",
    }
    if len([g for g, n in zip(groups, total.total) if n > 0]) >= 2:
        lr = sv.logrank(total)
        out["logrank"] = {"chi2": lr.chi2, "dof": lr.dof, "p_value": lr.p_value}
    return out
