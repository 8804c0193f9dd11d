"""Federated encoding over the wire: a site's ``SiteSummary`` (and, for a site's own table
file, its :class:`TableSchema`) to and from protobuf, and the server's merge of the schemas."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from consortium.data.preprocess import SiteSummary
from consortium.deploy.codec import DecodeError

__all__ = [
    "MAX_FEATURE_MAGNITUDE",
    "MAX_SUMMARY_ROWS",
    "SECURE_FIELDS",
    "TableSchema",
    "coding_error",
    "harmonize_allow",
    "implausible_summary",
    "merge_schemas",
    "schema_from_pb",
    "secure_layout",
    "secure_merge",
    "summary_answer",
    "summary_from_pb",
    "summary_from_total",
    "summary_to_pb",
]

MAX_COLUMNS = 100_000
MAX_CATEGORIES = 10_000

MAX_SUMMARY_ROWS = 2**31
"""The most rows a site's summary may count per column (Describe's limit on examples)."""

MAX_FEATURE_MAGNITUDE = float(np.finfo(np.float32).max)
"""The largest mean or root-mean-square a column may have: features reach the model as
float32, so a value beyond 3.4e38 is not data (and a sum of squares of 2**31 such values still
fits float64 by 10**220)."""


@dataclass(frozen=True)
class TableSchema:
    """A table file's shape as one site (or, merged, every site) sees it: the feature columns
    in file order, whether each holds only numbers, and the label values."""

    columns: tuple[str, ...]
    numeric: tuple[bool, ...]
    labels: frozenset[Any]


def merge_schemas(first: TableSchema, other: TableSchema, *, site: str) -> TableSchema:
    """``first`` (the schema so far) with ``other``'s labels added.

    Raises:
        DataError: ``site``'s columns, or a column's kind, differ from the others' — the
            reason names the column and the fix.
    """
    from consortium.errors import DataError

    if other.columns != first.columns:
        extra = sorted(set(other.columns) - set(first.columns))
        lacking = sorted(set(first.columns) - set(other.columns))
        how = (f"extra {extra}, lacking {lacking}" if extra or lacking
               else "the same columns in another order")
        raise DataError(
            f"site {site!r}'s file has different columns from the other sites' ({how}); every "
            "site's file must have the same columns in the same order"
        )
    for name, a, b in zip(first.columns, first.numeric, other.numeric):
        if a != b:
            raise DataError(
                f"column {name!r} holds only numbers at some sites and text at others (site "
                f"{site!r}: {'numbers' if b else 'text'}); make every site's file agree"
            )
    return TableSchema(first.columns, first.numeric, first.labels | other.labels)


def coding_error(
    schema: TableSchema, summaries: Mapping[str, SiteSummary], *, allow: Iterable[str] = ()
) -> str | None:
    """Why the sites' table files cannot be encoded together, or None: a column coded with
    disjoint values at two sites (``M, F`` against ``male, female``), found from the category
    sets the sites' summaries already carry, by the rule of
    :func:`consortium.data.harmonize.check_schemas` (columns in ``allow`` are not compared).
    The reason quotes the sites' codes (as a peer sent them, made printable)."""
    from consortium.data.harmonize import check_schemas, site_schema_from_summary
    from consortium.deploy.logsafe import peer_text

    profiles = {site: site_schema_from_summary(schema.columns, schema.numeric, summary)
                for site, summary in summaries.items()}
    errors = [f for f in check_schemas(profiles, allow=allow) if f.kind == "codes"]
    return peer_text(errors[0].detail, 2000) if errors else None


def harmonize_allow(config_toml: str) -> frozenset[str]:
    """The ``[check] allow`` columns of the experiment's ``data.harmonize`` file, where the
    server can read it (the sites apply the file; the server needs only this list); empty when
    the experiment names none or the file is not at the server.

    Raises:
        ConfigError: the file is there but invalid.
    """
    from pathlib import Path

    import tomllib

    from consortium.data.harmonize import load_harmonization

    try:
        data = tomllib.loads(config_toml).get("data", {})
    except tomllib.TOMLDecodeError:
        return frozenset()  # the experiment's own parser reports it
    path = data.get("harmonize", "") if isinstance(data, dict) else ""
    if not isinstance(path, str) or not path or not Path(path).is_file():
        return frozenset()
    return load_harmonization(path).allow


def _fill_values(entry: Any, values: Sequence[Any] | frozenset[Any]) -> None:
    for value in values:
        if isinstance(value, str):
            entry.text.append(value)
        else:
            entry.number.append(float(value))


def _read_values(entry: Any, what: str) -> list[Any]:
    if len(entry.text) + len(entry.number) > MAX_CATEGORIES:
        raise DecodeError(f"{what} lists more than {MAX_CATEGORIES} values")
    numbers: list[float] = [float(v) for v in entry.number]
    if not all(math.isfinite(v) for v in numbers):
        raise DecodeError(f"{what} must hold finite numbers or strings")
    # integral values come back as ints, as the simulation holds them
    found: list[Any] = [int(v) if v.is_integer() else v for v in numbers]
    return found + list(entry.text)


def schema_from_pb(msg: Any) -> TableSchema | None:
    """The schema in a ``DataSummary`` (None for the built-in data sets, which send none)."""
    if not msg.columns:
        return None
    if len(msg.numeric) != len(msg.columns) or len(msg.columns) > MAX_COLUMNS:
        raise DecodeError("a table schema needs one numeric flag per column")
    if len(msg.count) != len(msg.columns):
        raise DecodeError("a table schema needs one summary entry per column")
    if len(set(msg.columns)) != len(msg.columns):
        raise DecodeError("a table schema names a column twice")
    return TableSchema(tuple(msg.columns), tuple(bool(v) for v in msg.numeric),
                       frozenset(_read_values(msg.labels, "a table's labels")))


def summary_to_pb(
    summary: SiteSummary, *, ready: bool = True, schema: TableSchema | None = None
) -> Any:
    from consortium.deploy.proto import consortium_pb2 as pb

    msg = pb.DataSummary(
        ready=ready, count=summary.count.tolist(), total=summary.total.tolist(),
        total_sq=summary.total_sq.tolist(), has_missing=summary.has_missing.tolist(),
        binary=summary.binary.tolist(),
    )
    for cats in summary.categories:
        _fill_values(msg.categories.add(), cats)
    if schema is not None:
        msg.columns.extend(schema.columns)
        msg.numeric.extend(schema.numeric)
        _fill_values(msg.labels, schema.labels)
    return msg


def summary_from_pb(msg: Any) -> SiteSummary:
    """The summary in ``msg``; raises :class:`DecodeError` for inconsistent or absurd fields."""
    d = len(msg.count)
    lengths = {len(msg.total), len(msg.total_sq), len(msg.has_missing), len(msg.binary),
               len(msg.categories)}
    if lengths != {d} or not 1 <= d <= MAX_COLUMNS:
        raise DecodeError(f"a data summary needs the same number (1 to {MAX_COLUMNS}) of every field")
    count = np.asarray(msg.count, dtype=np.float64)
    total = np.asarray(msg.total, dtype=np.float64)
    total_sq = np.asarray(msg.total_sq, dtype=np.float64)
    for name, values in (("count", count), ("total", total), ("total_sq", total_sq)):
        if not np.isfinite(values).all():
            raise DecodeError(f"a data summary's {name} must be finite")
    if (count < 0).any() or (total_sq < 0).any():
        raise DecodeError("a data summary's counts and sums of squares must be >= 0")
    categories = []
    for entry in msg.categories:
        categories.append(frozenset(_read_values(entry, "a column's categories")))
    return SiteSummary(
        count=count, total=total, total_sq=total_sq,
        has_missing=np.asarray(msg.has_missing, dtype=bool),
        binary=np.asarray(msg.binary, dtype=bool), categories=tuple(categories),
    )


def implausible_summary(summary: SiteSummary, *, schema: TableSchema | None = None) -> str | None:
    """Why a site's data summary cannot describe real rows, or None.

    The server merges the sites' sums before any site describes its data, so the checks use
    nothing but the summary (and its schema): counts are whole numbers within
    :data:`MAX_SUMMARY_ROWS`; a column without values has zero sums; the mean and the root
    mean square are within :data:`MAX_FEATURE_MAGNITUDE` (column sums of 1e300 made every
    honest site fail, issue 13); the sums obey Cauchy–Schwarz, ``(Σx)² ≤ n·Σx²``, within
    rounding; a binary column (only 0 and 1) has ``Σx = Σx² ≤ n``; a column with categories
    has no numeric sums, and in a table file a numeric column has no categories. Its row count
    against what it then declares is :meth:`consortium.deploy.hub.Hub.describe`'s check.
    """
    count, total, total_sq = summary.count, summary.total, summary.total_sq
    named = (lambda j: repr(schema.columns[j])) if schema is not None else (lambda j: str(j))

    def first(bad: np.ndarray) -> int:
        return int(np.flatnonzero(bad)[0])

    checks: list[tuple[np.ndarray, Any]] = [
        (~np.isfinite(count) | (count < 0) | (count > MAX_SUMMARY_ROWS) | (count != np.round(count)),
         lambda j: f"counts {count[j]:g} values, not a whole number in [0, 2**31]"),
        ((count == 0) & ((total != 0) | (total_sq != 0)),
         lambda j: f"has no values but sums {total[j]:g} (squares {total_sq[j]:g})"),
    ]
    n = np.maximum(count, 1.0)
    with np.errstate(over="ignore", invalid="ignore"):
        mean, rms = np.abs(total) / n, np.sqrt(np.abs(total_sq) / n)
        checks += [
            (~(mean <= MAX_FEATURE_MAGNITUDE),
             lambda j: f"has mean {total[j] / n[j]:.3g}, beyond any float32 value"),
            (~(rms <= MAX_FEATURE_MAGNITUDE),
             lambda j: f"has root mean square {rms[j]:.3g}, beyond any float32 value"),
            # mean² ≤ mean of squares; both sides are finite here, as both are within range
            (mean * mean > (rms * rms) * (1 + 1e-9) + 1e-300,
             lambda j: f"sums {total[j]:.6g} with squares {total_sq[j]:.6g} over {count[j]:g} "
                       "values, which no real numbers do ((Σx)² > n·Σx²)"),
        ]
    binary = np.asarray(summary.binary, dtype=bool)
    checks += [
        (binary & ((total != total_sq) | (total > count) | (total < 0)),
         lambda j: f"is binary (0 and 1 only) but sums {total[j]:g} with squares "
                   f"{total_sq[j]:g} over {count[j]:g} values"),
    ]
    categorical = np.array([bool(c) for c in summary.categories], dtype=bool)
    checks += [
        (categorical & ((count != 0) | binary),
         lambda j: f"lists categories but also {count[j]:g} numeric values"),
    ]
    if schema is not None:
        numeric = np.asarray(schema.numeric, dtype=bool)
        checks += [(numeric & categorical, lambda j: "holds only numbers but lists categories"),
                   (~numeric & (count > 0), lambda j: "holds text but counts numeric values")]
    for bad, why in checks:
        if bad.any():
            j = first(bad)
            return f"its data summary's column {named(j)} {why(j)}"
    return None


# ------------------------------------------------------------ the sums through secure aggregation

SECURE_FIELDS = ("count", "missing", "non_binary", "total", "total_sq")
"""What a site's summary puts through SecAgg+ (issue 15), one value per column each: the
training split's ``count``, ``total`` and ``total_sq``, and ``missing`` / ``non_binary`` as 0/1
(their totals count the sites whose column has a missing value / a value other than 0 and 1)."""


def secure_layout(columns: int) -> list[tuple[str, tuple[int, ...]]]:
    """The keys and shapes every site encodes its summary's sums in
    (:func:`consortium.analytics.secure.encode`): sorted keys, one value per column."""
    return [(key, (columns,)) for key in sorted(SECURE_FIELDS)]


def summary_answer(summary: SiteSummary, *, site: str) -> Any:
    """A site's summary sums as an analytics :class:`~consortium.analytics.site.Answer`, ready
    for :func:`consortium.analytics.secure.encode` with :func:`secure_layout` (the categories
    and the schema stay out: they travel in the clear, released above ``min_count``)."""
    from consortium.analytics.site import Answer

    answer = Answer(site)
    answer.put("count", summary.count)
    answer.put("total", summary.total)
    answer.put("total_sq", summary.total_sq)
    answer.put("missing", np.asarray(summary.has_missing, dtype=np.float64))
    answer.put("non_binary", (~np.asarray(summary.binary, dtype=bool)).astype(np.float64))
    return answer


def summary_from_total(total: Any, categories: Sequence[frozenset[Any]]) -> SiteSummary:
    """The merged summary from the decoded secure total
    (:func:`consortium.analytics.secure.decode` with :func:`secure_layout`) and the union of
    the category sets the sites released in the clear: ``has_missing`` and ``binary`` follow
    from the totals (some site has a missing value; no site has a value other than 0 and 1).

    Raises:
        DecodeError: the total's fields do not have one value per column.
    """
    d = len(categories)
    values = {key: np.asarray(total.values.get(key, ()), dtype=np.float64) for key in SECURE_FIELDS}
    if any(v.shape != (d,) for v in values.values()):
        raise DecodeError(f"the secure total of the data summaries does not hold {d} columns")
    return SiteSummary(
        count=values["count"], total=values["total"], total_sq=values["total_sq"],
        has_missing=values["missing"] > 0.5, binary=~(values["non_binary"] > 0.5),
        categories=tuple(categories),
    )


def secure_merge(summaries: Mapping[str, SiteSummary], **kwargs: Any) -> SiteSummary:
    """The merged summary of ``summaries`` with their sums added by SecAgg+ played in process
    (:func:`consortium.analytics.secure.secure_total`; ``kwargs`` are its threshold and
    neighbours): what a deployment's server learns, for checking against
    :func:`consortium.data.preprocess.merge_summaries`. Category sets are the union."""
    from consortium.analytics.secure import secure_total

    items = [summaries[k] for k in sorted(summaries)]
    total = secure_total([summary_answer(s, site=k) for k, s in zip(sorted(summaries), items)],
                         **kwargs)
    categories = [frozenset().union(*cats) for cats in zip(*(s.categories for s in items))]
    return summary_from_total(total, categories)
