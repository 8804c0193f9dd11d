"""Federated preprocessing of tables: statistics from per-site sums, never from pooled rows.

The protocol has three steps, mirroring what would cross the network in a deployment:

1. each site calls :func:`summarize_site` on its own rows and sends the :class:`SiteSummary`
   (per column: count of non-missing values, their sum and sum of squares, whether any value
   is missing, whether the values are all 0/1, and the set of categories seen);
2. the server adds the summaries (:func:`merge_summaries`) and fits a
   :class:`TabularEncoder` from the totals (:func:`fit_encoder`);
3. each site applies the encoder to its train and test rows (:meth:`TabularEncoder.transform`).

Mean and variance follow from the sums exactly (``mean = Σx / n``,
``var = Σx² / n − mean²``), so the federated statistics equal the pooled ones without any
site revealing a row. This is the federated standardisation used for cross-silo tabular
benchmarks such as FLamby (Ogier du Terrail et al. 2022).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from consortium.errors import DataError

__all__ = [
    "DEFAULT_MIN_COUNT",
    "Column",
    "SiteSummary",
    "TabularEncoder",
    "category_min_count",
    "encode_sites",
    "federated_mean_std",
    "fit_encoder",
    "merge_summaries",
    "site_fill_counts",
    "summarize_site",
    "with_imputation",
]

ColumnKind = Literal["continuous", "binary", "categorical", "numeric"]
_KINDS = ("continuous", "binary", "categorical", "numeric")

DEFAULT_MIN_COUNT = 5
"""The least number of a site's rows that must hold a category before the site names it in
its summary, when neither its policy nor the experiment asks for more (the analytics'
minimum cell count, issue 15)."""


def category_min_count(*, policy: int = 0, analysis: int = DEFAULT_MIN_COUNT) -> int:
    """How many of its rows must hold a category before a site names it: the larger of the
    site policy's ``min_count`` (0, unset, stands for :data:`DEFAULT_MIN_COUNT`) and the
    experiment's ``analysis.min_count`` — the minimum-cell-count rule of the analytics
    (DataSHIELD's ``nfilter.tab``; Gaye et al. 2014) applied to the encoding's category sets.
    """
    return max(policy or DEFAULT_MIN_COUNT, analysis)


@dataclass(frozen=True)
class Column:
    """How one raw column is encoded.

    Attributes:
        name: the column's name (used in feature names and errors).
        kind: ``"continuous"`` (imputed, standardised), ``"binary"`` (0/1; imputed, not
            standardised), ``"categorical"`` (one-hot, not standardised) or ``"numeric"``
            (binary if every site's values are 0/1, else continuous; for user files).
        categories: the fixed category set of a categorical column; ``None`` takes the union
            of the categories the sites report. A value outside a fixed set is an error.
    """

    name: str
    kind: ColumnKind
    categories: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise DataError(
                f"column {self.name!r} has kind {self.kind!r}; expected one of {', '.join(_KINDS)}"
            )


@dataclass(frozen=True)
class SiteSummary:
    """What a site shares about its table: per-column aggregates, never rows.

    ``count``, ``total`` and ``total_sq`` cover the site's training rows only (0 for
    categorical columns). ``has_missing`` and ``categories`` also cover the rows the site holds
    out for testing, so that the encoded layout (which indicator and one-hot columns exist)
    does not depend on how the rows were split; they reveal no value a model is fitted to.
    ``categories`` holds only the values the site holds at least ``min_count`` times (see
    :func:`summarize_site`), and nothing for a column whose category set is fixed.
    """

    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    has_missing: np.ndarray
    binary: np.ndarray
    categories: tuple[frozenset[Any], ...]

    def __add__(self, other: SiteSummary) -> SiteSummary:
        if len(self.categories) != len(other.categories):
            raise DataError(
                f"cannot add summaries of tables with {len(self.categories)} and "
                f"{len(other.categories)} columns; every site must report the same columns"
            )
        return SiteSummary(
            count=self.count + other.count,
            total=self.total + other.total,
            total_sq=self.total_sq + other.total_sq,
            has_missing=self.has_missing | other.has_missing,
            binary=self.binary & other.binary,
            categories=tuple(a | b for a, b in zip(self.categories, other.categories)),
        )


def summarize_site(
    train: np.ndarray, *, columns: Sequence[Column], holdout: np.ndarray | None = None,
    min_count: int = 1,
) -> SiteSummary:
    """Step 1, at a site: the per-column sums of its ``train`` rows.

    Disclosure control on the category sets: a categorical column lists only the values held
    by at least ``min_count`` of the site's rows (train and test together); a rarer value is
    not named (a deployed site uses :func:`category_min_count`). A column with a fixed
    category set lists nothing: its categories are known without the site's data.

    Args:
        train: ``[n, d]`` raw values, ``float`` with NaN for missing, or ``object`` when some
            categorical columns hold strings (``None``, ``""`` and NaN are missing there).
        columns: one :class:`Column` per column of ``train``.
        holdout: the site's test rows, consulted only for missingness and category sets.
        min_count: the least number of rows that must hold a category for it to be listed.

    Raises:
        DataError: for a shape that does not match ``columns``, a non-number in a numeric
            column, a binary column with values other than 0/1, or a category outside a fixed
            set.
    """
    tables = [_check_table(train, columns, "train")]
    if holdout is not None:
        tables.append(_check_table(holdout, columns, "test"))
    d = len(columns)
    count, total, total_sq = np.zeros(d), np.zeros(d), np.zeros(d)
    has_missing = np.zeros(d, dtype=bool)
    binary = np.ones(d, dtype=bool)
    categories: list[frozenset[Any]] = []
    for j, col in enumerate(columns):
        if col.kind == "categorical":
            held: Counter[Any] = Counter()
            for t in tables:
                values = [_category(v) for v in t[:, j]]
                has_missing[j] |= any(v is None for v in values)
                held.update(v for v in values if v is not None)
            seen = set(held)
            if col.categories is not None and not seen <= set(col.categories):
                raise DataError(
                    f"column {col.name!r} has categories {_show(seen - set(col.categories))} "
                    f"outside its allowed set {_show(col.categories)}; fix the data or the set"
                )
            released = () if col.categories is not None else (
                v for v, n in held.items() if n >= min_count)
            categories.append(frozenset(released))
            binary[j] = False
            continue
        categories.append(frozenset())
        for i, t in enumerate(tables):
            numbers = _numbers(t[:, j], col.name)
            present = numbers[~np.isnan(numbers)]
            has_missing[j] |= present.size < numbers.size
            binary[j] &= bool(np.isin(present, (0.0, 1.0)).all())
            if i == 0:
                count[j] = present.size
                total[j] = present.sum()
                total_sq[j] = np.square(present).sum()
        if col.kind == "binary" and not binary[j]:
            raise DataError(
                f"column {col.name!r} is declared binary but holds values other than 0 and 1; "
                "declare it continuous or numeric"
            )
    return SiteSummary(count, total, total_sq, has_missing, binary, tuple(categories))


def merge_summaries(summaries: Iterable[SiteSummary]) -> SiteSummary:
    """Step 2, at the server: add up the sites' summaries.

    Raises:
        DataError: if there are none, or sites reported different numbers of columns.
    """
    items = list(summaries)
    if not items:
        raise DataError("no site summaries to merge; at least one site must report")
    merged = items[0]
    for s in items[1:]:
        merged = merged + s
    return merged


def federated_mean_std(summary: SiteSummary) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population, ``ddof=0``) standard deviation from summed statistics.

    ``mean = Σx / n`` and ``std = sqrt(Σx² / n − mean²)``: the same numbers as
    ``np.nanmean`` / ``np.nanstd`` over the pooled rows. A column with no values gets mean 0;
    the variance is clipped at 0 against rounding.
    """
    n = np.maximum(summary.count, 1.0)
    mean = summary.total / n
    var = np.maximum(summary.total_sq / n - mean**2, 0.0)
    return mean, np.sqrt(var)


@dataclass(frozen=True)
class TabularEncoder:
    """Step 3, at each site: raw rows in, model-ready ``float32`` features out.

    For each column, in order: continuous columns become ``(x − mean) / std``; binary columns
    stay 0/1; categorical columns become one 0/1 column per category. A value outside the
    merged category list (one no site held ``min_count`` times, so none named it) encodes as
    all zeros, and its ``<name>_missing`` indicator stays 0: the value is present, only
    unnamed. Standardising only the continuous columns keeps 0/1 features readable as
    "present or not" and keeps one-hot groups summing to one; their scale is already O(1).
    A column with a missing value anywhere (any site, train or test) is followed by a 0/1
    ``<name>_missing`` indicator, and its missing values are imputed with the federated mean
    (which standardises to 0; for binary columns it is the share of ones) or, for categorical
    columns, with all zeros (the indicator marks them). :func:`with_imputation` replaces those
    with the federated median (binary columns: the majority value) and the federated mode.
    """

    columns: tuple[Column, ...]
    kinds: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    indicator: np.ndarray
    categories: tuple[tuple[Any, ...], ...]
    feature_names: tuple[str, ...]
    fill: np.ndarray | None = None  # numeric imputation values; None: the federated mean
    fill_category: tuple[Any, ...] | None = None  # per column, the category imputed, or None

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Encode one site's rows; the result has no NaN.

        Raises:
            DataError: if ``x`` does not have the columns the encoder was fitted on.
        """
        x = _check_table(x, self.columns, "input")
        blocks: list[np.ndarray] = []
        for j, (col, kind) in enumerate(zip(self.columns, self.kinds)):
            if kind == "categorical":
                values = [_category(v) for v in x[:, j]]
                index = {c: k for k, c in enumerate(self.categories[j])}
                onehot = np.zeros((len(values), len(index)))
                for i, v in enumerate(values):
                    if v in index:
                        onehot[i, index[v]] = 1.0
                missing = np.array([v is None for v in values], dtype=bool)
                mode = self.fill_category[j] if self.fill_category is not None else None
                if mode is not None:
                    onehot[missing, index[mode]] = 1.0
                blocks.append(onehot)
            else:
                values_f = _numbers(x[:, j], col.name)
                missing = np.isnan(values_f)
                fill = self.mean[j] if self.fill is None else self.fill[j]
                filled = np.where(missing, fill, values_f)
                if kind == "continuous":
                    filled = (filled - self.mean[j]) / self.std[j]
                blocks.append(filled[:, None])
            if self.indicator[j]:
                blocks.append(missing[:, None].astype(np.float64))
        out = np.concatenate(blocks, axis=1) if blocks else np.zeros((x.shape[0], 0))
        assert out.shape[1] == self.num_features and not np.isnan(out).any()
        return out.astype(np.float32)


def fit_encoder(columns: Sequence[Column], summary: SiteSummary) -> TabularEncoder:
    """Fit the encoder from the server's merged summary (see :class:`TabularEncoder`)."""
    columns = tuple(columns)
    if len(summary.categories) != len(columns):
        raise DataError(
            f"the summary covers {len(summary.categories)} columns, but the declared columns "
            f"number {len(columns)}; summarise and fit with the same columns"
        )
    mean, std = federated_mean_std(summary)
    # A constant column (std 0) is centred but not scaled: dividing by 0 would create NaN.
    std = np.where(std > 0, std, 1.0)
    kinds: list[str] = []
    categories: list[tuple[Any, ...]] = []
    names: list[str] = []
    for j, col in enumerate(columns):
        kind = col.kind
        if kind == "numeric":
            kind = "binary" if summary.binary[j] else "continuous"
        kinds.append(kind)
        if kind == "categorical":
            cats = col.categories if col.categories is not None else summary.categories[j]
            ordered = tuple(sorted(cats, key=_sort_key))
            categories.append(ordered)
            names += [f"{col.name}={c}" for c in ordered]
        else:
            categories.append(())
            names.append(col.name)
        if summary.has_missing[j]:
            names.append(f"{col.name}_missing")
    return TabularEncoder(
        columns=columns,
        kinds=tuple(kinds),
        mean=mean,
        std=std,
        indicator=summary.has_missing.copy(),
        categories=tuple(categories),
        feature_names=tuple(names),
    )


def encode_sites(
    trains: Sequence[np.ndarray], tests: Sequence[np.ndarray], *, columns: Sequence[Column],
    impute: str = "mean", impute_categorical: str = "indicator", min_count: int = 1,
) -> tuple[TabularEncoder, list[np.ndarray], list[np.ndarray]]:
    """Run the three steps for simulated sites: summarise, merge, fit, transform (with a
    fourth, the fill counts of :func:`site_fill_counts`, for median or mode imputation).
    ``min_count``: each site names only the categories it holds that often
    (:func:`summarize_site`).

    Returns:
        ``(encoder, encoded trains, encoded tests)``, in the order of the sites given.
    """
    if len(trains) != len(tests):
        raise DataError(f"got {len(trains)} train tables but {len(tests)} test tables")
    summaries = [summarize_site(tr, columns=columns, holdout=te, min_count=min_count)
                 for tr, te in zip(trains, tests)]
    encoder = fit_encoder(columns, merge_summaries(summaries))
    if impute != "mean" or impute_categorical != "indicator":
        counts = [site_fill_counts(tr, encoder) for tr in trains]
        total = [np.sum([c[j] for c in counts], axis=0) for j in range(len(columns))]
        encoder = with_imputation(encoder, total, impute=impute, categorical=impute_categorical)
    return encoder, [encoder.transform(t) for t in trains], [encoder.transform(t) for t in tests]


#: Bins of the histogram behind the federated median: mean ± 6 sd in 1,200 bins of 0.01 sd.
FILL_BINS = 1200
FILL_SPAN = 6.0


def fill_edges(encoder: TabularEncoder, j: int) -> np.ndarray:
    """The histogram edges for column ``j``'s federated median: the federated mean ± 6
    standard deviations (already shared, so the edges reveal nothing new), 0.01 sd apart."""
    m, s = float(encoder.mean[j]), float(encoder.std[j])
    return np.linspace(m - FILL_SPAN * s, m + FILL_SPAN * s, FILL_BINS + 1)


def site_fill_counts(train: np.ndarray, encoder: TabularEncoder) -> list[np.ndarray]:
    """At a site: per column, the counts the federated fill values need — a histogram of a
    numeric column's present training values over :func:`fill_edges` (end bins open), or the
    count of each agreed category. Counts add across sites to the pooled counts exactly."""
    x = _check_table(train, encoder.columns, "input")
    out: list[np.ndarray] = []
    for j, (col, kind) in enumerate(zip(encoder.columns, encoder.kinds)):
        if kind == "categorical":
            index = {c: k for k, c in enumerate(encoder.categories[j])}
            codes = [index.get(_category(v), -1) for v in x[:, j]]
            arr = np.asarray(codes, dtype=np.int64)
            out.append(np.bincount(arr[arr >= 0], minlength=len(index)))
        else:
            v = _numbers(x[:, j], col.name)
            v = v[~np.isnan(v)]
            edges = fill_edges(encoder, j)
            out.append(np.bincount(np.searchsorted(edges[1:-1], v, side="right"),
                                   minlength=FILL_BINS))
    return out


def with_imputation(
    encoder: TabularEncoder, counts: Sequence[np.ndarray], *, impute: str = "median",
    categorical: str = "mode",
) -> TabularEncoder:
    """The encoder imputing the federated median (``impute = "median"``; a binary column's
    majority value) and the federated mode of each categorical column
    (``categorical = "mode"``), from the summed :func:`site_fill_counts`. The median is read
    off the histogram by linear interpolation inside the bin holding the half-way rank: within
    0.01 standard deviation of the pooled median. The ``<name>_missing`` indicators stay."""
    if impute not in ("mean", "median"):
        raise DataError(f"data.impute = {impute!r}: expected \"mean\" or \"median\"")
    if categorical not in ("indicator", "mode"):
        raise DataError(
            f"data.impute_categorical = {categorical!r}: expected \"indicator\" or \"mode\""
        )
    fill = encoder.mean.astype(np.float64).copy()
    modes: list[Any] = [None] * len(encoder.columns)
    for j, kind in enumerate(encoder.kinds):
        c = np.asarray(counts[j], dtype=np.float64)
        if kind == "categorical":
            if categorical == "mode" and c.sum() > 0:
                modes[j] = encoder.categories[j][int(np.argmax(c))]
        elif impute == "median" and c.sum() > 0:
            if kind == "binary":
                fill[j] = 1.0 if encoder.mean[j] >= 0.5 else 0.0
            else:
                edges = fill_edges(encoder, j)
                cdf = np.cumsum(c)
                half = 0.5 * cdf[-1]
                b = int(np.searchsorted(cdf, half, side="left"))
                before = cdf[b - 1] if b else 0.0
                share = (half - before) / c[b] if c[b] else 0.5
                fill[j] = edges[b] + share * (edges[b + 1] - edges[b])
    return dataclasses.replace(
        encoder, fill=fill if impute == "median" else None,
        fill_category=tuple(modes) if categorical == "mode" else None,
    )


# -- values -------------------------------------------------------------------------------------


def _check_table(x: np.ndarray, columns: Sequence[Column], what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] != len(columns):
        raise DataError(
            f"{what} table has shape {arr.shape}; expected [rows, {len(columns)}] for the "
            f"columns {', '.join(c.name for c in columns)}"
        )
    return arr


def _is_missing(v: Any) -> bool:
    return (
        v is None
        or (isinstance(v, str) and v.strip() == "")
        or (isinstance(v, (float, np.floating)) and math.isnan(v))
    )


def _numbers(values: np.ndarray, name: str) -> np.ndarray:
    if values.dtype.kind in "fiub":
        return values.astype(np.float64)
    try:  # numpy's cast reads None as NaN and text as float() does: one pass in C
        return values.astype(np.float64)
    except (TypeError, ValueError):
        pass  # blank text (missing) or a non-number (an error): cell by cell, below
    out = np.empty(len(values))
    for i, v in enumerate(values):
        if _is_missing(v):
            out[i] = np.nan
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise DataError(
                f"column {name!r} is numeric but row {i} holds {v!r}; fix the value or treat "
                "the column as categorical"
            ) from None
    return out


def _category(v: Any) -> Any:
    if _is_missing(v):
        return None
    if isinstance(v, np.generic):
        v = v.item()
    # 3 and 3.0 are one category (a float column read back from a file stays the same).
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


def _show(values: Iterable[Any]) -> str:
    return "{" + ", ".join(str(v) for v in sorted(values, key=_sort_key)) + "}"
