"""An analysis' messages as canonical JSON, for a deployment's wire: the query and the schema
the server sends, the profile and the answer a site sends back.

Everything here is plain data: dicts, lists, numbers and strings, written as canonical JSON
(sorted keys, no spaces, UTF-8, no NaN or infinity) and read back with explicit checks of every
field's type, size and range. Nothing a peer sends is unpickled, evaluated or imported, and a
message that breaks a rule is refused with a :class:`WireError` naming the field and the rule
(the way :mod:`consortium.deploy.validate` refuses a malformed training result).

An answer is checked against the layout the server expects from its own schema
(:func:`expected_layout`, the keys and shapes :func:`~consortium.analytics.site.describe`
produces): no key more or less, every array of its shape, finite values, counts that are whole
and not negative (without DP), sums within :data:`MAX_MAGNITUDE`. A site therefore cannot name
a category the schema does not hold, nor make the server's arithmetic overflow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from consortium.analytics.query import ColumnSpec, Query, Schema
from consortium.analytics.site import Answer, Profile
from consortium.data._tables import label_key
from consortium.errors import DataError

__all__ = [
    "MAX_MAGNITUDE", "WireError", "answer_from_json", "answer_to_json", "check_total", "dumps",
    "expected_layout", "loads", "profile_from_json", "profile_to_json", "query_from_json",
    "query_to_json", "schema_from_json", "schema_to_json", "table_names",
]

MAX_NAME_CHARS: Final = 256
"""Longest column name accepted."""
MAX_VALUE_CHARS: Final = 1024
"""Longest category value (text) accepted."""
MAX_COLUMNS: Final = 10_000
"""Most columns in a query, a profile or a schema."""
MAX_CATEGORIES: Final = 10_000
"""Most categories of one column."""
MAX_BINS: Final = 100_000
"""Most histogram bins of one numeric column."""
MAX_TIMES: Final = 100_000
"""Most survival times on the agreed grid."""
MAX_LIST: Final = 1_000
"""Most entries of the query's small lists (quantiles, crosstabs, correlation, bands, edges)."""
MAX_MIN_COUNT: Final = 1_000_000
"""The largest ``min_count`` a query may ask for."""
MAX_MAGNITUDE: Final = 1e150
"""The largest |value| of any sum, range or edge: the server adds up to 2**15 sites' sums and
squares differences of them, which stays finite (1e300 < 1.8e308)."""
MAX_COUNT: Final = float(2**53)
"""The largest count: float64 holds every whole number up to it exactly."""


class WireError(DataError):
    """An analysis message from a peer is malformed (the message names the field and the rule)."""


# --------------------------------------------------------------------------------------- JSON


def dumps(obj: Any) -> bytes:
    """``obj`` as canonical JSON: sorted keys, no spaces, UTF-8; NaN and infinity refused.

    Raises:
        WireError: a value JSON cannot hold exactly (NaN, infinity, an object of another type).
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False,
                          ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise WireError(f"cannot write this analysis message as JSON: {exc}") from None
    return text.encode("utf-8")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON may hold")


def loads(raw: bytes | bytearray | memoryview, *, limit: int, what: str) -> Any:
    """Parse ``raw`` (at most ``limit`` bytes of UTF-8 JSON) as plain data.

    Raises:
        WireError: too large, not UTF-8, not JSON, nested too deeply, or NaN/Infinity.
    """
    if len(raw) > limit:
        raise WireError(f"{what}: {len(raw)} bytes, over the limit of {limit}")
    try:
        return json.loads(bytes(raw).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"{what} is not valid JSON: {str(exc)[:200]}") from None


# ------------------------------------------------------------------------------ field checks


def _obj(value: Any, where: str, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{where} must be a JSON object, found {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    extra = sorted(set(value) - set(keys) - set(optional))
    if missing or extra:
        raise WireError(
            f"{where} must have the fields {sorted(keys)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {[_short(k) for k in extra[:5]]}" if extra else "")
        )
    return value


def _short(text: Any) -> str:
    s = str(text)
    return repr(s) if len(s) <= 40 else f"{s[:40]!r}..."


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(f"{where} must be true or false, found {_short(value)}")
    return value


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WireError(f"{where} must be a whole number in [{low}, {high}], found {_short(value)}")
    return value


def _float(value: Any, where: str, *, low: float = -MAX_MAGNITUDE, high: float = MAX_MAGNITUDE) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"{where} must be a number, found {_short(value)}")
    v = float(value)
    if not (math.isfinite(v) and low <= v <= high):
        raise WireError(f"{where} must be a finite number in [{low:g}, {high:g}], found {_short(value)}")
    return v


def _text(value: Any, where: str, limit: int = MAX_NAME_CHARS, *, empty: bool = True) -> str:
    if not isinstance(value, str) or len(value) > limit or (not empty and not value):
        raise WireError(f"{where} must be a text of {'0' if empty else '1'} to {limit} "
                        f"characters, found {_short(value)}")
    return value


def _list(value: Any, where: str, limit: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise WireError(f"{where} must be a list of at most {limit} entries, found "
                        f"{type(value).__name__}"
                        + (f" of {len(value)}" if isinstance(value, list) else ""))
    return value


def _names(value: Any, where: str, limit: int = MAX_COLUMNS) -> tuple[str, ...]:
    names = tuple(_text(v, f"{where}[{i}]", empty=False)
                  for i, v in enumerate(_list(value, where, limit)))
    if len(set(names)) != len(names):
        raise WireError(f"{where} names a column twice")
    return names


def _category(value: Any, where: str) -> Any:
    """A category value: text, or a finite number (as :func:`label_key` keys it)."""
    if isinstance(value, str):
        return _text(value, where, MAX_VALUE_CHARS)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"{where} must be a text or a number, found {type(value).__name__}")
    if isinstance(value, int):
        _int(value, where, -(2**63), 2**63 - 1)
        return value
    return label_key(_float(value, where))


def _categories(value: Any, where: str) -> tuple[Any, ...]:
    cats = tuple(_category(v, f"{where}[{i}]")
                 for i, v in enumerate(_list(value, where, MAX_CATEGORIES)))
    if len(set(cats)) != len(cats):
        raise WireError(f"{where} lists a category twice")
    return cats


def _floats(value: Any, where: str, limit: int) -> tuple[float, ...]:
    return tuple(_float(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where, limit)))


def _category_json(value: Any) -> Any:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise WireError(
        f"category {_short(value)} cannot travel as JSON (a text or a finite number); recode "
        "the column with harmonize.toml"
    )


# ------------------------------------------------------------------------------------- query


def query_to_json(q: Query) -> dict[str, Any]:
    """The query as plain data (:func:`query_from_json` reads it back)."""
    return {
        "columns": list(q.columns), "where": q.where, "group_by": q.group_by,
        "categorical": list(q.categorical), "max_levels": q.max_levels,
        "min_count": q.min_count, "suppress": q.suppress, "bins": q.bins,
        "quantiles": list(q.quantiles), "crosstabs": [list(p) for p in q.crosstabs],
        "correlation": list(q.correlation),
        "survival": list(q.survival) if q.survival is not None else None,
        "bands": [[c, list(e)] for c, e in q.bands], "secure": q.secure,
        "dp": None if q.dp is None else {
            "mechanism": q.dp.mechanism, "epsilon": q.dp.epsilon, "delta": q.dp.delta,
            "statistics": q.dp.statistics, "noise_multiplier": q.dp.noise_multiplier,
        },
    }


_QUERY_FIELDS = ("columns", "where", "group_by", "categorical", "max_levels", "min_count",
                 "suppress", "bins", "quantiles", "crosstabs", "correlation", "survival", "bands",
                 "secure", "dp")


def query_from_json(data: Any) -> Query:
    """A :class:`Query` from :func:`query_to_json`'s data, every field checked.

    Raises:
        WireError: a missing or unknown field, a wrong type, a size over the limits of this
            module, or a value out of range.
    """
    from consortium.analytics.expr import MAX_LENGTH

    d = _obj(data, "query", _QUERY_FIELDS)
    suppress = d["suppress"]
    if suppress not in ("suppress", "refuse"):
        raise WireError(f"query.suppress must be \"suppress\" or \"refuse\", found {_short(suppress)}")
    quantiles = _floats(d["quantiles"], "query.quantiles", MAX_LIST)
    if any(not 0 < v < 1 for v in quantiles):
        raise WireError("query.quantiles must lie strictly between 0 and 1")
    crosstabs = []
    for i, pair in enumerate(_list(d["crosstabs"], "query.crosstabs", MAX_LIST)):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise WireError(f"query.crosstabs[{i}] must be a pair of column names")
        crosstabs.append((_text(pair[0], f"query.crosstabs[{i}][0]", empty=False),
                          _text(pair[1], f"query.crosstabs[{i}][1]", empty=False)))
    survival = None
    if d["survival"] is not None:
        s = _list(d["survival"], "query.survival", 3)
        if len(s) != 3:
            raise WireError("query.survival must be [time, event, group] (group may be \"\")")
        survival = (_text(s[0], "query.survival[0]", empty=False),
                    _text(s[1], "query.survival[1]", empty=False), _text(s[2], "query.survival[2]"))
    bands = []
    for i, spec in enumerate(_list(d["bands"], "query.bands", MAX_LIST)):
        if not (isinstance(spec, list) and len(spec) == 2):
            raise WireError(f"query.bands[{i}] must be [column, [edges...]]")
        edges = _floats(spec[1], f"query.bands[{i}] edges", MAX_LIST)
        if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
            raise WireError(f"query.bands[{i}] edges must be one or more increasing numbers")
        bands.append((_text(spec[0], f"query.bands[{i}] column", empty=False), edges))
    return Query(
        columns=_names(d["columns"], "query.columns"),
        where=_text(d["where"], "query.where", MAX_LENGTH),
        group_by=_text(d["group_by"], "query.group_by"),
        categorical=_names(d["categorical"], "query.categorical"),
        max_levels=_int(d["max_levels"], "query.max_levels", 1, MAX_CATEGORIES),
        min_count=_int(d["min_count"], "query.min_count", 1, MAX_MIN_COUNT),
        suppress=suppress, bins=_int(d["bins"], "query.bins", 1, MAX_BINS),
        quantiles=quantiles, crosstabs=tuple(crosstabs),
        correlation=_names(d["correlation"], "query.correlation", MAX_LIST),
        survival=survival, bands=tuple(bands), secure=_bool(d["secure"], "query.secure"),
        dp=_plan_from_json(d["dp"]),
    )


def _plan_from_json(value: Any) -> Any:
    if value is None:
        return None
    from consortium.analytics.dp import NoisePlan

    d = _obj(value, "query.dp", ("mechanism", "epsilon", "delta", "statistics", "noise_multiplier"))
    if d["mechanism"] not in ("gaussian", "laplace"):
        raise WireError(f"query.dp.mechanism must be gaussian or laplace, found {_short(d['mechanism'])}")
    return NoisePlan(
        d["mechanism"], _float(d["epsilon"], "query.dp.epsilon", low=1e-9, high=1e6),
        _float(d["delta"], "query.dp.delta", low=0.0, high=1.0),
        _int(d["statistics"], "query.dp.statistics", 1, 10**9),
        _float(d["noise_multiplier"], "query.dp.noise_multiplier", low=0.0, high=1e12),
    )


# ------------------------------------------------------------------------------------ schema


def schema_to_json(s: Schema) -> dict[str, Any]:
    """The agreed schema as plain data (:func:`schema_from_json` reads it back)."""
    return {
        "query": query_to_json(s.query),
        "columns": [
            {"name": spec.name, "kind": spec.kind,
             "categories": [_category_json(c) for c in spec.categories],
             "edges": list(spec.edges), "shift": spec.shift}
            for spec in s.columns.values()
        ],
        "groups": [_category_json(g) for g in s.groups],
        "survival_times": list(s.survival_times),
        "notes": list(s.notes),
    }


def schema_from_json(data: Any) -> Schema:
    """A :class:`Schema` from :func:`schema_to_json`'s data, every field checked.

    Raises:
        WireError: as :func:`query_from_json`, and edges that do not increase, a shift outside
            them, groups that are not the group column's categories.
    """
    d = _obj(data, "schema", ("query", "columns", "groups", "survival_times", "notes"))
    query = query_from_json(d["query"])
    specs: dict[str, ColumnSpec] = {}
    for i, c in enumerate(_list(d["columns"], "schema.columns", MAX_COLUMNS)):
        where = f"schema.columns[{i}]"
        c = _obj(c, where, ("name", "kind", "categories", "edges", "shift"))
        name = _text(c["name"], f"{where}.name", empty=False)
        if name in specs:
            raise WireError(f"{where}: column {_short(name)} is described twice")
        kind = c["kind"]
        if kind not in ("numeric", "categorical"):
            raise WireError(f"{where}.kind must be numeric or categorical, found {_short(kind)}")
        cats = _categories(c["categories"], f"{where}.categories")
        edges = _floats(c["edges"], f"{where}.edges", MAX_BINS + 1)
        shift = _float(c["shift"], f"{where}.shift")
        if kind == "numeric" and cats:
            raise WireError(f"{where}: a numeric column has no categories")
        if kind == "categorical" and edges:
            raise WireError(f"{where}: a categorical column has no histogram edges")
        if edges and (len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:]))):
            raise WireError(f"{where}.edges must be two or more increasing numbers")
        specs[name] = ColumnSpec(name, kind, cats, edges, shift)
    groups = _categories(d["groups"], "schema.groups")
    if query.group_by:
        spec = specs.get(query.group_by)
        if spec is None or spec.kind != "categorical" or tuple(spec.categories) != groups:
            raise WireError("schema.groups must be the categories of the query's group_by column")
    elif groups:
        raise WireError("schema.groups must be empty without a group_by column")
    times = _floats(d["survival_times"], "schema.survival_times", MAX_TIMES)
    if any(b <= a for a, b in zip(times, times[1:])) or any(t < 0 for t in times):
        raise WireError("schema.survival_times must be increasing times >= 0")
    notes = tuple(_text(n, f"schema.notes[{i}]", 1000)
                  for i, n in enumerate(_list(d["notes"], "schema.notes", MAX_LIST)))
    needed = [*query.columns, *query.needed()]
    absent = [n for n in needed if n not in specs]
    if absent:
        raise WireError(f"the schema does not describe the query's column {_short(absent[0])}")
    return Schema(query, specs, groups=groups, survival_times=times, notes=notes)


# ----------------------------------------------------------------------------------- profile


def profile_to_json(p: Profile) -> dict[str, Any]:
    """A site's profile as plain data (the site's name travels with its authenticated session)."""
    return {
        "n": p.n, "answers": p.answers, "numeric": dict(p.numeric), "levels": dict(p.levels),
        "categories": {k: [_category_json(v) for v in vs] for k, vs in p.categories.items()},
        "ranges": {k: [lo, hi] for k, (lo, hi) in p.ranges.items()},
        "survival_times": list(p.survival_times),
    }


def profile_from_json(data: Any, *, site: str, query: Query) -> Profile:
    """``site``'s profile, every field checked against ``query``: a column the query names
    but the profile lacks, or one it does not name (when it names columns), is refused.

    Raises:
        WireError: a malformed profile (see the module docstring).
    """
    d = _obj(data, "profile", ("n", "answers", "numeric", "levels", "categories", "ranges",
                               "survival_times"))
    n = None if d["n"] is None else _int(d["n"], "profile.n", 0, int(MAX_COUNT))
    if query.secure and n is not None:
        raise WireError("profile.n must be null under secure aggregation (no per-site count)")
    numeric = _flags(d["numeric"], "profile.numeric")
    levels = _flags(d["levels"], "profile.levels")
    if not set(levels) <= set(numeric):
        raise WireError("profile.levels names a column profile.numeric does not")
    wanted = set(query.columns) | set(query.needed())
    if query.columns and set(numeric) - wanted - {f"{c}_band" for c, _ in query.bands}:
        raise WireError("profile.numeric names a column the query did not ask for")
    cats = _mapping(d["categories"], "profile.categories")
    ranges = _mapping(d["ranges"], "profile.ranges")
    if not (set(cats) | set(ranges)) <= set(numeric):
        raise WireError("profile.categories and profile.ranges describe only the profile's columns")
    out = Profile(site, n, answers=_bool(d["answers"], "profile.answers"), numeric=numeric,
                  levels=levels)
    for name, values in cats.items():
        out.categories[name] = list(_categories(values, f"profile.categories[{_short(name)}]"))
    for name, pair in ranges.items():
        if not (isinstance(pair, list) and len(pair) == 2):
            raise WireError(f"profile.ranges[{_short(name)}] must be [low, high]")
        lo, hi = _floats(pair, f"profile.ranges[{_short(name)}]", 2)
        if not lo <= hi:
            raise WireError(f"profile.ranges[{_short(name)}]: low {lo:g} above high {hi:g}")
        out.ranges[name] = (lo, hi)
    times = _floats(d["survival_times"], "profile.survival_times", MAX_TIMES)
    if any(t < 0 for t in times):
        raise WireError("profile.survival_times must be times >= 0")
    out.survival_times = sorted(set(times))
    return out


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or len(value) > MAX_COLUMNS:
        raise WireError(f"{where} must be an object of at most {MAX_COLUMNS} columns")
    for k in value:
        _text(k, f"{where} key", empty=False)
    return value


def _flags(value: Any, where: str) -> dict[str, bool]:
    return {k: _bool(v, f"{where}[{_short(k)}]") for k, v in _mapping(value, where).items()}


# ------------------------------------------------------------------------------------ answer


def expected_layout(schema: Schema) -> list[tuple[str, tuple[int, ...]]]:
    """The keys and shapes of every site's phase-2 answer to ``schema``, sorted by key (the
    order :func:`~consortium.analytics.secure.layout` gives): what
    :func:`~consortium.analytics.site.describe` produces, derived from the schema alone."""
    q = schema.query
    names = list(q.columns) if q.columns else list(schema.columns)
    out: dict[str, tuple[int, ...]] = {}
    groups = ["all", *(f"g{g}" for g in range(len(schema.groups)))] if q.group_by else ["all"]
    for g in groups:
        out[f"{g}|n"] = ()
        for name in names:
            spec = schema.spec(name)
            key = f"{g}|{name}"
            if spec.kind == "numeric":
                for part in ("count", "s1", "s2", "missing"):
                    out[f"{key}|{part}"] = ()
                if spec.edges:
                    out[f"{key}|{'hist' if q.dp is not None else 'cdf'}"] = (len(spec.edges) + 1,)
            else:
                out[f"{key}|counts"] = (len(spec.categories) + 1,)
                out[f"{key}|missing"] = ()
    for a, b in q.crosstabs:
        out[f"xt|{a}|{b}"] = (len(schema.spec(a).categories) + 1, len(schema.spec(b).categories) + 1)
    if q.correlation:
        p = len(q.correlation)
        out["corr|n"], out["corr|s1"], out["corr|s2"] = (), (p,), (p, p)
    if q.survival is not None:
        group = q.survival[2]
        k = len(schema.spec(group).categories) if group else 1
        m = len(schema.survival_times)
        out["surv|events"] = out["surv|censored"] = (k, m)
        out["surv|beyond"], out["surv|missing"] = (k,), ()
    return sorted(out.items())


def _is_count(key: str) -> bool:
    return key.rsplit("|", 1)[-1] not in ("s1", "s2")


def answer_to_json(a: Answer) -> dict[str, Any]:
    """A site's answer as plain data: each key's values flattened (row-major), and the flat
    positions it withheld (only keys with any)."""
    return {
        "values": {k: [float(x) for x in v.ravel()] for k, v in a.values.items()},
        "withheld": {k: np.flatnonzero(w.ravel()).tolist()
                     for k, w in a.withheld.items() if w.any()},
    }


def answer_from_json(data: Any, *, site: str, schema: Schema) -> Answer:
    """``site``'s answer, checked against the layout ``schema`` implies.

    Raises:
        WireError: a key more or less than :func:`expected_layout`, an array of another size,
            a value not finite or beyond :data:`MAX_MAGNITUDE`, a count negative or not whole
            (without DP), a negative sum of squares, or withheld entries where nothing may be
            withheld (under DP or secure aggregation).
    """
    d = _obj(data, "answer", ("values", "withheld"))
    layout = expected_layout(schema)
    expected = dict(layout)
    values = d["values"]
    if not isinstance(values, dict):
        raise WireError("answer.values must be an object of arrays")
    extra = sorted(set(values) - set(expected))
    if extra:
        raise WireError(f"answer.values holds {_short(extra[0])}, which the schema does not ask "
                        "for (a key or category not in the schema)")
    missing = [k for k in expected if k not in values]
    if missing:
        raise WireError(f"answer.values lacks {_short(missing[0])}, which the schema asks for")
    withheld = d["withheld"]
    if not isinstance(withheld, dict) or not set(withheld) <= set(expected):
        raise WireError("answer.withheld must be an object over the answer's keys")
    q = schema.query
    noisy = q.dp is not None
    if withheld and (noisy or q.secure):
        raise WireError("answer.withheld must be empty under differential privacy or secure "
                        "aggregation (the site withholds nothing itself)")
    out = Answer(site)
    for key, shape in layout:
        size = int(np.prod(shape)) if shape else 1
        raw = values[key]
        if not isinstance(raw, list) or len(raw) != size:
            raise WireError(f"answer.values[{_short(key)}] must be a list of {size} numbers "
                            f"(shape {list(shape)})")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
            raise WireError(f"answer.values[{_short(key)}] must hold numbers only")
        v = np.asarray(raw, dtype=np.float64)
        if not np.all(np.isfinite(v)) or np.any(np.abs(v) > MAX_MAGNITUDE):
            raise WireError(f"answer.values[{_short(key)}] holds a value that is not finite or "
                            f"beyond ±{MAX_MAGNITUDE:g}")
        if _is_count(key) and not noisy and (
            np.any(v < 0) or np.any(v != np.round(v)) or np.any(v > MAX_COUNT)
        ):
            raise WireError(f"answer.values[{_short(key)}] holds a count that is negative, not "
                            "whole, or above 2**53")
        if not noisy and key.endswith("|s2") and not key.startswith("corr|") and np.any(v < 0):
            raise WireError(f"answer.values[{_short(key)}] is a sum of squares below 0")
        if not noisy and key == "corr|s2" and np.any(np.diag(v.reshape(shape)) < 0):
            raise WireError("answer.values['corr|s2'] has a sum of squares below 0 on its diagonal")
        w = np.zeros(size, dtype=bool)
        if key in withheld:
            at = withheld[key]
            if not (isinstance(at, list) and len(at) <= size and all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < size for i in at)):
                raise WireError(f"answer.withheld[{_short(key)}] must list positions in [0, {size})")
            w[at] = True
        out.values[key] = np.where(w, 0.0, v).reshape(shape)
        out.withheld[key] = w.reshape(shape)
    return out


def check_total(answer: Answer, schema: Schema) -> None:
    """Refuse a secure-aggregation total that honest sites could not have produced (a count
    below 0 or not whole, a sum of squares below 0): with no per-site range proofs, one site
    can put any value in its masked vector, and the total is all the server can check.

    Raises:
        WireError: naming the first key that fails.
    """
    data = answer_to_json(answer)
    answer_from_json(data, site=answer.site, schema=schema)


def table_names(value: Any, where: str = "columns") -> tuple[str, ...]:
    """A site's column names (the ``columns`` phase under DP), checked."""
    return _names(value, where)

