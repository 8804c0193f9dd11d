"""The federated encoding of every site at once, one whole column at a time.

:mod:`consortium.data.preprocess` states the protocol per site: each site summarises its
rows (:func:`~consortium.data.preprocess.summarize_site`), the server adds the summaries in
site order (:func:`~consortium.data.preprocess.merge_summaries`) and fits the encoder, each
site transforms its rows. Simulating 10,000 sites that way is 10,000 rounds of per-column
Python. Here the same numbers come from whole columns, equal bit for bit:

- a site's sum of its present values is numpy's pairwise sum of that segment; segments of
  equal length are gathered into one ``[k, length]`` matrix whose row sums are those same
  pairwise sums, so a column costs one call per distinct site size, not one per site;
- the server's merge adds the per-site sums in site order (``np.add.accumulate``, which is
  sequential by definition, as the merge is);
- encoding is elementwise, so all rows are encoded together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from consortium.data.preprocess import (
    FILL_BINS,
    Column,
    SiteSummary,
    TabularEncoder,
    fill_edges,
    fit_encoder,
    with_imputation,
)

__all__ = ["Source", "SplitRows", "federated_encoding"]


@dataclass(frozen=True)
class Source:
    """One raw column, read on demand (so that only one column's values are held at a time).

    ``read()`` returns, for a ``"numeric"`` column, float64 values with NaN for missing; for
    a ``"categorical"`` one, ``(codes, categories)``: each row's index into ``categories``,
    -1 when missing.
    """

    column: Column
    read: Callable[[], Any]


@dataclass(frozen=True)
class SplitRows:
    """Which rows each site trains and tests on, site after site.

    ``train[train_offsets[s]:train_offsets[s + 1]]`` are site ``s``'s training rows (indices
    into the columns' rows, in the order the site holds them); likewise for ``test``.
    """

    train: np.ndarray
    train_offsets: np.ndarray
    test: np.ndarray
    test_offsets: np.ndarray


def federated_encoding(
    sources: Sequence[Source], rows: SplitRows, *, impute: str = "mean",
    impute_categorical: str = "indicator", min_count: int = 1,
) -> tuple[TabularEncoder, np.ndarray, np.ndarray]:
    """``(encoder, x_train, x_test)``: what ``encode_sites`` returns for these sites, with the
    sites' encoded rows stacked (``float32``, rows in ``rows.train`` / ``rows.test`` order).
    ``min_count``: a category is listed only if some site holds it that often (train and test
    rows), as each site's ``summarize_site(..., min_count=...)`` names it."""
    columns = [s.column for s in sources]
    encoder = fit_encoder(columns, _merged_summary(sources, rows, min_count=min_count))
    if impute != "mean" or impute_categorical != "indicator":
        encoder = with_imputation(encoder, _fill_counts(encoder, sources, rows), impute=impute,
                                  categorical=impute_categorical)
    return encoder, *_encode(encoder, sources, rows)


def _fill_counts(
    encoder: TabularEncoder, sources: Sequence[Source], rows: SplitRows
) -> list[np.ndarray]:
    """The summed :func:`~consortium.data.preprocess.site_fill_counts` of every site: counts
    add, so the training rows of all sites are counted at once."""
    out: list[np.ndarray] = []
    for j, source in enumerate(sources):
        if encoder.kinds[j] == "categorical":
            codes, names = source.read()
            index = {c: k for k, c in enumerate(encoder.categories[j])}
            place = np.array([index.get(c, -1) for c in names] + [-1], dtype=np.int64)
            p = place[codes[rows.train]]
            out.append(np.bincount(p[p >= 0], minlength=len(index)))
        else:
            v = source.read()[rows.train]
            v = v[~np.isnan(v)]
            edges = fill_edges(encoder, j)
            out.append(np.bincount(np.searchsorted(edges[1:-1], v, side="right"),
                                   minlength=FILL_BINS))
    return out


def _merged_summary(sources: Sequence[Source], rows: SplitRows, *, min_count: int = 1) -> SiteSummary:
    d, n_sites = len(sources), len(rows.train_offsets) - 1
    count, total, total_sq = (np.zeros((n_sites, d)) for _ in range(3))
    has_missing = np.zeros(d, dtype=bool)
    binary = np.ones(d, dtype=bool)
    categories: list[frozenset[Any]] = [frozenset()] * d
    segments = _Segments(np.diff(rows.train_offsets), rows.train_offsets[:-1])
    # Columns without a missing training value share one segment layout: they are summed in
    # blocks. Buffers are reused: a fresh 80 MB array per column costs its page faults again.
    block = np.empty((max(1, _BLOCK_VALUES // max(len(rows.train), 1)), len(rows.train)))
    pending: list[int] = []
    train_missing = np.empty(len(rows.train), dtype=bool)
    held = _SiteRows(rows) if min_count > 1 else None

    def flush() -> None:
        sums, squares = segments.sums(block[: len(pending)])
        for i, j in enumerate(pending):
            count[:, j], total[:, j], total_sq[:, j] = segments.sizes, sums[i], squares[i]
        pending.clear()

    for j, source in enumerate(sources):
        if source.column.kind == "categorical":
            codes, names = source.read()
            has_missing[j] = bool((codes < 0).any())
            named = (np.unique(codes[codes >= 0]) if held is None
                     else held.named(codes, len(names), min_count))
            categories[j] = frozenset(names[i] for i in named)
            binary[j] = False
            continue
        values = source.read()
        # missingness and 0/1-ness cover train and test rows alike, as summarize_site's do
        has_missing[j] = bool(np.isnan(values).any())
        binary[j] = _zero_one(values)
        train = block[len(pending)]
        np.take(values, rows.train, out=train)
        if np.isnan(train, out=train_missing).any():
            count[:, j], total[:, j], total_sq[:, j] = _site_sums(train, rows.train_offsets)
            continue
        pending.append(j)
        if len(pending) == len(block):
            flush()
    if pending:
        flush()
    return SiteSummary(
        count=_merge(count), total=_merge(total), total_sq=_merge(total_sq),
        has_missing=has_missing, binary=binary, categories=tuple(categories),
    )


class _SiteRows:
    """Every site's rows, train and test, with each row's site: what a site counts its
    categories over before it names them."""

    def __init__(self, rows: SplitRows) -> None:
        n_sites = len(rows.train_offsets) - 1
        self.n_sites = n_sites
        self.index = np.concatenate([rows.train, rows.test])
        self.site = np.concatenate([
            np.repeat(np.arange(n_sites), np.diff(rows.train_offsets)),
            np.repeat(np.arange(n_sites), np.diff(rows.test_offsets)),
        ])

    def named(self, codes: np.ndarray, width: int, min_count: int) -> np.ndarray:
        """The codes that at least one site holds ``min_count`` times or more."""
        taken = codes[self.index]
        present = taken >= 0
        pair = self.site[present] * max(width, 1) + taken[present]
        if self.n_sites * width <= max(4 * len(pair), 1 << 20):
            counts = np.bincount(pair, minlength=self.n_sites * width)  # O(rows), no sort
            return np.flatnonzero((counts.reshape(self.n_sites, width) >= min_count).any(axis=0))
        pairs, counts = np.unique(pair, return_counts=True)
        return np.unique(pairs[counts >= min_count] % width)


#: How many float64 values (columns × training rows) are summed in one block.
_BLOCK_VALUES = 1 << 22


class _Segments:
    """Segments (sites) grouped by length, each group with the gather index of its
    segments' values: for the training rows, the layout of every column without a missing
    training value."""

    def __init__(self, lengths: np.ndarray, starts: np.ndarray) -> None:
        self.sizes = lengths.astype(np.float64)
        self.groups = _groups(lengths, starts)

    def sums(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per column of ``block`` (``[columns, rows]``) and site: the sum and the sum of
        squares, as ``site_values.sum()`` and ``np.square(site_values).sum()``."""
        total = np.zeros((len(block), len(self.sizes)))
        total_sq = np.zeros_like(total)
        for sites, index in self.groups:
            part = block[:, index]  # [columns, sites, length], fresh and C-contiguous
            total[:, sites] = part.sum(axis=2)
            total_sq[:, sites] = np.square(part).sum(axis=2)
        return total, total_sq


def _groups(lengths: np.ndarray, starts: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(sites, index)`` per distinct non-zero length: ``index[i]`` gathers site
    ``sites[i]``'s segment."""
    by_length = np.argsort(lengths, kind="stable")
    cuts = np.flatnonzero(np.diff(lengths[by_length])) + 1
    out = []
    for sites in np.split(by_length, cuts):
        length = int(lengths[sites[0]])
        if length:
            out.append((sites, starts[sites, None] + np.arange(length)))
    return out


def _zero_one(values: np.ndarray) -> bool:
    """Whether every present (non-NaN) value is 0 or 1. The range (``fmin``/``fmax`` skip
    NaN and allocate nothing) rules most columns out before the exact test."""
    if not values.size or np.isnan(values).all():
        return True
    if np.fmin.reduce(values) < 0 or np.fmax.reduce(values) > 1:
        return False
    present = values[~np.isnan(values)]
    return bool(((present == 0.0) | (present == 1.0)).all())


def _merge(per_site: np.ndarray) -> np.ndarray:
    """Per-site rows added in site order, as ``merge_summaries`` adds them."""
    return np.add.accumulate(per_site, axis=0)[-1].copy()


def _site_sums(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per site: the count, sum and sum of squares of its present values, each equal bit for
    bit to ``present.size``, ``present.sum()``, ``np.square(present).sum()`` (numpy sums a
    contiguous segment pairwise; the rows of a fresh C-contiguous matrix likewise)."""
    present = ~np.isnan(values)
    cum = np.concatenate([[0], np.cumsum(present)])
    counts = cum[offsets[1:]] - cum[offsets[:-1]]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    segments = _Segments(counts, starts)
    total, total_sq = segments.sums(values[present][None, :])
    return segments.sizes, total[0], total_sq[0]


def _encode(
    encoder: TabularEncoder, sources: Sequence[Source], rows: SplitRows
) -> tuple[np.ndarray, np.ndarray]:
    """Every site's rows through :meth:`TabularEncoder.transform`, computed per column: the
    same float64 operations (here in place, in buffers reused from column to column),
    rounded to float32 once."""
    parts = (rows.train, rows.test)
    outs = tuple(np.zeros((len(r), encoder.num_features), dtype=np.float32) for r in parts)
    floats = tuple(np.empty(len(r)) for r in parts)
    flags = tuple(np.empty(len(r), dtype=bool) for r in parts)
    pos = 0
    for j, source in enumerate(sources):
        kind = encoder.kinds[j]
        if kind == "categorical":
            codes, names = source.read()
            index = {c: k for k, c in enumerate(encoder.categories[j])}
            place = np.array([index.get(c, -1) for c in names] + [-1], dtype=np.int64)
            for out, r, missing in zip(outs, parts, flags):
                taken = codes[r]
                np.less(taken, 0, out=missing)
                p = place[taken]
                hit = np.flatnonzero(p >= 0)
                out[hit, pos + p[hit]] = 1.0
                mode = encoder.fill_category[j] if encoder.fill_category is not None else None
                if mode is not None:
                    out[missing, pos + index[mode]] = 1.0
            pos += len(encoder.categories[j])
        else:
            values = source.read()
            mean, std = encoder.mean[j], encoder.std[j]
            fill = mean if encoder.fill is None else encoder.fill[j]
            for out, r, buf, missing in zip(outs, parts, floats, flags):
                np.take(values, r, out=buf)
                np.isnan(buf, out=missing)
                np.copyto(buf, fill, where=missing)  # np.where(missing, fill, x)
                if kind == "continuous":
                    np.subtract(buf, mean, out=buf)
                    np.divide(buf, std, out=buf)
                out[:, pos] = buf
            pos += 1
        if encoder.indicator[j]:
            for out, missing in zip(outs, flags):
                out[:, pos] = missing
            pos += 1
    assert pos == encoder.num_features
    return outs[0], outs[1]
