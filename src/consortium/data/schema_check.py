"""The cross-site schema check: what differs between the sites' tables (column names and
types, codings, empty columns, likely unit mix-ups), each difference with its fix.

It works on per-site profiles (:class:`SiteSchema`) that hold only what a site may share —
kinds, counts, distinct codes of low-cardinality columns, means — so the same check runs on
tables in simulation, on a deployment's data summaries at the server, and on the analytics'
site profiles.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from consortium.data._tables import Table, category_codes, label_key, numbers
from consortium.data.units import known_conversions
from consortium.errors import DataError

__all__ = [
    "MAX_CODES",
    "ColumnProfile",
    "Finding",
    "SiteSchema",
    "check_schemas",
    "code_key",
    "raise_for_errors",
    "site_schema",
    "site_schema_from_summary",
]

MAX_CODES = 50
"""A column with more distinct values than this at a site is not a coding (an identifier, free
text, a measurement): :func:`check_schemas` does not compare its values across sites."""


def code_key(value: Any) -> str:
    """How codes compare: stripped text, and numbers by value (``"1"``, ``" 1.0"``, ``1`` and
    ``1.0`` are all ``"1"``)."""
    if isinstance(value, str):
        value = value.strip()
    return str(label_key(value))


@dataclass(frozen=True)
class ColumnProfile:
    """What :func:`check_schemas` needs to know about one column at one site.

    Attributes:
        kind: ``"numbers"`` (every present value is a number), ``"text"`` or ``"missing"``
            (no value at all).
        present: how many values are present (None: unknown).
        distinct: how many distinct present values (None: unknown).
        codes: the distinct present values as :func:`code_key` text, when at most
            :data:`MAX_CODES` (None otherwise, or unknown).
        mean, sd: of a numeric column's values (None: unknown).
    """

    kind: Literal["numbers", "text", "missing"]
    present: int | None = None
    distinct: int | None = None
    codes: frozenset[str] | None = None
    mean: float | None = None
    sd: float | None = None


@dataclass(frozen=True)
class SiteSchema:
    """One site's columns, in file order, profiled (what a site may share: no row leaves)."""

    columns: Mapping[str, ColumnProfile]
    rows: int | None = None


@dataclass(frozen=True)
class Finding:
    """A difference between sites.

    ``kind`` is one of ``"missing_column"``, ``"codes"`` (the same column coded with disjoint
    values), ``"type"`` (numbers at some sites, text at others), ``"empty"`` (no value at a
    site), ``"units"`` (means that differ by a known unit conversion). ``detail`` says what
    and how to fix it. ``severity`` is ``"error"`` when training on the data as they are would
    be wrong (the training path raises it), else ``"warning"``.
    """

    kind: str
    column: str | None
    sites: tuple[str, ...]
    detail: str
    severity: Literal["error", "warning"] = "warning"


def site_schema(table: Table, *, columns: Sequence[str] | None = None) -> SiteSchema:
    """Profile ``table``'s columns (all, or ``columns``) for :func:`check_schemas`."""
    profiles: dict[str, ColumnProfile] = {}
    for name in table.names if columns is None else columns:
        values = numbers(table.columns[name])
        if values is not None:
            present = values[~np.isnan(values)]
            if present.size == 0:
                profiles[name] = ColumnProfile("missing", 0, 0)
                continue
            distinct = np.unique(present)
            codes = (frozenset(code_key(float(v)) for v in distinct)
                     if distinct.size <= MAX_CODES else None)
            profiles[name] = ColumnProfile("numbers", int(present.size), int(distinct.size), codes,
                                           float(present.mean()), float(present.std()))
            continue
        codes_of_row, cats = category_codes(table.columns[name])
        present_n = int((codes_of_row >= 0).sum())
        profiles[name] = ColumnProfile(
            "text" if present_n else "missing", present_n, len(cats),
            frozenset(code_key(c) for c in cats) if len(cats) <= MAX_CODES else None,
        )
    return SiteSchema(profiles, table.rows)


def site_schema_from_summary(
    columns: Sequence[str], numeric: Sequence[bool], summary: Any
) -> SiteSchema:
    """A :class:`SiteSchema` from what a deployed site already sends: its table schema and its
    :class:`~consortium.data.preprocess.SiteSummary` (counts and sums of its training rows,
    category sets of its text columns)."""
    profiles: dict[str, ColumnProfile] = {}
    for j, (name, num) in enumerate(zip(columns, numeric)):
        if num:
            n = float(summary.count[j])
            if n == 0:
                profiles[name] = ColumnProfile("missing", 0, 0)
                continue
            mean = float(summary.total[j]) / n
            sd = math.sqrt(max(float(summary.total_sq[j]) / n - mean * mean, 0.0))
            profiles[name] = ColumnProfile("numbers", int(n), None, None, mean, sd)
            continue
        cats = summary.categories[j]
        profiles[name] = ColumnProfile(
            "text" if cats else "missing", None, len(cats),
            frozenset(code_key(c) for c in cats) if len(cats) <= MAX_CODES else None,
        )
    return SiteSchema(profiles)


def check_schemas(
    sites: Mapping[str, Table | SiteSchema], *, allow: Iterable[str] = (),
    units: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Differences between the sites' tables, errors first, then by column.

    **Coded differently** (an error): a column that holds text at one of two sites, where each
    of the two sites holds between 2 and :data:`MAX_CODES` distinct values (for a site where it
    holds numbers only: its distinct numbers, written as text) and the two sets share no value
    — ``M, F`` against ``male, female``, or ``0, 1`` against ``F, M``. Encoded as they are, the
    two codings would become unrelated one-hot columns. One finding per column names the first
    such pair (in site order), with how many sites share each coding.

    Also an error: a column missing at some sites (every site's table must have the same
    columns). Warnings: numbers at some sites and text at others, when that is not a coding
    difference (the column becomes categorical everywhere); a column with no value at a site;
    a numeric column whose mean at a site differs from the typical (median) site's by the
    factor (and offset) of a known unit conversion (:func:`~consortium.data.units.
    known_conversions`, within 5 %), with the two sites' ranges (mean ± 2 sd) apart — likely
    recorded in another unit. Columns in ``allow`` get no code or type finding.

    Args:
        sites: per site (in the order findings name them), its table or its profile
            (:func:`site_schema`, :func:`site_schema_from_summary`).
        allow: columns whose codes may differ.
        units: column → its declared common unit (``Harmonization.unit_names``): only
            conversions to or from that unit are suspected for the column.
    """
    profiles = {s: v if isinstance(v, SiteSchema) else site_schema(v) for s, v in sites.items()}
    allowed = set(allow)
    order = list(dict.fromkeys(c for p in profiles.values() for c in p.columns))
    findings: list[Finding] = []
    for column in order:
        have = {s: p.columns[column] for s, p in profiles.items() if column in p.columns}
        lacking = tuple(s for s in profiles if s not in have)
        if lacking:
            findings.append(Finding(
                "missing_column", column, lacking,
                f"column {column!r} is missing at {_sites(lacking)} but present at "
                f"{_sites(have)}; rename it there ([rename] in harmonize.toml) or drop it "
                "everywhere", "error"))
        for s, p in have.items():
            if p.kind == "missing":
                findings.append(Finding(
                    "empty", column, (s,),
                    f"column {column!r} has no value at site {s!r}; it is imputed there (and "
                    "its missing indicator then marks the site): check the site's export, or "
                    "drop the column"))
        coded = None if column in allowed else _disjoint_codes(column, have)
        if coded is not None:
            findings.append(coded)
        text = tuple(s for s, p in have.items() if p.kind == "text")
        nums = tuple(s for s, p in have.items() if p.kind == "numbers")
        if text and nums and coded is None and column not in allowed:
            findings.append(Finding(
                "type", column, text,
                f"column {column!r} holds numbers at {_sites(nums)} but text at {_sites(text)}; "
                "it is treated as categorical everywhere (every number a category): map the "
                f"text to numbers ([map.{column}] in harmonize.toml) or fix the files"))
        if nums and not text:
            findings.extend(_unit_mismatches(column, {s: have[s] for s in nums},
                                             (units or {}).get(column)))
    findings.sort(key=lambda f: f.severity != "error")
    return findings


def raise_for_errors(findings: Sequence[Finding]) -> None:
    """Raise :class:`DataError` with the first error finding (and how many more there are)."""
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more differences)" if len(errors) > 1 else ""
        raise DataError(errors[0].detail + more)


def _sites(names: Iterable[str]) -> str:
    listed = list(names)
    shown = ", ".join(repr(s) for s in listed[:5])
    return f"site {shown}" if len(listed) == 1 else (
        f"sites {shown}" + (f" and {len(listed) - 5} more" if len(listed) > 5 else ""))


def _show(codes: frozenset[str]) -> str:
    return ", ".join(sorted(codes))


def _disjoint_codes(column: str, have: Mapping[str, ColumnProfile]) -> Finding | None:
    eligible = {s: p.codes for s, p in have.items()
                if p.kind in ("numbers", "text") and p.codes is not None and len(p.codes) >= 2}
    # sites with the same code set stand together; compare each distinct set once
    groups: dict[frozenset[str], list[str]] = {}
    for s, codes in eligible.items():
        assert codes is not None
        groups.setdefault(codes, []).append(s)
    sets = list(groups)
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            if a & b:
                continue
            kinds = {have[s].kind for s in groups[a] + groups[b]}
            if "text" not in kinds:
                continue
            sa, sb = groups[a][0], groups[b][0]
            also_a = f" (and {len(groups[a]) - 1} more sites)" if len(groups[a]) > 1 else ""
            also_b = f" (and {len(groups[b]) - 1} more sites)" if len(groups[b]) > 1 else ""
            ea, eb = sorted(a)[0], sorted(b)[0]
            return Finding(
                "codes", column, (sa, sb),
                f"column {column!r} is coded {_show(a)} at site {sa!r}{also_a} but "
                f"{_show(b)} at site {sb!r}{also_b}, with no value in common; encoded as they "
                f"are they would become unrelated one-hot columns. Add a [map.{column}] table "
                f'to harmonize.toml (e.g. "{ea}" = "{eb}") and set data.harmonize, or list '
                f"{column!r} in its [check] allow if the codes really mean different things",
                "error")
    return None


def _unit_mismatches(column: str, have: Mapping[str, ColumnProfile], unit: str | None) -> list[Finding]:
    known = [(s, p) for s, p in have.items()
             if p.mean is not None and p.sd is not None and p.mean != 0]
    if len(known) < 2:
        return []
    means = sorted(p.mean for _, p in known if p.mean is not None)
    typical = means[(len(means) - 1) // 2]
    ref_site, ref = next((s, p) for s, p in known if p.mean == typical)
    assert ref.mean is not None and ref.sd is not None
    candidates = [c for c in known_conversions() if unit is None or unit in (c.units or ())]
    out = []
    for site, p in known:
        assert p.mean is not None and p.sd is not None
        if site == ref_site or abs(p.mean - ref.mean) <= 2 * (p.sd + ref.sd):
            continue
        # the closest known conversion, either way round, within 5 %
        misses = [(abs(a * c.factor + c.offset - b) / abs(b), c.what)
                  for c in candidates for a, b in ((p.mean, ref.mean), (ref.mean, p.mean))]
        miss, what = min(misses, default=(math.inf, ""))
        if miss <= 0.05:
            out.append(Finding(
                "units", column, (site, ref_site),
                f"column {column!r} averages {p.mean:.4g} at site {site!r} but {ref.mean:.4g} "
                f"at site {ref_site!r}, a ratio that matches {what}: one of them likely records "
                f"it in another unit; if so, declare it in harmonize.toml "
                f'([site.<site>.units.{column}] from = "...", with [units.{column}] to = "...")'))
    return out
