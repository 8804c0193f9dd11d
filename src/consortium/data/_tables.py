"""The user's table files read into typed columns with pyarrow, and their values classified
(number or text, missing or not, label keys) one whole column at a time.

Why pyarrow: its CSV and Parquet readers are multi-threaded C++ that return typed columns
without a Python object per cell, and ``pyarrow.compute`` has the kernels this needs (trim,
lower-case, membership, cast, dictionary encoding). pandas would put a second in-memory
format on top of the same Arrow readers, and polars would add a second large dependency
whose CSV dialect strays further from Python's ``csv`` module, which defined what consortium
accepts so far. Python runs only per *distinct* value (label keys, category names, a
fallback for number spellings Arrow does not parse) and on the error paths, where a CSV file
is re-read with ``csv`` to name the exact line.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from consortium.errors import DataError, MissingExtraError

__all__ = [
    "MISSING_TOKENS", "Table", "category_codes", "label_codes", "label_key", "numbers",
    "read_csv_table", "read_parquet_table", "sort_key", "texts",
]

#: CSV cells that mean "missing" (compared after stripping, case-insensitively).
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})


@dataclass(frozen=True)
class Table:
    """One file's columns as pyarrow arrays (null, or a float NaN, is a missing value).

    CSV columns are strings, stripped, with :data:`MISSING_TOKENS` already null; Parquet
    columns keep their stored types.
    """

    path: Path
    site: str
    names: list[str]
    columns: dict[str, Any]
    # Where row ``i`` is in the file, for error messages ("line 7", "row 6").
    where: Callable[[int], str]

    @property
    def rows(self) -> int:
        return len(self.columns[self.names[0]])


def _arrow(what: str) -> Any:
    try:
        import pyarrow as pa
        import pyarrow.compute  # pa.compute
    except ImportError:
        raise MissingExtraError(what, "parquet", "pyarrow") from None
    return pa


# -- CSV ---------------------------------------------------------------------------------------


def read_csv_table(path: Path) -> Table:
    """Read a comma-separated UTF-8 file with a header row, as Python's ``csv`` module reads it.

    Records whose fields are all empty are skipped; cells are stripped and those in
    :data:`MISSING_TOKENS` (case-insensitively) become null.
    """
    pa = _arrow("reading CSV")
    import pyarrow.csv as pcsv

    header = _csv_header(path)
    _check_header(path, header)
    width = len(header)

    def on_bad_row(row: Any) -> str:
        # Python's csv skipped records whose fields are all empty, whatever their count.
        return "skip" if not any(next(csv.reader([row.text]), [])) else "error"

    try:
        raw = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(autogenerate_column_names=True),
            parse_options=pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_bad_row),
            convert_options=pcsv.ConvertOptions(
                column_types={f"f{i}": pa.string() for i in range(width)},
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        _diagnose_csv(path, width)  # raises the precise error when it finds one
        raise DataError(
            f"cannot read {path} as CSV: {exc}; it must be a UTF-8, comma-separated text file"
        ) from exc
    cells = [raw.column(i) for i in range(width)]
    body = _body_rows(pa, cells)
    if body is None:
        raise DataError(f"{path} has a header but no rows; add data or remove the file")
    columns = _clean_csv_columns(pa, header, [body(c) for c in cells])
    lines = _LineNumbers(path)
    return Table(path, path.stem, header, columns, lambda i: f"line {lines(i)}")


def _csv_header(path: Path) -> list[str]:
    """The first record with a non-empty field, stripped (the old reader's header)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            for record in csv.reader(handle):
                if any(record):
                    return [h.strip() for h in record]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"cannot read {path} as CSV: {exc}; it must be a UTF-8, comma-separated text file"
        ) from exc
    raise DataError(f"{path} is empty; expected a header row naming the columns, then rows")


def _body_rows(pa: Any, cells: list[Any]) -> Callable[[Any], Any] | None:
    """A function cutting a raw column to the data rows: without all-empty records (which
    Python's csv skipped) and without the header; ``None`` when no data row is left."""
    blank: Any = None
    for c in cells:
        empty = pa.compute.equal(c, "")
        blank = empty if blank is None else pa.compute.and_(blank, empty)
    keep = np.flatnonzero(~blank.to_numpy(zero_copy_only=False))
    if len(keep) <= 1:
        return None
    if len(keep) == len(blank):
        return lambda c: c.slice(1)
    rows = pa.array(keep[1:])
    return lambda c: c.take(rows)


def _clean_csv_columns(pa: Any, header: list[str], cells: list[Any]) -> dict[str, Any]:
    """Strip every cell and make :data:`MISSING_TOKENS` null: the file's columns end to end
    as one array, so that a file costs a handful of kernel calls, not a handful per column."""
    pc = pa.compute
    joined = pa.chunked_array([c for column in cells for c in column.chunks], pa.string())
    stripped = pc.utf8_trim_whitespace(joined.combine_chunks())
    missing = pc.is_in(pc.utf8_lower(stripped), value_set=pa.array(sorted(MISSING_TOKENS)))
    clean = pc.if_else(missing, pa.scalar(None, pa.string()), stripped)
    rows = len(cells[0])
    return {h: clean.slice(i * rows, rows) for i, h in enumerate(header)}


def _diagnose_csv(path: Path, width: int) -> None:
    """Re-read ``path`` with Python's csv to raise the error the old reader raised, if any."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            records = [(n, r) for n, r in enumerate(csv.reader(handle), start=1) if any(r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"cannot read {path} as CSV: {exc}; it must be a UTF-8, comma-separated text file"
        ) from exc
    if len(records) < 2:
        raise DataError(f"{path} has a header but no rows; add data or remove the file")
    for line, row in records[1:]:
        if len(row) != width:
            raise DataError(
                f"{path} line {line} has {len(row)} fields, the header has {width}; "
                "fix the row (a comma inside a value needs quotes)"
            )


class _LineNumbers:
    """Data row ``i`` → its record number in the file (1 = the first record), found by
    re-reading the file with Python's csv: used only to name a bad row in an error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lines: list[int] | None = None

    def __call__(self, i: int) -> int:
        if self._lines is None:
            with self.path.open(newline="", encoding="utf-8-sig") as handle:
                numbered = enumerate(csv.reader(handle), start=1)
                self._lines = [n for n, r in numbered if any(r)][1:]
        return self._lines[i]


# -- Parquet -----------------------------------------------------------------------------------


def read_parquet_table(path: Path) -> Table:
    """Read a Parquet file's columns as stored (dictionary columns decoded)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError("reading parquet", "parquet", "pyarrow") from None
    pa = _arrow("reading parquet")
    try:
        data = pq.ParquetFile(path, pre_buffer=False)
        header = list(data.schema_arrow.names)
        _check_header(path, header)
        if not header:
            raise DataError(f"{path} has no columns; expected a table with a header")
        if data.metadata.num_rows == 0:
            raise DataError(f"{path} has no rows; add data or remove the file")
        # Column by column, each made one contiguous array: then a float column without
        # nulls reaches numpy without a copy, and the row groups of only one column are
        # held twice at a time.
        columns = {h: _one_array(pa, data.read(columns=[h]).column(0)) for h in header}
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises its own ArrowInvalid, OSError ...
        raise DataError(
            f"cannot read {path} as Parquet: {exc}; check that it is a Parquet file"
        ) from exc
    return Table(path, path.stem, header, columns, lambda i: f"row {i + 1}")


def _one_array(pa: Any, column: Any) -> Any:
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column.combine_chunks()


def _check_header(path: Path, header: list[str]) -> None:
    seen: set[str] = set()
    for h in header:
        if not h:
            raise DataError(f"{path} has a column without a name; name every column")
        if h in seen:
            raise DataError(f"{path} has two columns named {h!r}; column names must be unique")
        seen.add(h)


# -- values ------------------------------------------------------------------------------------


def _without_nan(pa: Any, column: Any) -> Any:
    """One array in which a float NaN is null, as a missing value."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if pa.types.is_floating(column.type):
        column = pa.compute.if_else(pa.compute.is_nan(column), None, column)
    return column


def numbers(column: Any) -> np.ndarray | None:
    """``column`` as float64 with NaN for missing values, or ``None`` when some present value
    is not a number (the column is then categorical).

    Numbers are what Python's ``float`` accepts: booleans, integers, floats, and text such as
    ``"1.5"``, ``" 2e3 "`` or ``"inf"``. Arrow's cast parses text; spellings it rejects but
    Python accepts (``"1_000"``) are checked per distinct value.
    """
    pa = _arrow("reading tables")
    pc = pa.compute
    kind = column.type
    if column.null_count == len(column):
        return np.full(len(column), np.nan)
    if kind == pa.float64():
        as_float = column  # a cast to the same type would still copy
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        as_float = pc.cast(column, pa.float64(), safe=False)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
        distinct = pc.count_distinct(column).as_py()
        if distinct <= max(64, len(column) // 8):  # a coded column: parse each value once
            return _numbers_by_value(pa, column)
        try:
            as_float = pc.cast(pc.utf8_trim_whitespace(column), pa.float64())
        except pa.ArrowInvalid:
            return _numbers_by_value(pa, column)
    else:
        return None
    if as_float.null_count:
        as_float = pc.fill_null(as_float, np.nan)
    return np.asarray(as_float.to_numpy(zero_copy_only=False))


def _numbers_by_value(pa: Any, column: Any) -> np.ndarray | None:
    encoded = pa.compute.dictionary_encode(_without_nan(pa, column))
    values = []
    for v in encoded.dictionary.to_pylist():
        num = _number(v)
        if num is None:
            return None
        values.append(num)
    return _through(encoded, np.asarray(values, dtype=np.float64), np.nan)


def texts(column: Any) -> Any:
    """``column`` as a string array, values as ``str(v)`` writes them, null for missing."""
    pa = _arrow("reading tables")
    column = _without_nan(pa, column)
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column.cast(pa.string())
    if pa.types.is_integer(kind):
        return column.cast(pa.string())
    # Floats, booleans, dates ... print differently in Arrow ("30" for 30.0, "true"):
    # such a column is text only when another site's file holds text in it.
    return pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())


def category_codes(column: Any) -> tuple[np.ndarray, list[str]]:
    """``(codes, categories)``: each row's index into ``categories`` (-1 when missing), for
    a text column; a value that is empty after stripping is missing."""
    pa = _arrow("reading tables")
    pc = pa.compute
    column = texts(column)
    blank = pc.equal(pc.utf8_trim_whitespace(column), "")
    encoded = pc.dictionary_encode(pc.if_else(blank, pa.scalar(None, pa.string()), column))
    codes = pc.fill_null(encoded.indices.cast(pa.int64()), -1).to_numpy(zero_copy_only=False)
    return np.asarray(codes), encoded.dictionary.to_pylist()


def label_codes(column: Any) -> tuple[np.ndarray, list[Any]]:
    """``(codes, keys)``: each row's index into ``keys`` (-1 when missing), where the keys
    are the distinct values under :func:`label_key` (``"1"``, ``1`` and ``1.0`` are one)."""
    pa = _arrow("reading tables")
    encoded = pa.compute.dictionary_encode(_without_nan(pa, column))
    keys: list[Any] = []
    index: dict[Any, int] = {}
    of_value = []
    for v in encoded.dictionary.to_pylist():
        k = label_key(v)
        if k not in index:
            index[k] = len(keys)
            keys.append(k)
        of_value.append(index[k])
    return _through(encoded, np.asarray(of_value), -1).astype(np.int64), keys


def _through(encoded: Any, values: np.ndarray, missing: float) -> np.ndarray:
    """``values[index]`` for each row of a dictionary-encoded array, ``missing`` for null."""
    pa = _arrow("reading tables")
    indices = pa.compute.fill_null(encoded.indices.cast(pa.int64()), -1)
    idx = np.asarray(indices.to_numpy(zero_copy_only=False))
    lookup = np.append(values.astype(np.float64), missing)
    return lookup[idx]


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


def label_key(v: Any) -> Any:
    """Label values compare as numbers when they are numbers ("1", 1 and 1.0 are one label)."""
    num = _number(v)
    if num is None:
        return str(v)
    return int(num) if num.is_integer() else num


def sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) else (1, v)
