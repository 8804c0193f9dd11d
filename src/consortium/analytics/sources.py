"""Each site's raw table, for analysis: the same data sources as ``consortium run`` reads.

Analysis describes the data as the sites recorded them, before any encoding: the embedded
heart-disease files keep their raw codes and their zeros (Switzerland's cholesterol is 0 for
every patient, which the bias report must see; training reads those zeros as missing), CSV and
Parquet files are read by the same pyarrow readers as training (one site per file, or per value
of ``data.site_column``), and ``data.harmonize`` is applied at each site first.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import numpy as np

from consortium.config import DataConfig
from consortium.data._tables import Table, label_codes, read_csv_table, read_parquet_table
from consortium.errors import DataError

__all__ = ["heart_disease_tables", "site_table", "site_tables"]


def site_tables(data: DataConfig) -> dict[str, Table]:
    """Every site's raw table, site id → :class:`~consortium.data._tables.Table`, harmonised
    with ``data.harmonize`` when set.

    Raises:
        DataError: a data set analysis does not read (it reads tables: ``heart-disease``,
            ``csv``, ``parquet``), or a file problem (as ``consortium run`` reports it).
    """
    if data.dataset == "heart-disease":
        tables = heart_disease_tables()
    elif data.dataset in ("csv", "parquet"):
        tables = _file_tables(data)
    else:
        raise DataError(
            f"consortium analyze reads tables; data.dataset = {data.dataset!r} is generated "
            "features. Use heart-disease, csv or parquet"
        )
    if data.harmonize:
        from consortium.data.harmonize import apply, load_harmonization

        spec = load_harmonization(data.harmonize)
        tables = {site: apply(t, spec, site=site) for site, t in tables.items()}
    return tables


def heart_disease_tables() -> dict[str, Table]:
    """The four hospitals' files as recorded: 14 numeric columns (``num`` the diagnosis,
    0–4), ``?`` missing, zeros kept."""
    from consortium.data.heart_disease import SITES

    out: dict[str, Table] = {}
    for site, name in SITES.items():
        text = (files("consortium.data") / "_heart_disease" / name).read_text(encoding="ascii")
        out[site] = _hospital(text, Path(name), site)
    return out


def _hospital(text: str, path: Path, site: str) -> Table:
    import pyarrow as pa

    from consortium.data.heart_disease import COLUMNS

    rows = [line.strip().split(",") for line in text.splitlines() if line.strip()]
    if not rows or any(len(r) != len(COLUMNS) for r in rows):
        raise DataError(
            f"{path} is not a heart-disease hospital file: every line must hold "
            f"{len(COLUMNS)} comma-separated values ({', '.join(COLUMNS)})"
        )
    cells = np.array(rows, dtype=object)
    columns: dict[str, Any] = {}
    for j, col in enumerate(COLUMNS):
        raw = cells[:, j]
        try:
            values = np.where(raw == "?", np.nan, raw).astype(np.float64)
        except ValueError:
            raise DataError(f"{path}: column {col!r} holds a value that is not a number or "
                            "'?'") from None
        columns[col] = pa.array(values, from_pandas=True)
    return Table(path, site, list(COLUMNS), columns, lambda i: f"line {i + 1}")


def site_table(data: DataConfig, path: str | Path, site: str, harmonize: Any = None) -> Table:
    """A deployed site's own raw table, named ``site``: its file (``consortium client --data``)
    read as ``data.dataset`` says — a hospital file for ``heart-disease`` (as
    :func:`heart_disease_tables` reads the packaged ones), else a CSV or Parquet file, without
    ``data.site_column`` — then harmonised with the site's own ``harmonize``
    (:class:`~consortium.data.harmonize.Harmonization`, its ``[site.<site>]`` sections too).

    Raises:
        DataError: an unreadable or malformed file, or a data set analysis does not read.
    """
    p = Path(path)
    if data.dataset == "heart-disease":
        try:
            text = p.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {str(p)!r}: {exc}") from None
        table = _hospital(text, p, site)
    elif data.dataset in ("csv", "parquet"):
        read = read_csv_table if data.dataset == "csv" else read_parquet_table
        found = _without(read(p), data.site_column)
        table = Table(found.path, site, found.names, found.columns, found.where)
    else:
        raise DataError(
            f"analysis reads tables; data.dataset = {data.dataset!r} is generated features. "
            "Use heart-disease, csv or parquet"
        )
    if harmonize is not None:
        from consortium.data.harmonize import apply

        table = apply(table, harmonize, site=site)
    return table


def _file_tables(data: DataConfig) -> dict[str, Table]:
    from consortium.data.files import _resolve

    fmt: Literal["csv", "parquet"] = "csv" if data.dataset == "csv" else "parquet"
    paths = _resolve(data.path, fmt)
    read = read_csv_table if fmt == "csv" else read_parquet_table
    tables = [read(p) for p in paths]
    if len(tables) > 1:
        stems = [t.site for t in tables]
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        if dupes:
            raise DataError(
                f"several files are named {dupes[0]!r}; sites are named after their files, so "
                "rename them to be unique"
            )
        return {t.site: _without(t, data.site_column) for t in tables}
    (table,) = tables
    if not data.site_column:
        return {table.site: table}
    return _split_by_site(table, data.site_column)


def _without(table: Table, column: str) -> Table:
    if not column or column not in table.columns:
        return table
    names = [c for c in table.names if c != column]
    return Table(table.path, table.site, names, {c: table.columns[c] for c in names}, table.where)


def _one(column: Any) -> Any:
    return column.combine_chunks() if hasattr(column, "combine_chunks") else column


def _split_by_site(table: Table, site_column: str) -> dict[str, Table]:
    """One table per value of the site column, in order of first appearance (whole-column
    work: one stable sort of the row indices, then a take per column)."""
    import pyarrow as pa

    if site_column not in table.columns:
        raise DataError(
            f"{table.path} has no column {site_column!r} (data.site_column); its columns are "
            f"{', '.join(table.names)}"
        )
    codes, keys = label_codes(table.columns[site_column])
    if (codes < 0).any():
        raise DataError(
            f"{table.path} {table.where(int(np.flatnonzero(codes < 0)[0]))} has no value in the "
            f"site column {site_column!r}; every row needs a site"
        )
    names = [c for c in table.names if c != site_column]
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(keys) + 1))
    _, first = np.unique(codes, return_index=True)
    idx = pa.array(order)
    grouped = {c: _one(table.columns[c]).take(idx) for c in names}  # one take per column
    out: dict[str, Table] = {}
    for code in np.argsort(first):
        start, stop = int(bounds[code]), int(bounds[code + 1])
        rows = order[start:stop]
        cols = {c: grouped[c].slice(start, stop - start) for c in names}  # zero-copy
        site = str(keys[code])

        def where(i: int, rows: np.ndarray = rows) -> str:
            return table.where(int(rows[i]))

        out[site] = Table(table.path, site, names, cols, where)
    return out
