"""The user's own tables, CSV or Parquet: one client per file, or per value of a site column."""

from __future__ import annotations

import csv
import glob
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from consortium.data._assemble import ClientArrays, assemble
from consortium.data._rng import generator
from consortium.data.base import FederatedDataset
from consortium.data.holdout import holdout
from consortium.data.partition import natural
from consortium.data.preprocess import Column, encode_sites
from consortium.errors import DataError, MissingExtraError

__all__ = [
    "MISSING_TOKENS", "SiteTable", "label_order", "load_csv", "load_parquet", "load_site_csv",
    "read_site_table",
]

#: CSV cells that mean "missing" (compared after stripping, case-insensitively).
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})

Format = Literal["csv", "parquet"]


@dataclass(frozen=True)
class _Table:
    """One site's columns as Python values (``None`` = missing), and the file they came from."""

    path: Path
    site: str
    names: list[str]
    values: dict[str, list[Any]]
    # Where row ``i`` is in the file, for error messages ("line 7", "row 6").
    where: Callable[[int], str]

    @property
    def rows(self) -> int:
        return len(self.values[self.names[0]])


def load_csv(
    *, path: str, target: str, seed: int, site_column: str = "", test_fraction: float = 0.25
) -> FederatedDataset:
    """Federated data from CSV files: see :func:`load_parquet`, which reads the same way.

    Files are read with Python's ``csv`` module: comma-separated, a header row naming the
    columns, UTF-8 (a byte-order mark is allowed). Cells in :data:`MISSING_TOKENS` (empty,
    ``NA``, ``NaN``, ``null``, ``?`` ...) are missing.
    """
    return _load(
        "csv",
        path=path,
        target=target,
        seed=seed,
        site_column=site_column,
        test_fraction=test_fraction,
    )


def load_parquet(
    *, path: str, target: str, seed: int, site_column: str = "", test_fraction: float = 0.25
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
        is categorical and one-hot encoded over the union of the sites' values. Missing values
        get an indicator column and are imputed (see :mod:`consortium.data.preprocess`).

    Each site holds out ``test_fraction`` of its rows (stratified, seeded by ``seed`` and the
    site's name) as its test split.

    Raises:
        DataError: no matching file, an unreadable or empty file, files with different columns,
            a missing target or site column (the message lists the columns found), a missing
            label (the message names file and row), or fewer than two label values.
        MissingExtraError: if ``pyarrow`` is not installed.
    """
    return _load(
        "parquet",
        path=path,
        target=target,
        seed=seed,
        site_column=site_column,
        test_fraction=test_fraction,
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
    _table: _Table

    def split(
        self, *, classes: Sequence[Any], seed: int, test_fraction: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(x_train, y_train, x_test, y_test)``: raw features and labels numbered by their
        place in ``classes`` (every site's labels, in :func:`label_order`), split as
        :func:`load_csv` splits this file."""
        index = {k: i for i, k in enumerate(classes)}
        unknown = sorted(self.labels - set(index), key=_sort_key)
        if unknown:
            raise DataError(f"{self._table.path} holds label {unknown[0]!r}, not among {list(classes)}")
        x = _matrix(self._table, self.features, self.numeric)
        y = np.array([index[_label_key(v)] for v in self._table.values[self.target]], dtype=np.int64)
        keep, held = holdout(
            y, fraction=test_fraction, rng=generator(seed, "files", "split", self.site)
        )
        return x[keep], y[keep], x[held], y[held]


def read_site_table(path: str | Path, *, target: str) -> SiteTable:
    """Read one site's CSV file for a federated encoding (see :class:`SiteTable`).

    Raises:
        DataError: an unreadable file, a missing target or feature columns, or a row without
            a label.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{str(p)!r} is not a file; give the site's CSV file")
    table = _read_csv(p)
    _require_column(table, target, "target", "the label column")
    features = tuple(c for c in table.names if c != target)
    if not features:
        raise DataError(
            f"{table.path} has no feature columns besides the target {target!r}; "
            "add the columns to learn from"
        )
    labels: set[Any] = set()
    for i, v in enumerate(table.values[target]):
        if v is None:
            raise DataError(
                f"{table.path} {table.where(i)} has no value in the target column {target!r}; "
                "fill it in or drop the row"
            )
        labels.add(_label_key(v))
    numeric = tuple(_all_numeric(table.values[c]) for c in features)
    return SiteTable(table.site, features, numeric, frozenset(labels), target, table)


def label_order(labels: Iterable[Any]) -> list[Any]:
    """Label values in the order :func:`load_csv` numbers them (numbers first, then text)."""
    return sorted(set(labels), key=_sort_key)


def _load(
    fmt: Format, *, path: str, target: str, seed: int, site_column: str, test_fraction: float,
    single: bool = False,
) -> FederatedDataset:
    paths = _resolve(path, fmt)
    tables = [_read_csv(p) if fmt == "csv" else _read_parquet(p) for p in paths]
    _check_same_columns(tables)
    _require_column(tables[0], target, "target", "the label column")
    sites = tables[:1] if single else _sites(tables, site_column)
    features = [c for c in tables[0].names if c not in (target, site_column)]
    if not features:
        raise DataError(
            f"{tables[0].path} has no feature columns besides the target {target!r}; "
            "add the columns to learn from"
        )
    classes = _classes(sites, target)
    numeric = [all(_all_numeric(s.values[c]) for s in sites) for c in features]
    columns = [Column(c, "numeric" if num else "categorical") for c, num in zip(features, numeric)]

    trains, tests, y_trains, y_tests = [], [], [], []
    for site in sites:
        x = _matrix(site, features, numeric)
        y = np.array([classes[_label_key(v)] for v in site.values[target]], dtype=np.int64)
        keep, held = holdout(
            y, fraction=test_fraction, rng=generator(seed, "files", "split", site.site)
        )
        trains.append(x[keep])
        tests.append(x[held])
        y_trains.append(y[keep])
        y_tests.append(y[held])
    encoder, x_trains, x_tests = encode_sites(trains, tests, columns=columns)
    clients = [
        ClientArrays(site.site, x_trains[i], y_trains[i], x_tests[i], y_tests[i])
        for i, site in enumerate(sites)
    ]
    labels = ", ".join(f"{i}={k}" for k, i in classes.items())
    return assemble(
        fmt,
        clients,
        num_classes=len(classes),
        input_shape=(encoder.num_features,),
        feature_names=encoder.feature_names,
        notes={"path": path, "target": target, "labels": labels},
    )


# -- finding and reading files ------------------------------------------------------------------


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


def _read_csv(path: Path) -> _Table:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [(n, r) for n, r in enumerate(csv.reader(handle), start=1) if any(r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"cannot read {path} as CSV: {exc}; it must be a UTF-8, comma-separated text file"
        ) from exc
    if not rows:
        raise DataError(f"{path} is empty; expected a header row naming the columns, then rows")
    header = [h.strip() for h in rows[0][1]]
    _check_header(path, header)
    body = rows[1:]
    if not body:
        raise DataError(f"{path} has a header but no rows; add data or remove the file")
    values: dict[str, list[Any]] = {h: [] for h in header}
    for line, row in body:
        if len(row) != len(header):
            raise DataError(
                f"{path} line {line} has {len(row)} fields, the header has {len(header)}; "
                "fix the row (a comma inside a value needs quotes)"
            )
        for h, cell in zip(header, row):
            values[h].append(None if cell.strip().lower() in MISSING_TOKENS else cell.strip())
    lines = [line for line, _ in body]
    return _Table(path, path.stem, header, values, lambda i: f"line {lines[i]}")


def _read_parquet(path: Path) -> _Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError("reading parquet", "parquet", "pyarrow") from None
    try:
        data = pq.read_table(path).to_pydict()
    except Exception as exc:  # pyarrow raises its own ArrowInvalid, OSError ...
        raise DataError(
            f"cannot read {path} as Parquet: {exc}; check that it is a Parquet file"
        ) from exc
    header = list(data)
    _check_header(path, header)
    if not header:
        raise DataError(f"{path} has no columns; expected a table with a header")
    if not data[header[0]]:
        raise DataError(f"{path} has no rows; add data or remove the file")
    values = {h: [None if _missing(v) else v for v in data[h]] for h in header}
    return _Table(path, path.stem, header, values, lambda i: f"row {i + 1}")


def _check_header(path: Path, header: list[str]) -> None:
    seen: set[str] = set()
    for h in header:
        if not h:
            raise DataError(f"{path} has a column without a name; name every column")
        if h in seen:
            raise DataError(f"{path} has two columns named {h!r}; column names must be unique")
        seen.add(h)


def _check_same_columns(tables: list[_Table]) -> None:
    first = tables[0]
    for t in tables[1:]:
        if set(t.names) != set(first.names):
            extra = sorted(set(t.names) - set(first.names))
            lacking = sorted(set(first.names) - set(t.names))
            raise DataError(
                f"{t.path} has different columns from {first.path}: extra {extra}, lacking "
                f"{lacking}; every site's file must have the same columns"
            )


def _require_column(table: _Table, name: str, key: str, what: str) -> None:
    if not name:
        raise DataError(
            f"data.{key} is not set; set it to {what}, one of: {', '.join(table.names)}"
        )
    if name not in table.names:
        raise DataError(
            f"{what} {name!r} (data.{key}) is not a column of {table.path}; columns found: "
            f"{', '.join(table.names)}"
        )


# -- sites, labels and features ----------------------------------------------------------------


def _sites(tables: list[_Table], site_column: str) -> list[_Table]:
    """One table per client, named by the file's stem or by the site column's value."""
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
        return tables
    (table,) = tables
    if not site_column:
        raise DataError(
            f"only one file, {table.path}, was found, and data.site_column is not set; set it to "
            f"the column that names each row's site (one of: {', '.join(table.names)}), or give "
            "one file per site"
        )
    _require_column(table, site_column, "site_column", "the site column")
    raw = table.values[site_column]
    for i, v in enumerate(raw):
        if v is None:
            raise DataError(
                f"{table.path} {table.where(i)} has no value in the site column "
                f"{site_column!r}; every row needs a site"
            )
    names = [str(_label_key(v)) for v in raw]
    sites = []
    for rows in natural(names):
        name = names[rows[0]]
        values = {h: [table.values[h][i] for i in rows] for h in table.names}
        sites.append(
            _Table(
                table.path,
                name,
                table.names,
                values,
                _row_locator(table, rows),
            )
        )
    return sites


def _classes(sites: list[_Table], target: str) -> dict[Any, int]:
    seen: set[Any] = set()
    for site in sites:
        for i, v in enumerate(site.values[target]):
            if v is None:
                raise DataError(
                    f"{site.path} {site.where(i)} has no value in the target column "
                    f"{target!r}; fill it in or drop the row"
                )
            seen.add(_label_key(v))
    if len(seen) < 2:
        raise DataError(
            f"the target column {target!r} has only the value {next(iter(seen))}; "
            "a classifier needs at least two label values"
        )
    return {k: i for i, k in enumerate(sorted(seen, key=_sort_key))}


def _matrix(site: _Table, features: Sequence[str], numeric: Sequence[bool]) -> np.ndarray:
    """A site's raw feature table: float with NaN when all columns are numeric, else object."""
    cols: list[np.ndarray] = []
    for name, num in zip(features, numeric):
        values = site.values[name]
        if num:
            col = np.array([math.nan if v is None else float(v) for v in values])
            bad = np.flatnonzero(np.isinf(col))
            if bad.size:
                raise DataError(
                    f"{site.path} {site.where(int(bad[0]))} has an infinite value in column "
                    f"{name!r}; replace it with a number or leave it empty"
                )
            cols.append(col)
        else:
            cols.append(np.array([None if v is None else str(v) for v in values], dtype=object))
    if all(numeric):
        return np.stack(cols, axis=1)
    return np.stack([c.astype(object) for c in cols], axis=1)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _number(v: Any) -> float | None:
    """``v`` as a number, or ``None`` if it is not one."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _all_numeric(values: list[Any]) -> bool:
    return all(v is None or _number(v) is not None for v in values)


def _label_key(v: Any) -> Any:
    """Label values compare as numbers when they are numbers ("1", 1 and 1.0 are one label)."""
    num = _number(v)
    if num is None:
        return str(v)
    return int(num) if num.is_integer() else num


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) else (1, v)


def _row_locator(table: _Table, rows: np.ndarray) -> Callable[[int], str]:
    """Where row ``i`` of a site cut from ``table`` sits in the original file."""
    return lambda i: table.where(int(rows[i]))
