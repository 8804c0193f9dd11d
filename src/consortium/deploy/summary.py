"""Federated encoding over the wire: a site's ``SiteSummary`` (and, for a site's own table
file, its :class:`TableSchema`) to and from protobuf, and the server's merge of the schemas."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from consortium.data.preprocess import SiteSummary
from consortium.deploy.codec import DecodeError

__all__ = ["TableSchema", "merge_schemas", "schema_from_pb", "summary_from_pb", "summary_to_pb"]

MAX_COLUMNS = 100_000
MAX_CATEGORIES = 10_000


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
