"""Data harmonisation: a ``harmonize.toml`` that renames columns, maps each site's codes to common
ones and converts units, applied at every site before training or a query; and the cross-site
schema check that finds what still differs.

Different hospitals code the same thing differently (``M``/``F`` at one, ``male``/``female`` at
another, cholesterol in mmol/L here and mg/dL there). Left alone, a one-hot encoder turns the
two codings of sex into four unrelated columns and a model reads mmol/L as a 38-fold smaller
cholesterol. The file says, once for the consortium, what the common codes and units are::

    [rename]                    # old name = common name, wherever the old name exists
    "Sex" = "sex"

    [map.sex]                   # a site's code = the common code ("" = missing)
    M = "male"
    F = "female"
    "1" = "male"                # a number in the file (1, 1.0, " 1 ") matches "1"

    [units.chol]                # the common unit; each site says what it records
    to = "mg/dL"
    substance = "cholesterol"   # mmol/L <-> mg/dL depends on the substance

    [site.hungary.units.chol]   # only this site records in mmol/L
    from = "mmol/L"

    [site.hungary.map.sex]      # codes only this site uses
    "0" = "female"

    [check]
    allow = ["notes"]           # columns whose codes may differ between sites

Renames come first, then code maps (a site's own map extends and overrides the global one),
then unit conversions; maps and units name columns by their new names. Sections are keyed by
the client id: the file's stem in simulation (as ``consortium run`` names clients), the
provisioned site name in a deployment, or the value of ``data.site_column``.

Unit conversions are arithmetic, ``to = from × factor + offset``, from the table in
:mod:`consortium.data.units` (exact definitions for kg/lb, cm/in and the temperature scales;
the conventional clinical factors between mmol/L and mg/dL), or an explicit ``factor`` (and
``offset``). Everything works on whole columns (``pyarrow.compute``, numpy); Python runs once
per distinct value of a mapped column, never per cell.

The cross-site check (:func:`check_schemas`, :mod:`consortium.data.schema_check`) is
re-exported here: load, apply, check is the whole API.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from consortium.data._tables import Table, label_key, numbers, texts
from consortium.data.schema_check import (
    MAX_CODES,
    ColumnProfile,
    Finding,
    SiteSchema,
    check_schemas,
    code_key,
    raise_for_errors,
    site_schema,
    site_schema_from_summary,
)
from consortium.data.units import SUBSTANCES, UNITS, Conversion, canonical_unit, conversion
from consortium.errors import ConfigError, DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "MAX_CODES",
    "SUBSTANCES",
    "UNITS",
    "ColumnProfile",
    "Conversion",
    "Finding",
    "Harmonization",
    "SiteSchema",
    "apply",
    "check_schemas",
    "code_key",
    "load_harmonization",
    "parse_harmonization",
    "raise_for_errors",
    "site_schema",
    "site_schema_from_summary",
]

_TOP_KEYS = ("rename", "map", "units", "site", "check")
_UNIT_KEYS = ("from", "to", "substance", "factor", "offset")


@dataclass(frozen=True)
class Harmonization:
    """A parsed ``harmonize.toml`` (see the module docstring); build it with
    :func:`load_harmonization` or :func:`parse_harmonization`.

    Attributes:
        rename: old column name → common name.
        maps: column → (:func:`code_key` of a site's code → common code, ``None`` = missing).
        units: column → the conversion every site applies (None: only the sites that declare
            a ``from`` convert).
        site_maps, site_units: per site, the same for that site alone (extending and
            overriding the global ones).
        unit_names: column → the common unit (``to``), where declared.
        allow: columns whose codes may differ between sites (no code check, maps not strict).
        source: where it was read from, for messages.
    """

    rename: Mapping[str, str] = field(default_factory=dict)
    maps: Mapping[str, Mapping[str, str | None]] = field(default_factory=dict)
    units: Mapping[str, Conversion | None] = field(default_factory=dict)
    site_maps: Mapping[str, Mapping[str, Mapping[str, str | None]]] = field(default_factory=dict)
    site_units: Mapping[str, Mapping[str, Conversion | None]] = field(default_factory=dict)
    unit_names: Mapping[str, str] = field(default_factory=dict)
    allow: frozenset[str] = frozenset()
    source: str = "harmonize.toml"

    @property
    def sites(self) -> frozenset[str]:
        """The sites named in ``[site.<name>]`` sections."""
        return frozenset(self.site_maps) | frozenset(self.site_units)

    def codes(self, column: str) -> dict[str, str]:
        """The common codes of ``column`` (every target any map declares), by :func:`code_key`."""
        found: dict[str, str] = {}
        for table in [self.maps.get(column, {}), *(m.get(column, {}) for m in self.site_maps.values())]:
            for target in table.values():
                if target is not None:
                    found.setdefault(code_key(target), target)
        return found

    def mapped_columns(self) -> frozenset[str]:
        """The columns some ``[map.<column>]`` (global or a site's) maps."""
        return frozenset(self.maps).union(*(m.keys() for m in self.site_maps.values()))

    def check_sites(self, names: Iterable[str]) -> None:
        """Raise :class:`ConfigError` if a ``[site.<name>]`` section names a site not among
        ``names`` (a typo would otherwise silently apply nowhere)."""
        known = set(names)
        unknown = sorted(self.sites - known)
        if unknown:
            raise ConfigError(
                f"{self.source} has a [site.{unknown[0]}] section, but no site is called "
                f"{unknown[0]!r}; the sites are {', '.join(sorted(known))} (file stems, or the "
                "values of data.site_column): fix the section's name"
            )


# -- reading the file -------------------------------------------------------------------------


def load_harmonization(path: str | Path) -> Harmonization:
    """Read and check a ``harmonize.toml`` (see the module docstring for its sections).

    A relative ``path`` is read from the current directory, as ``data.path`` is.

    Raises:
        ConfigError: a missing file, invalid TOML, an unknown section or key, a value of the
            wrong type, an unknown unit or a unit pair that needs a ``substance`` — the message
            names the key and the fix.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"harmonisation file {str(p)!r} does not exist (looked from {Path.cwd()}); fix "
            "data.harmonize, or give an absolute path"
        )
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {p} as TOML: {exc}; fix the file") from exc
    return parse_harmonization(doc, source=str(p))


def parse_harmonization(doc: Mapping[str, Any], *, source: str = "harmonize.toml") -> Harmonization:
    """A :class:`Harmonization` from an already parsed TOML document (see
    :func:`load_harmonization`, which raises the same errors)."""
    _only_keys(doc, _TOP_KEYS, source, "the top level")
    rename = _rename(doc.get("rename", {}), source)
    maps = _maps(doc.get("map", {}), source, "map")
    units_doc = _table(doc.get("units", {}), source, "units")
    for column, entry in units_doc.items():
        _only_keys(_table(entry, source, f"units.{column}"), _UNIT_KEYS, source, f"[units.{column}]")
    units = {c: _conversion(e, {}, source, f"units.{c}") for c, e in units_doc.items()}
    unit_names = {c: canonical_unit(str(e["to"]), source=source, where=f"units.{c}.to")
                  for c, e in units_doc.items() if "to" in e}
    site_maps: dict[str, dict[str, dict[str, str | None]]] = {}
    site_units: dict[str, dict[str, Conversion | None]] = {}
    for site, section in _table(doc.get("site", {}), source, "site").items():
        where = f"site.{site}"
        section = _table(section, source, where)
        if "rename" in section:
            raise ConfigError(
                f"{source}: [{where}.rename] is not supported; put renames in the global "
                "[rename] table (a rename applies wherever the old column exists)"
            )
        _only_keys(section, ("map", "units"), source, f"[{where}]")
        if "map" in section:
            site_maps[site] = _maps(section["map"], source, f"{where}.map")
        if "units" in section:
            site_units[site] = {}
            for column, entry in _table(section["units"], source, f"{where}.units").items():
                here = f"{where}.units.{column}"
                _only_keys(_table(entry, source, here), _UNIT_KEYS, source, f"[{here}]")
                site_units[site][column] = _conversion(entry, units_doc.get(column, {}), source, here)
    check = _table(doc.get("check", {}), source, "check")
    _only_keys(check, ("allow",), source, "[check]")
    allow = check.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(c, str) for c in allow):
        raise ConfigError(f'{source}: [check] allow must be a list of column names, e.g. ["notes"]')
    return Harmonization(rename, maps, units, site_maps, site_units, unit_names,
                         frozenset(allow), source)


def _table(value: Any, source: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(
            f"{source}: {where} must be a table ([{where}] with key = value lines), "
            f"not {type(value).__name__} {value!r}"
        )
    return value


def _only_keys(table: Mapping[str, Any], allowed: Sequence[str], source: str, where: str) -> None:
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r} in {where}; expected one of "
            f"{', '.join(allowed)}"
        )


def _rename(value: Any, source: str) -> dict[str, str]:
    rename = _table(value, source, "rename")
    for old, new in rename.items():
        if not isinstance(new, str) or not new.strip():
            raise ConfigError(
                f'{source}: [rename] {old!r} = {new!r}: the new name must be a non-empty string, '
                f'e.g. "{old}" = "{old.lower()}"'
            )
    targets: dict[str, str] = {}
    for old, new in rename.items():
        if new in targets:
            raise ConfigError(
                f"{source}: [rename] gives {targets[new]!r} and {old!r} the same new name "
                f"{new!r}; a column can have only one source"
            )
        targets[new] = old
    return {old.strip(): new.strip() for old, new in rename.items()}


def _maps(value: Any, source: str, where: str) -> dict[str, dict[str, str | None]]:
    out: dict[str, dict[str, str | None]] = {}
    for column, entries in _table(value, source, where).items():
        here = f"{where}.{column}"
        mapping: dict[str, str | None] = {}
        spelled: dict[str, str] = {}
        for code, target in _table(entries, source, here).items():
            if isinstance(target, bool) or not isinstance(target, (str, int, float)):
                raise ConfigError(
                    f'{source}: [{here}] {code!r} = {target!r}: the common code must be a string '
                    f'(or a number), e.g. "{code}" = "male"; "" makes the value missing'
                )
            key = code_key(code)
            if key in mapping:
                raise ConfigError(
                    f"{source}: [{here}] maps {spelled[key]!r} and {code!r}, which are the same "
                    "value (codes compare as stripped text, numbers by value); keep one"
                )
            text = target.strip() if isinstance(target, str) else str(label_key(target))
            mapping[key] = text or None
            spelled[key] = code
        out[column] = mapping
    return out


def _number(entry: Mapping[str, Any], key: str, source: str, where: str) -> float | None:
    if key not in entry:
        return None
    v = entry[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
        key == "factor" and v == 0
    ):
        raise ConfigError(f"{source}: {where}.{key} = {v!r} must be a finite number (factor ≠ 0)")
    return float(v)


def _conversion(
    entry: Mapping[str, Any], default: Mapping[str, Any], source: str, where: str
) -> Conversion | None:
    """The conversion an entry asks for (site entries inherit ``to``/``substance`` and, if they
    give no ``from``, everything from the global ``default``); None when there is none."""
    factor = _number(entry, "factor", source, where)
    offset = _number(entry, "offset", source, where)
    if factor is not None or offset is not None:
        return Conversion(1.0 if factor is None else factor, offset or 0.0, f"{where} factor/offset")
    if "from" not in entry and default:
        return _conversion(default, {}, source, where)
    if "from" not in entry:
        return None
    if "to" not in entry and "to" not in default:
        raise ConfigError(
            f"{source}: [{where}] says from = {entry['from']!r} but not which unit to convert "
            f"to; add to = \"...\" here or in the global [units.{where.rsplit('.', 1)[-1]}]"
        )
    unit_from = canonical_unit(str(entry["from"]), source=source, where=f"{where}.from")
    unit_to = canonical_unit(str(entry.get("to", default.get("to"))), source=source,
                             where=f"{where}.to")
    substance = entry.get("substance", default.get("substance"))
    return conversion(unit_from, unit_to, substance, source=source, where=where)


# -- applying it to a site's table ------------------------------------------------------------


def apply(table: Table, h: Harmonization, *, site: str | None = None, site_column: str = "") -> Table:
    """``table`` with ``h``'s renames, code maps and unit conversions applied (a new Table).

    Args:
        table: one file's columns (:mod:`consortium.data._tables`).
        h: the harmonisation.
        site: the client id whose ``[site.<name>]`` sections apply (default: the file's stem).
        site_column: for one file holding every site, the column naming each row's site (after
            renaming); each row then gets its own site's sections.

    Columns without a map or conversion are left exactly as read. A mapped column becomes text
    (missing stays missing); a converted one float64.

    Raises:
        DataError: a map or conversion names a column the file lacks, or a rename's old and new
            names are both absent or both present (the message names the file, the column and
            the columns found); a converted column holds a non-number; a mapped column holds a
            value that no map covers and that is not a common code (name, line and fix), unless
            the column is in ``[check] allow``.
    """
    names, columns = _renamed(table, h)
    table = replace(table, names=names, columns=columns)
    sites = _row_sites(table, h, site_column, table.site if site is None else site)
    for column in sorted(h.mapped_columns()):
        if _applies(h.maps, h.site_maps, column, sites):
            _require(table, column, h, f"[map.{column}]")
            columns[column] = _map_column(table, column, h, sites)
    for column in sorted(set(h.units).union(*(u.keys() for u in h.site_units.values()))):
        if _applies(h.units, h.site_units, column, sites):
            _require(table, column, h, f"[units.{column}]")
            converted = _convert_column(table, column, h, sites)
            if converted is not None:
                columns[column] = converted
    return replace(table, columns=columns)


@dataclass(frozen=True)
class _RowSites:
    """Which site's sections apply to each row: ``names[of_row[i]]`` (one name for a file)."""

    names: list[str]
    of_row: np.ndarray | None  # None: every row is names[0]


def _row_sites(table: Table, h: Harmonization, site_column: str, site: str) -> _RowSites:
    if not site_column or not h.sites:
        return _RowSites([site], None)
    _require(table, site_column, h, "data.site_column")
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(table.columns[site_column])
    names = [str(label_key(v)) for v in encoded.dictionary.to_pylist()] + [""]
    idx = np.asarray(pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False))
    return _RowSites(names, np.where(idx < 0, len(names) - 1, idx).astype(np.int64))


def _applies(glob: Mapping[str, Any], per_site: Mapping[str, Mapping[str, Any]], column: str,
             sites: _RowSites) -> bool:
    return column in glob or any(column in per_site.get(s, {}) for s in sites.names)


def _require(table: Table, column: str, h: Harmonization, what: str) -> None:
    if column not in table.names:
        raise DataError(
            f"{h.source} {what} names column {column!r}, which {table.path} does not have "
            f"(after renaming); columns found: {', '.join(table.names)}. Fix the name, or add "
            f'a [rename] entry "<its name here>" = "{column}"'
        )


def _renamed(table: Table, h: Harmonization) -> tuple[list[str], dict[str, Any]]:
    present = set(table.names)
    for old, new in h.rename.items():
        if old in present and new in present and h.rename.get(new) is None:
            raise DataError(
                f"{h.source} [rename] {old!r} = {new!r}, but {table.path} has both columns; "
                "drop one of them from the file, or remove the rename"
            )
        if old not in present and new not in present:
            raise DataError(
                f"{h.source} [rename] {old!r} = {new!r}, but {table.path} has neither column; "
                f"columns found: {', '.join(table.names)}. Fix the old name"
            )
    names = [h.rename.get(n, n) for n in table.names]
    return names, {h.rename.get(n, n): table.columns[n] for n in table.names}


def _variants(sites: _RowSites, glob: Mapping[str, Any], per_site: Mapping[str, Mapping[str, Any]],
              column: str) -> tuple[list[str | None], np.ndarray | None]:
    """The distinct sets of sections that apply to ``column`` (None: the global one alone, else
    a site's), and each row's index into them (None: every row uses the first)."""
    owner = [s if column in per_site.get(s, {}) else None for s in sites.names]
    variants = list(dict.fromkeys(owner))
    index = np.array([variants.index(o) for o in owner], dtype=np.int64)
    return variants, None if sites.of_row is None else index[sites.of_row]


def _map_column(table: Table, column: str, h: Harmonization, sites: _RowSites) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    raw = table.columns[column]
    if pa.types.is_floating(raw.type):
        raw = pc.if_else(pc.is_nan(raw), pa.scalar(None, raw.type), raw)
    encoded = pc.dictionary_encode(raw)
    values = encoded.dictionary.to_pylist()
    keys = [code_key(v) for v in values]
    common = h.codes(column)
    strict = column not in h.allow
    variants, of_row = _variants(sites, h.maps, h.site_maps, column)
    spelled: dict[str | None, int] = {}
    out = np.empty((len(variants), len(values) + 1), dtype=np.int64)
    unmapped = np.zeros((len(variants), len(values) + 1), dtype=bool)
    for i, owner in enumerate(variants):
        mapping = {**h.maps.get(column, {}), **(h.site_maps[owner].get(column, {}) if owner else {})}
        for j, (v, k) in enumerate(zip(values, keys)):
            if k in mapping:
                text = mapping[k]
            elif k in common:
                text = common[k]
            else:
                text = v if isinstance(v, str) else k
                unmapped[i, j] = strict
            out[i, j] = spelled.setdefault(text, len(spelled))
        out[i, -1] = spelled.setdefault(None, len(spelled))
    idx = np.asarray(pc.fill_null(encoded.indices.cast(pa.int64()), -1).to_numpy(zero_copy_only=False))
    variant = np.zeros(len(idx), np.int64) if of_row is None else of_row
    bad = unmapped[variant, idx]
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        site = sites.names[0 if sites.of_row is None else int(sites.of_row[row])]
        shown = ", ".join(sorted(set(common.values()))) or "none"
        raise DataError(
            f"{table.path} {table.where(row)} (site {site!r}): column {column!r} holds "
            f"{values[int(idx[row])]!r}, which {h.source} does not map and which is not one of "
            f"the common codes ({shown}); add \"{keys[int(idx[row])]}\" = \"<common code>\" to "
            f"[map.{column}] (or [site.{site}.map.{column}]), or list {column!r} in [check] allow"
        )
    dictionary = pa.array(list(spelled), pa.string())
    return dictionary.take(pa.array(out[variant, idx]))


def _convert_column(table: Table, column: str, h: Harmonization, sites: _RowSites) -> Any:
    """``column`` converted where a conversion applies, as float64 (None: nothing to convert)."""
    import pyarrow as pa

    variants, of_row = _variants(sites, h.units, h.site_units, column)
    convs = [h.site_units[o][column] if o else h.units.get(column) for o in variants]
    if all(c is None for c in convs):
        return None
    values = numbers(table.columns[column])
    if values is None:
        import pyarrow.compute as pc

        distinct = pc.unique(texts(table.columns[column])).to_pylist()
        odd = next(v for v in distinct if v is not None and _not_number(v))
        raise DataError(
            f"{table.path}: column {column!r} holds {odd!r}, not a number, but {h.source} "
            f"converts its unit ({next(c for c in convs if c is not None).what}); fix the "
            "value or leave it empty"
        )
    factor = np.array([c.factor if c else 1.0 for c in convs])
    offset = np.array([c.offset if c else 0.0 for c in convs])
    if of_row is None:
        converted = values * factor[0] + offset[0]
    else:
        keep = np.array([c is None for c in convs])[of_row]
        converted = np.where(keep, values, values * factor[of_row] + offset[of_row])
    return pa.array(converted, pa.float64(), from_pandas=True)


def _not_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return True
    return False


# -- the cross-site schema check -------------------------------------------------------------
