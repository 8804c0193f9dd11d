"""Differential privacy for released statistics: noise added at each site, charged to its budget.

**The mechanism.** Under DP every sum a site releases is a sum over its rows of a bounded
contribution, once normalised: a row adds 1 to its group's count, to one cell of each
categorical column (a category, "other" or missing), to each numeric column's count-or-missing
and one histogram bin, and ``(x − c)/R`` and ``((x − c)/R)²`` (at most 1, values clamped to the
public bounds, ``R`` half their width) to the column's sums. Adding or removing one row
therefore changes at most ``K`` normalised statistics by at most 1 each (:func:`touched`):
L2 sensitivity ``√K``, L1 sensitivity ``K``. The site adds to every normalised statistic
Gaussian noise of standard deviation ``z·√K`` with the noise multiplier ``z`` calibrated by
dp-accounting for ``(ε, δ)`` (the Gaussian mechanism, Dwork & Roth 2014 §3.5.3; RDP
accounting, Mironov 2017), or Laplace noise of scale ``K/ε`` (pure ε-DP, Dwork et al. 2006),
then scales back (``R``, ``R²``). Everything the server computes from the noisy sums (means,
variances, quantiles, rounding counts to integers) is post-processing.

**Who is protected from whom.** The noise is drawn by the site from its own OS CSPRNG
(:class:`~consortium.privacy.randomness.SystemRandomness`) before anything leaves it: each
site's rows are (ε, δ)-DP per query against the server, the analyst and the other sites,
whatever they do. Nothing data-dependent is released outside the noise: the schema (bounds,
categories) must be public (declared in ``[analysis]``), and under DP no cell is suppressed
(suppressing on a true count would itself leak it; the noise protects small cells).

**The budget.** Each site keeps a ledger of its releases (``[analysis] ledger``: one JSON
file with a list per site) and refuses a query that would take its total, composed by
dp-accounting's RDP accountant at its policy's δ, past its policy's ``max_epsilon``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from consortium.analytics.query import ColumnSpec, Query, Schema, histogram_edges
from consortium.data._tables import label_key, sort_key
from consortium.errors import ConfigError, DataError

__all__ = [
    "Budget", "NoisePlan", "declared_schema", "noise_sd", "parse_bounds", "parse_categories",
    "plan_noise", "privatize", "spent", "touched",
]


class BudgetError(DataError):
    """A site refused a query that would take its privacy budget past its maximum."""


@dataclass(frozen=True)
class NoisePlan:
    """The noise of one query, the same at every site.

    ``sigma`` is the standard deviation added to every normalised statistic (for Laplace,
    ``√2 × scale``); ``noise_multiplier`` is ``z`` (Gaussian) or ``scale / K`` (Laplace): the
    noise per unit of sensitivity, what the accountant composes."""

    mechanism: Literal["gaussian", "laplace"]
    epsilon: float
    delta: float
    statistics: int
    noise_multiplier: float

    @property
    def scale(self) -> float:
        """The Gaussian's standard deviation, or the Laplace scale ``b``."""
        if self.mechanism == "gaussian":
            return self.noise_multiplier * math.sqrt(self.statistics)
        return self.noise_multiplier * self.statistics

    @property
    def sigma(self) -> float:
        return self.scale if self.mechanism == "gaussian" else math.sqrt(2) * self.scale

    def event(self) -> Any:
        import dp_accounting as dp

        if self.mechanism == "gaussian":
            return dp.GaussianDpEvent(self.noise_multiplier)
        return dp.LaplaceDpEvent(self.noise_multiplier)


def parse_bounds(entries: Sequence[str]) -> dict[str, tuple[float, float]]:
    """``["age: 0, 120"]`` → ``{"age": (0.0, 120.0)}``."""
    out: dict[str, tuple[float, float]] = {}
    for text in entries:
        name, sep, rest = str(text).partition(":")
        parts = [p.strip() for p in rest.split(",")]
        try:
            lo, hi = (float(p) for p in parts)
        except ValueError:
            lo, hi = math.nan, math.nan
        if not sep or not name.strip() or not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(
                f"analysis.bounds entry {text!r}: write \"column: low, high\" with two finite "
                "numbers, low < high (public bounds, e.g. \"age: 0, 120\")"
            )
        out[name.strip()] = (lo, hi)
    return out


def parse_categories(entries: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """``["sex: 0, 1", "smoker: yes, no"]`` → ``{"sex": (0, 1), "smoker": ("no", "yes")}``."""
    out: dict[str, tuple[Any, ...]] = {}
    for text in entries:
        name, sep, rest = str(text).partition(":")
        values = [p.strip() for p in rest.split(",") if p.strip()]
        if not sep or not name.strip() or not values:
            raise ConfigError(
                f"analysis.categories entry {text!r}: write \"column: a, b, c\" (the public "
                "list of its values, e.g. \"sex: 0, 1\")"
            )
        out[name.strip()] = tuple(sorted({label_key(v) for v in values}, key=sort_key))
    return out


def declared_schema(query: Query, bounds: Mapping[str, tuple[float, float]],
                    categories: Mapping[str, tuple[Any, ...]], names: Sequence[str]) -> Schema:
    """The schema from public declarations alone (no site is asked: the profile phase would
    release data-dependent facts outside the noise)."""
    wanted = list(query.columns) or [n for n in names if n in bounds or n in categories]
    missing = [n for n in (*wanted, *query.needed()) if n not in bounds and n not in categories]
    if missing:
        raise ConfigError(
            f"under differential privacy every column needs public bounds or categories; "
            f"{', '.join(repr(m) for m in dict.fromkeys(missing))} has neither. Declare "
            "analysis.bounds = [\"age: 0, 120\"] (numeric) or analysis.categories = "
            "[\"sex: 0, 1\"] (categorical), or leave the column out of analysis.columns"
        )
    if query.survival is not None:
        raise ConfigError(
            "Kaplan–Meier curves under differential privacy are not available; run the "
            "survival query without analysis.epsilon"
        )
    specs: dict[str, ColumnSpec] = {}
    for name in dict.fromkeys([*wanted, *query.needed()]):
        if name in categories:
            specs[name] = ColumnSpec(name, "categorical", categories[name])
        else:
            lo, hi = bounds[name]
            edges = histogram_edges(lo, hi, query.bins)
            specs[name] = ColumnSpec(name, "numeric", edges=tuple(float(e) for e in edges),
                                     shift=(lo + hi) / 2)
    for name in (query.group_by, *[c for p in query.crosstabs for c in p]):
        if name and specs[name].kind != "categorical":
            raise ConfigError(f"{name!r} is grouped or cross-tabulated: declare its categories")
    groups = specs[query.group_by].categories if query.group_by else ()
    return Schema(query, specs, groups=tuple(groups))


def touched(schema: Schema, names: Sequence[str]) -> int:
    """``K``: how many normalised statistics one row can change (each by at most 1)."""
    q = schema.query
    per_group = 1 + sum(4 if schema.spec(n).kind == "numeric" else 1 for n in names)
    groups = 2 if q.group_by else 1
    p = len(q.correlation)
    corr = 1 + p + p * p if p else 0
    return groups * per_group + len(q.crosstabs) + corr


def plan_noise(schema: Schema, names: Sequence[str], *, epsilon: float, delta: float,
               mechanism: Literal["gaussian", "laplace"]) -> NoisePlan:
    """The noise for ``(ε, δ)`` (Gaussian: ``z`` by dp-accounting; Laplace: ``1/ε`` per unit)."""
    k = touched(schema, names)
    if mechanism == "laplace":
        return NoisePlan("laplace", epsilon, 0.0, k, 1.0 / epsilon)
    from consortium.privacy.accountant import calibrate_noise

    z = calibrate_noise(epsilon, delta, 1, amplified=False)
    return NoisePlan("gaussian", epsilon, delta, k, z)


def _radius(spec: ColumnSpec) -> float:
    return (spec.edges[-1] - spec.edges[0]) / 2


def _unit(key: str, schema: Schema) -> np.ndarray | float:
    """The normalising factor of an answer key (what one row adds at most)."""
    parts = key.split("|")
    if parts[0] == "corr":
        radii = np.array([_radius(schema.spec(c)) for c in schema.query.correlation])
        if parts[1] == "s1":
            return radii
        return np.outer(radii, radii) if parts[1] == "s2" else 1.0
    if parts[0] == "xt" or len(parts) < 3:
        return 1.0
    spec = schema.spec(parts[1])
    if spec.kind == "numeric":
        r = _radius(spec)
        return {"s1": r, "s2": r * r}.get(parts[2], 1.0)
    return 1.0


def privatize(answer: Any, schema: Schema, plan: NoisePlan, randomness: Any) -> None:
    """Add the plan's noise to every value of a site's ``answer`` in place (normalised units,
    from the site's own ``randomness``)."""
    for key, value in answer.values.items():
        n = value.size
        if plan.mechanism == "gaussian":
            z = randomness.gaussian(n).double().numpy() * plan.scale
        else:
            u = randomness.uniform(n).double().numpy() - 0.5
            z = -plan.scale * np.sign(u) * np.log1p(-2 * np.abs(u))
        answer.values[key] = value + z.reshape(value.shape) * _unit(key, schema)


def noise_sd(schema: Schema, plan: NoisePlan, names: Sequence[str], sites: int,
             result: Mapping[str, Any]) -> dict[str, Any]:
    """The standard deviation of the noise in each released total (``sites`` sites each add
    their own), and, to first order, in each mean."""
    total = plan.sigma * math.sqrt(sites)
    cols: dict[str, Any] = {}
    overall = result["table1"]["overall"]
    for name in names:
        spec = schema.spec(name)
        if spec.kind != "numeric":
            cols[name] = {"count": total}
            continue
        r = _radius(spec)
        c = overall["columns"][name]
        n = max(float(overall["n"] or 0) - float(c["missing"] or 0), 1.0)
        mean_dev = abs((c["mean"] if c["mean"] is not None else spec.shift) - spec.shift)
        mean_sd = math.sqrt((total * r) ** 2 + (mean_dev * total) ** 2) / n
        cols[name] = {"count": total, "sum": total * r, "sum_sq": total * r * r, "mean": mean_sd}
    return {"count": total, "columns": cols}


@dataclass
class Budget:
    """A site's privacy budget for analytics: its policy's maximum and its ledger file."""

    site: str
    max_epsilon: float
    delta: float
    ledger: Path | None

    def _entries(self) -> list[dict[str, Any]]:
        if self.ledger is None or not self.ledger.is_file():
            return []
        try:
            data = json.loads(self.ledger.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(
                f"the analytics ledger {str(self.ledger)!r} is unreadable ({exc}); a site never "
                "answers without knowing what it has spent — restore the file"
            ) from None
        return list(data.get(self.site, {}).get("releases", []))

    def charge(self, plan: NoisePlan, what: str) -> float:
        """Refuse (``BudgetError``) or record the release; the site's total ε after it."""
        releases = self._entries()
        total = spent([*[_plan_of(r) for r in releases], plan], self.delta)
        if total > self.max_epsilon * (1 + 1e-9):
            before = spent([_plan_of(r) for r in releases], self.delta)
            raise BudgetError(
                f"site {self.site!r} refuses the query: it would spend ε = {total:.3g} in all "
                f"(ε = {before:.3g} so far, {len(releases)} releases), past its max_epsilon = "
                f"{self.max_epsilon:g}; ask for a smaller analysis.epsilon, or raise the "
                "site's budget in its policy"
            )
        if self.ledger is not None:
            data: dict[str, Any] = {}
            if self.ledger.is_file():
                data = json.loads(self.ledger.read_text())
            entry = data.setdefault(self.site, {"releases": []})
            entry["releases"].append({
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "what": what,
                "mechanism": plan.mechanism, "epsilon": plan.epsilon, "delta": plan.delta,
                "noise_multiplier": plan.noise_multiplier, "statistics": plan.statistics,
            })
            entry["epsilon"] = total
            entry["delta"] = self.delta
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.ledger.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            tmp.replace(self.ledger)
        return total


def _plan_of(r: Mapping[str, Any]) -> NoisePlan:
    return NoisePlan(r["mechanism"], float(r["epsilon"]), float(r["delta"]),
                     int(r["statistics"]), float(r["noise_multiplier"]))


def spent(plans: Sequence[NoisePlan], delta: float) -> float:
    """Total ε at ``delta`` of a site's releases: RDP composition (dp-accounting), or the sum
    of the ε's when that is smaller (pure-ε Laplace releases compose by adding)."""
    if not plans:
        return 0.0
    import dp_accounting as dp

    acc = dp.rdp.RdpAccountant()
    for p in plans:
        acc.compose(p.event())
    rdp = float(acc.get_epsilon(delta))
    basic = sum(p.epsilon for p in plans) if all(p.mechanism == "laplace" for p in plans) else math.inf
    return min(rdp, basic)
