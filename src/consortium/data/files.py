"""The user's own tables, CSV or Parquet: one client per file, or per value of a site column.

Everything here works on whole columns (see :mod:`consortium.data._tables` for why pyarrow):
reading, type inference, missing values, the site grouping (one stable sort by site), the
labels (Python only per distinct value), the train/test split (one seeded draw per site, as
a deployed site draws its own) and the federated encoding (:mod:`consortium.data._columnar`,
bit for bit what summarising, merging and transforming site by site gives). The packed
client tensors are filled in place, never built per client.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from consortium.data._assemble import assemble_packed
from consortium.data._columnar import Source, SplitRows, federated_encoding
from consortium.data._rng import generator
from consortium.data._tables import (
    MISSING_TOKENS,
    Table,
    category_codes,
    label_codes,
    numbers,
    read_csv_table,
    read_parquet_table,
    sort_key,
    texts,
)
from consortium.data.base import FederatedDataset
from consortium.data.harmonize import Harmonization, apply, load_harmonization
from consortium.data.holdout import holdout
from consortium.data.preprocess import DEFAULT_MIN_COUNT, Column
from consortium.data.schema_check import (
    MAX_CODES,
    ColumnProfile,
    SiteSchema,
    check_schemas,
    code_key,
    raise_for_errors,
)
from consortium.errors import DataError

__all__ = [
    "MISSING_TOKENS", "SiteTable", "label_order", "load_csv", "load_parquet", "load_site_csv",
    "read_site_table",
]

Format = Literal["csv", "parquet"]
NonNumeric = Literal["error", "missing", "category"]

#: A column whose present values are all numbers but for at most this share is a numeric column
#: with typos (``data.non_numeric`` says what to do with them); with more it is categorical.
FEW_NON_NUMBERS = 0.1

# What Python's float() reads, as far as a regular expression says it; the few other cells
# (``1_000``, ``infinity``) are checked with float() itself, one distinct value at a time.
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def load_csv(
    *, path: str, target: str, seed: int, site_column: str = "", test_fraction: float = 0.25,
    harmonize: str | Path | Harmonization | None = None, impute: str = "mean",
    impute_categorical: str = "indicator", min_count: int = DEFAULT_MIN_COUNT,
    non_numeric: NonNumeric = "error",
) -> FederatedDataset:
    """Federated data from CSV files: see :func:`load_parquet`, which reads the same way.

    Files are read with pyarrow's CSV reader in the dialect of Python's ``csv`` module:
    comma-separated, ``"`` quotes, a header row naming the columns, UTF-8 (a byte-order mark
    is allowed). Cells in :data:`MISSING_TOKENS` (empty, ``NA``, ``NaN``, ``null``, ``?`` ...)
    are missing. Needs ``pyarrow`` (a dependency of consortium).
    """
    return _load(
        "csv",
        path=path,
        target=target,
        seed=seed,
        site_column=site_column,
        test_fraction=test_fraction,
        harmonize=harmonize,
        impute=impute,
        impute_categorical=impute_categorical,
        min_count=min_count,
        non_numeric=non_numeric,
    )


def load_parquet(
    *, path: str, target: str, seed: int, site_column: str = "", test_fraction: float = 0.25,
    harmonize: str | Path | Harmonization | None = None, impute: str = "mean",
    impute_categorical: str = "indicator", min_count: int = DEFAULT_MIN_COUNT,
    non_numeric: NonNumeric = "error",
) -> FederatedDataset:
    """Federated data from Parquet files (needs ``pyarrow``: ``pip install 'consortium[parquet]'``).

    Sites:
        ``path`` is a file, a directory (all its ``*.parquet`` / ``*.csv`` files) or a glob
        pattern. Several files give one client per file, named by the file's stem (a
        ``site_column``, if set, is then only dropped from the features). One file needs
        ``site_column``: one client per value of that column, named by the value, in order of
        first appearance.

    Labels:
        ``target`` names the label column. Its values, gathered from every site, are sorted
        (numbers numerically, before text) and mapped to ``0 … K-1``; the mapping is recorded
        in ``notes["labels"]``. A missing label is an error.

    Features:
        Every other column. A column whose values all parse as numbers is numeric (kept as
        is, standardised with federated statistics unless it only holds 0/1); any other column
        is categorical and one-hot encoded over the union of the values the sites name: a site
        names only the values at least ``min_count`` of its rows hold (train and test), as a
        deployed site does (:func:`~consortium.data.preprocess.category_min_count`); a rarer
        value encodes as all zeros, not as missing. Missing values get an indicator column and
        are imputed (see :mod:`consortium.data.preprocess`). A column of numbers with a few
        cells that are not (at most :data:`FEW_NON_NUMBERS` of its values, such as the typo
        ``4O``) is an error naming the file, line and value with ``non_numeric = "error"``;
        ``"missing"`` reads those cells as missing (a warning on stderr names them) and
        ``"category"`` makes the column categorical.

    Each site holds out ``test_fraction`` of its rows (stratified, seeded by ``seed`` and the
    site's name) as its test split.

    Harmonisation:
        ``harmonize`` (a ``harmonize.toml`` path, or a loaded
        :class:`~consortium.data.harmonize.Harmonization`) is applied to every file as it is
        read: renames, code maps and unit conversions, before anything else (``target`` and
        ``site_column`` name columns after renaming). Then the sites' feature columns are
        compared (:func:`~consortium.data.harmonize.check_schemas`): a column coded with
        disjoint values at two sites (``M, F`` here, ``male, female`` there) is an error
        naming both codings, not four silent one-hot columns.

    Raises:
        DataError: no matching file, an unreadable or empty file, a numeric column with a few
            cells that are not numbers (``non_numeric = "error"``), files with different columns,
            a missing target or site column (the message lists the columns found), a missing
            label (the message names file and row), fewer than two label values, a column
            coded differently at two sites, or data the harmonisation does not fit.
        ConfigError: an invalid harmonisation file.
        MissingExtraError: if ``pyarrow`` is not installed.
    """
    return _load(
        "parquet",
        path=path,
        target=target,
        seed=seed,
        site_column=site_column,
        test_fraction=test_fraction,
        harmonize=harmonize,
        impute=impute,
        impute_categorical=impute_categorical,
        min_count=min_count,
        non_numeric=non_numeric,
    )


def load_site_csv(path: str | Path, *, target: str, seed: int, test_fraction: float = 0.25) -> FederatedDataset:
    """One site's own CSV file as a one-client data set (a deployed site reads only its file).

    The client is named by the file's stem, and its train/test split is drawn exactly as
    :func:`load_csv` draws it for that file among others. Features are encoded with this
    file's statistics only (a deployment has no pooled statistics to use).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{str(p)!r} is not a file; give the site's CSV file")
    return _load("csv", path=str(p), target=target, seed=seed, site_column="",
                 test_fraction=test_fraction, single=True)


@dataclass(frozen=True)
class SiteTable:
    """One site's own file, read and checked but not encoded: the first step of a deployment's
    federated encoding. The site shares its schema (``features``, ``numeric``, ``labels``) and
    per-column sums; the server merges every site's; the site then encodes with the merged
    ones — the same numbers :func:`load_csv` computes over all the files together.

    Attributes:
        site: the client id, the file's stem (as :func:`load_csv` names it).
        features: the feature columns, in file order.
        numeric: per feature, whether every value in this file is a number.
        labels: the label values in this file (as :func:`load_csv` compares them).
    """

    site: str
    features: tuple[str, ...]
    numeric: tuple[bool, ...]
    labels: frozenset[Any]
    target: str
    _table: Table

    def split(
        self, *, classes: Sequence[Any], seed: int, test_fraction: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(x_train, y_train, x_test, y_test)``: raw features and labels numbered by their
        place in ``classes`` (every site's labels, in :func:`label_order`), split as
        :func:`load_csv` splits this file."""
        index = {k: i for i, k in enumerate(classes)}
        unknown = sorted(self.labels - set(index), key=sort_key)
        if unknown:
            raise DataError(f"{self._table.path} holds label {unknown[0]!r}, not among {list(classes)}")
        x = _raw_matrix(self._table, self.features, self.numeric)
        codes, keys = label_codes(self._table.columns[self.target])
        y = np.array([index[k] for k in keys], dtype=np.int64)[codes]
        keep, held = holdout(
            y, fraction=test_fraction, rng=generator(seed, "files", "split", self.site)
        )
        return x[keep], y[keep], x[held], y[held]


def read_site_table(
    path: str | Path, *, target: str, harmonize: str | Path | Harmonization | None = None,
    site: str | None = None, non_numeric: NonNumeric = "error",
) -> SiteTable:
    """Read one site's CSV file for a federated encoding (see :class:`SiteTable`).

    ``harmonize`` (a ``harmonize.toml`` or a loaded one) is applied as the file is read, with
    the ``[site.<site>]`` sections of ``site`` (default: the file's stem), as :func:`load_csv`
    applies it to every file. ``non_numeric`` treats a numeric column with a few cells that
    are not numbers as :func:`load_csv` does, judged on this file alone.

    Raises:
        DataError: an unreadable file, a missing target or feature columns, a row without
            a label, a numeric column with a few cells that are not numbers (``non_numeric =
            "error"``), or data the harmonisation does not fit.
        ConfigError: an invalid harmonisation file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{str(p)!r} is not a file; give the site's CSV file")
    table = read_csv_table(p)
    h = _harmonization(harmonize)
    if h is not None:
        table = apply(table, h, site=site)
    _require_column(table, target, "target", "the label column")
    features = tuple(c for c in table.names if c != target)
    if not features:
        raise DataError(
            f"{table.path} has no feature columns besides the target {target!r}; "
            "add the columns to learn from"
        )
    codes, keys = label_codes(table.columns[target])
    if (codes < 0).any():
        raise DataError(
            f"{table.path} {table.where(int(np.flatnonzero(codes < 0)[0]))} has no value in the "
            f"target column {target!r}; fill it in or drop the row"
        )
    found = [numbers(table.columns[c]) is not None for c in features]
    rows, found = _few_non_numbers(_Rows([table]), _Sites([table.site], np.zeros(table.rows, np.int64)),
                                   list(features), found, non_numeric)
    table = rows.tables[0]
    return SiteTable(table.site, features, tuple(found), frozenset(keys), target, table)


def label_order(labels: Iterable[Any]) -> list[Any]:
    """Label values in the order :func:`load_csv` numbers them (numbers first, then text)."""
    return sorted(set(labels), key=sort_key)


def _load(
    fmt: Format, *, path: str, target: str, seed: int, site_column: str, test_fraction: float,
    single: bool = False, harmonize: str | Path | Harmonization | None = None,
    impute: str = "mean", impute_categorical: str = "indicator",
    min_count: int = DEFAULT_MIN_COUNT, non_numeric: NonNumeric = "error",
) -> FederatedDataset:
    paths = _resolve(path, fmt)
    read = read_csv_table if fmt == "csv" else read_parquet_table
    h = _harmonization(harmonize)
    tables = [read(p) for p in paths]
    if h is not None:
        tables = [apply(t, h, site_column="" if len(tables) > 1 else site_column) for t in tables]
    _check_same_columns(tables)
    _require_column(tables[0], target, "target", "the label column")
    rows = _Rows(tables[:1] if single else tables)
    sites = _Sites([tables[0].site], np.zeros(rows.total, np.int64)) if single else _sites(rows, site_column)
    features = [c for c in tables[0].names if c not in (target, site_column)]
    if not features:
        raise DataError(
            f"{tables[0].path} has no feature columns besides the target {target!r}; "
            "add the columns to learn from"
        )
    if h is not None and not single:
        h.check_sites(sites.names)
    classes, y = _classes(rows, sites, target)
    numeric = _numeric_and_finite(rows, sites, features)
    rows, numeric = _few_non_numbers(rows, sites, features, numeric, non_numeric)
    if not single:
        profiles = _site_profiles(rows, sites, features, numeric)
        raise_for_errors(check_schemas(profiles, allow=h.allow if h is not None else ()))
    sources = [_source(rows, c, num) for c, num in zip(features, numeric)]
    split = _split(sites, y, seed=seed, test_fraction=test_fraction)
    encoder, x_train, x_test = federated_encoding(sources, split, impute=impute,
                                                  impute_categorical=impute_categorical,
                                                  min_count=min_count)
    labels = ", ".join(f"{i}={k}" for k, i in classes.items())
    return assemble_packed(
        fmt,
        sites.names,
        x_train=x_train, y_train=y[split.train], train_offsets=split.train_offsets,
        x_test=x_test, y_test=y[split.test], test_offsets=split.test_offsets,
        num_classes=len(classes),
        input_shape=(encoder.num_features,),
        feature_names=encoder.feature_names,
        notes={"path": path, "target": target, "labels": labels},
    )


def _harmonization(harmonize: str | Path | Harmonization | None) -> Harmonization | None:
    if harmonize is None or isinstance(harmonize, Harmonization):
        return harmonize
    return load_harmonization(harmonize) if str(harmonize) else None


# -- finding files -----------------------------------------------------------------------------


def _resolve(path: str, fmt: Format) -> list[Path]:
    if not path:
        raise DataError(
            f"data.path is empty; set it to a {fmt} file, a directory or a glob such as "
            f"'sites/*.{fmt}'"
        )
    if any(ch in path for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not found:
            raise DataError(
                f"no file matches {path!r} (looked from {os.getcwd()}); check the pattern, "
                "or give an absolute path"
            )
        return found
    p = Path(path)
    if p.is_dir():
        found = sorted(q for q in p.glob(f"*.{fmt}") if q.is_file())
        if not found:
            raise DataError(
                f"directory {path!r} holds no *.{fmt} file; put one file per site there, or "
                "point data.path at a file or glob"
            )
        return found
    if not p.is_file():
        raise DataError(f"file {path!r} does not exist (looked from {os.getcwd()}); fix data.path")
    return [p]


def _check_same_columns(tables: list[Table]) -> None:
    first = tables[0]
    for t in tables[1:]:
        if set(t.names) != set(first.names):
            extra = sorted(set(t.names) - set(first.names))
            lacking = sorted(set(first.names) - set(t.names))
            raise DataError(
                f"{t.path} has different columns from {first.path}: extra {extra}, lacking "
                f"{lacking}; every site's file must have the same columns"
            )


def _require_column(table: Table, name: str, key: str, what: str) -> None:
    if not name:
        raise DataError(
            f"data.{key} is not set; set it to {what}, one of: {', '.join(table.names)}"
        )
    if name not in table.names:
        raise DataError(
            f"{what} {name!r} (data.{key}) is not a column of {table.path}; columns found: "
            f"{', '.join(table.names)}"
        )


# -- rows, sites and labels --------------------------------------------------------------------


class _Rows:
    """The files' rows one after another ("row r" below counts across files)."""

    def __init__(self, tables: list[Table]) -> None:
        self.tables = tables
        self.offsets = np.cumsum([0, *(t.rows for t in tables)])
        self.total = int(self.offsets[-1])

    def column(self, name: str) -> Any:
        """Column ``name`` over every file as one chunked array (no copy), or ``None`` when
        the files store it with different types (then each file is read on its own)."""
        parts = [t.columns[name] for t in self.tables]
        if len(parts) == 1:
            return parts[0]
        if any(p.type != parts[0].type for p in parts):
            return None
        import pyarrow as pa

        return pa.chunked_array([c for p in parts for c in getattr(p, "chunks", [p])],
                                parts[0].type)

    def where(self, row: int) -> str:
        """Row ``row``'s file and line, as errors name it."""
        k = int(np.searchsorted(self.offsets, row, side="right")) - 1
        table = self.tables[k]
        return f"{table.path} {table.where(row - int(self.offsets[k]))}"

    def codes(self, column: str) -> tuple[np.ndarray, list[Any]]:
        """:func:`label_codes` of ``column`` over every file, with one list of keys."""
        whole = self.column(column)
        if whole is not None:
            return label_codes(whole)
        keys: list[Any] = []
        index: dict[Any, int] = {}
        parts = []
        for t in self.tables:
            codes, found = label_codes(t.columns[column])
            for k in found:
                if k not in index:
                    index[k] = len(keys)
                    keys.append(k)
            parts.append(np.append(np.array([index[k] for k in found], np.int64), -1)[codes])
        return np.concatenate(parts), keys


@dataclass(frozen=True)
class _Sites:
    """The clients: their ids in client order, and each row's client."""

    names: list[str]
    of_row: np.ndarray


def _sites(rows: _Rows, site_column: str) -> _Sites:
    """One client per file, named by its stem, or per value of the site column."""
    tables = rows.tables
    if len(tables) > 1:
        if site_column:
            _require_column(tables[0], site_column, "site_column", "the site column")
        stems = [t.site for t in tables]
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        if dupes:
            raise DataError(
                f"several files are named {dupes[0]!r}; client ids come from file names, so "
                "rename them to be unique"
            )
        return _Sites(stems, np.repeat(np.arange(len(tables)), np.diff(rows.offsets)))
    (table,) = tables
    if not site_column:
        raise DataError(
            f"only one file, {table.path}, was found, and data.site_column is not set; set it to "
            f"the column that names each row's site (one of: {', '.join(table.names)}), or give "
            "one file per site"
        )
    _require_column(table, site_column, "site_column", "the site column")
    codes, keys = rows.codes(site_column)
    if (codes < 0).any():
        raise DataError(
            f"{rows.where(int(np.flatnonzero(codes < 0)[0]))} has no value in the site column "
            f"{site_column!r}; every row needs a site"
        )
    # keys that print alike are one site; sites come in order of first appearance
    names: dict[str, int] = {}
    of_key = np.array([names.setdefault(str(k), len(names)) for k in keys], dtype=np.int64)
    named = of_key[codes]
    seen, first = np.unique(named, return_index=True)
    order = seen[np.argsort(first)]
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(order))
    listed = list(names)
    return _Sites([listed[i] for i in order], rank[named])


def _first_by_site(bad: np.ndarray, sites: _Sites) -> int:
    """The first flagged row of the first client (in client order) that has one."""
    flagged = np.flatnonzero(bad)
    site = sites.of_row[flagged]
    return int(flagged[site == site.min()][0])


def _classes(rows: _Rows, sites: _Sites, target: str) -> tuple[dict[Any, int], np.ndarray]:
    """The label → class mapping (sorted label values) and each row's class."""
    codes, keys = rows.codes(target)
    if (codes < 0).any():
        raise DataError(
            f"{rows.where(_first_by_site(codes < 0, sites))} has no value in the target column "
            f"{target!r}; fill it in or drop the row"
        )
    if len(keys) < 2:
        raise DataError(
            f"the target column {target!r} has only the value {keys[0]}; "
            "a classifier needs at least two label values"
        )
    classes = {k: i for i, k in enumerate(sorted(keys, key=sort_key))}
    return classes, np.array([classes[k] for k in keys], dtype=np.int64)[codes]


# -- features and the split --------------------------------------------------------------------


def _source(rows: _Rows, name: str, numeric: bool) -> Source:
    """Column ``name`` over every file, read again each time it is needed (see Source)."""
    if numeric:
        def read_numbers() -> np.ndarray:
            parts = _numbers_of(rows, name)
            found = [p for p in parts if p is not None]
            assert len(found) == len(parts), "read only for columns found numeric"
            return found[0] if len(found) == 1 else np.concatenate(found)

        return Source(Column(name, "numeric"), read_numbers)

    def read_categories() -> tuple[np.ndarray, list[str]]:
        import pyarrow as pa

        whole = rows.column(name)
        if whole is None:
            whole = pa.chunked_array([texts(t.columns[name]) for t in rows.tables], pa.string())
        return category_codes(whole)

    return Source(Column(name, "categorical"), read_categories)


def _numbers_of(rows: _Rows, name: str) -> list[np.ndarray | None]:
    """:func:`numbers` of column ``name``: of all files at once, or file by file when their
    types differ (a column is numeric only if it is in every file)."""
    whole = rows.column(name)
    if whole is not None:
        return [numbers(whole)]
    return [numbers(t.columns[name]) for t in rows.tables]


def _numeric_and_finite(rows: _Rows, sites: _Sites, features: list[str]) -> list[bool]:
    """Per feature, whether it holds only numbers in every file; and no infinite number (the
    error names the first client's first such column, at its first such row)."""
    numeric, infinite = [], []  # infinite: (site, column, row)
    for j, name in enumerate(features):
        parts = _numbers_of(rows, name)
        numeric.append(all(p is not None for p in parts))
        if numeric[-1]:
            bad = np.concatenate([np.isinf(p) for p in parts])  # type: ignore[arg-type]
            if bad.any():
                row = _first_by_site(bad, sites)
                infinite.append((int(sites.of_row[row]), j, row))
    if infinite:
        _, j, row = min(infinite)
        raise DataError(
            f"{rows.where(row)} has an infinite value in column {features[j]!r}; "
            "replace it with a number or leave it empty"
        )
    return numeric


def _few_non_numbers(
    rows: _Rows, sites: _Sites, features: list[str], numeric: list[bool], mode: NonNumeric,
) -> tuple[_Rows, list[bool]]:
    """Columns of numbers with a few cells that are not numbers (issue 20: one typo ``4O`` made
    a column 40 one-hot features without a word). ``mode``: ``"error"`` raises naming the first
    such cell (file, line, value); ``"missing"`` makes those cells missing, with a warning on
    stderr, and the column numeric; ``"category"`` leaves the column categorical.

    Raises:
        DataError: with ``mode = "error"``, for the first such column (in column order).
    """
    if mode == "category":
        return rows, numeric
    cleaned: dict[str, np.ndarray] = {}
    for name, num in zip(features, numeric):
        if num:
            continue
        bad, present = _not_numbers(rows, name)
        count = int(bad.sum())
        if count == 0 or count > FEW_NON_NUMBERS * present:
            continue  # mostly text (or not text at all): a categorical column
        row = _first_by_site(bad, sites)
        values = sorted({str(v) for v in _cells(rows, name, np.flatnonzero(bad)[:20])})
        what = (f"column {name!r} holds numbers but for {count} of its {present} values, first "
                f"{_cell(rows, name, row)!r} at {rows.where(row)}")
        if mode == "error":
            raise DataError(
                f"{what}; correct the value (or leave the cell empty for a missing value), or "
                "set data.non_numeric = \"missing\" to read such cells as missing or "
                "\"category\" to treat the column as categories"
            )
        print(f"consortium: warning: {what} ({', '.join(map(repr, values[:5]))}"
              f"{' ...' if len(values) > 5 else ''}); read as missing values "
              "(data.non_numeric = \"missing\")", file=sys.stderr)
        cleaned[name] = bad
    if not cleaned:
        return rows, numeric
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = []
    for k, table in enumerate(rows.tables):
        lo, hi = int(rows.offsets[k]), int(rows.offsets[k + 1])
        columns = dict(table.columns)
        for name, bad in cleaned.items():
            column = columns[name]
            columns[name] = pc.if_else(pa.array(bad[lo:hi]), pa.scalar(None, column.type), column)
        tables.append(replace(table, columns=columns))
    rows = _Rows(tables)
    changed = [name for name in features if name in cleaned]
    finite = dict(zip(changed, _numeric_and_finite(rows, sites, changed)))  # "inf" is refused
    return rows, [num or finite.get(name, False) for name, num in zip(features, numeric)]


def _not_numbers(rows: _Rows, name: str) -> tuple[np.ndarray, int]:
    """Per row (over every file), whether column ``name`` holds a value that is not a number,
    and how many values it holds (missing cells are neither)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts, present = [], 0
    for table in rows.tables:
        column = table.columns[name]
        present += len(column) - column.null_count
        kind = column.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            parts.append(np.zeros(len(column), dtype=bool))
            continue
        text = texts(column) if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)) \
            else column
        text = pc.utf8_trim_whitespace(text)
        looks = pc.fill_null(pc.match_substring_regex(text, _NUMBER), True)
        bad = ~np.asarray(looks.to_numpy(zero_copy_only=False), dtype=bool)
        if 0 < bad.sum() <= FEW_NON_NUMBERS * len(column):  # few: check those with float()
            cells = np.asarray(pc.take(text, pa.array(np.flatnonzero(bad))).to_pylist(), object)
            numbers_after_all = {v for v in set(cells.tolist()) if _is_number(v)}
            if numbers_after_all:
                bad[np.flatnonzero(bad)[np.isin(cells, list(numbers_after_all))]] = False
        parts.append(bad)
    return np.concatenate(parts), present


def _is_number(value: str) -> bool:
    return not _is_text(value)


def _cells(rows: _Rows, name: str, where: np.ndarray) -> list[Any]:
    return [_cell(rows, name, int(r)) for r in where]


def _cell(rows: _Rows, name: str, row: int) -> Any:
    """The value of column ``name`` at row ``row`` (counted over every file), as written."""
    k = int(np.searchsorted(rows.offsets, row, side="right")) - 1
    return rows.tables[k].columns[name][row - int(rows.offsets[k])].as_py()


def _site_profiles(
    rows: _Rows, sites: _Sites, features: list[str], numeric: list[bool]
) -> dict[str, SiteSchema]:
    """Each client's feature columns as :func:`~consortium.data.harmonize.check_schemas`
    compares them for errors: the distinct values of every column that is not numeric everywhere
    (the distinct (client, value) pairs: one ``np.bincount``, or ``np.unique`` when there are
    many more pairs than rows); numeric columns are left out."""
    profiles: dict[str, dict[str, ColumnProfile]] = {name: {} for name in sites.names}
    for name, num in zip(features, numeric):
        if num:  # numbers everywhere: no coding to compare, and no error to find
            continue
        codes, categories = _source(rows, name, False).read()
        keys = [code_key(c) for c in categories]
        is_text = np.array([_is_text(c) for c in categories], dtype=bool)
        width = max(len(categories), 1)
        pair = (sites.of_row * width + codes)[codes >= 0]
        if len(sites.names) * width <= max(4 * len(codes), 1 << 20):
            pairs = np.flatnonzero(np.bincount(pair, minlength=1))  # O(rows), no sort
        else:
            pairs = np.unique(pair)
        site_of, code_of = np.divmod(pairs, width)
        bounds = np.searchsorted(site_of, np.arange(len(sites.names) + 1))
        for s, site in enumerate(sites.names):
            mine = code_of[bounds[s]:bounds[s + 1]]
            found = frozenset(keys[int(c)] for c in mine) if len(mine) <= MAX_CODES else None
            kind: Literal["numbers", "text", "missing"] = (
                "text" if is_text[mine].any() else "numbers" if len(mine) else "missing")
            profiles[site][name] = ColumnProfile(kind, None, len(mine), found)
    return {site: SiteSchema(columns) for site, columns in profiles.items()}


def _is_text(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return True
    return False


def _split(sites: _Sites, y: np.ndarray, *, seed: int, test_fraction: float) -> SplitRows:
    """Each client's train and test rows: the client's rows in file order (one stable sort by
    client), split by :func:`holdout` with the client's own seeded draw."""
    order = np.argsort(sites.of_row, kind="stable")
    bounds = np.cumsum([0, *np.bincount(sites.of_row, minlength=len(sites.names))])
    train, test = [], []
    for s, name in enumerate(sites.names):
        mine = order[bounds[s]:bounds[s + 1]]
        keep, held = holdout(
            y[mine], fraction=test_fraction, rng=generator(seed, "files", "split", name)
        )
        train.append(mine[keep])
        test.append(mine[held])

    def offsets(parts: list[np.ndarray]) -> np.ndarray:
        return np.cumsum([0, *(len(p) for p in parts)]).astype(np.int64)

    return SplitRows(np.concatenate(train), offsets(train), np.concatenate(test), offsets(test))


def _raw_matrix(table: Table, features: Sequence[str], numeric: Sequence[bool]) -> np.ndarray:
    """A site's raw feature table: float with NaN when all columns are numeric, else object
    (numbers as floats, text as ``str``, ``None`` for missing)."""
    cols: list[np.ndarray] = []
    for name, num in zip(features, numeric):
        if num:
            col = numbers(table.columns[name])
            assert col is not None
            bad = np.flatnonzero(np.isinf(col))
            if bad.size:
                raise DataError(
                    f"{table.path} {table.where(int(bad[0]))} has an infinite value in column "
                    f"{name!r}; replace it with a number or leave it empty"
                )
            cols.append(col)
        else:
            cols.append(np.asarray(texts(table.columns[name]).to_numpy(zero_copy_only=False),
                                   dtype=object))
    if all(numeric):
        return np.stack(cols, axis=1)
    return np.stack([c.astype(object) for c in cols], axis=1)
