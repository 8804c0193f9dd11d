"""Group columns kept aside at each site: labels for group fairness, and reweighing by group.

``evaluation.groups = ["sex", "age_band"]`` names *columns of the data*, not features of the
model. :func:`keep_groups_aside` reads each row's group label once, after loading, stores the
labels beside the data (:attr:`FederatedDataset.groups`: client → column → ``train``/``test``
labels, one per row) and removes the group's feature columns from ``x`` so that the model
never sees the protected attribute, unless ``evaluation.group_features = true`` asks for it.
A group column is a 0/1 feature of that name (heart disease's ``sex``: 1 = male, 0 = female)
or a categorical one, one-hot encoded as ``<name>=<value>``; its ``<name>_missing`` indicator
goes with it, and its missing rows get the label ``missing``.

Derived groups: ``<column>_band`` with ``evaluation.bands = ["<column>: e1, e2, ..."]`` (edges,
strictly increasing) groups a numeric column into ``<e1``, ``e1–e2``, ..., ``≥ek`` (each band
holds its lower edge). The banded column *stays a feature*: age is a clinical predictor, not a
protected attribute by itself, and dropping it would change the model being judged. Bands
are cut on the raw value: heart disease standardises its continuous columns, so the
standardisation is inverted (with the federated mean and standard deviation that the loader
fitted, recomputed from the shipped files under the same seed); other data sets are refused
(for your own files, add a categorical band column and name it in ``evaluation.groups``).

:func:`reweigh` is the fairness-aware training option ``[fairness] method = "reweigh"``:
Kamiran & Calders' reweighing ("Data preprocessing techniques for classification without
discrimination", Knowledge and Information Systems 33, 2012), applied as their *uniform
sampling*, at each site, on its own training rows.

:func:`fitting_split` sets aside, at each site, the rows on which ``[fairness] method =
"thresholds"`` (:mod:`consortium.server.thresholds`, Hardt, Price, Srebro 2016) fits its
per-group thresholds: the training rows themselves (``fairness.fit_fraction = 0``, the default)
or a seeded share of them, stratified by (group, label) and no longer trained on.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from consortium.data._rng import generator
from consortium.data.base import FederatedDataset, PackedClients, Split
from consortium.data.holdout import holdout
from consortium.errors import ConfigError, DataError

if TYPE_CHECKING:
    from consortium.config import DataConfig

__all__ = [
    "BAND_SUFFIX",
    "apply_group_options",
    "band_labels",
    "feature_group_labels",
    "fitting_split",
    "keep_groups_aside",
    "parse_bands",
    "reweigh",
    "reweighing_weights",
    "uniform_sample",
]

BAND_SUFFIX = "_band"
_DASH, _AT_LEAST = "\u2013", "\u2265"  # "–" and "≥"


# -- bands ------------------------------------------------------------------------------------


def parse_bands(specs: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """``["age: 50, 60"]`` → ``{"age": (50.0, 60.0)}``: each band column and its edges.

    Raises:
        ConfigError: a spec without ``column:``, an edge that is not a finite number, edges
            that do not strictly increase, or the same column banded twice.
    """
    out: dict[str, tuple[float, ...]] = {}
    for spec in specs:
        column, sep, rest = spec.partition(":")
        column = column.strip()
        if not sep or not re.fullmatch(r"[^:=,]+", column):
            raise ConfigError(
                f"evaluation.bands entry {spec!r} is not '<column>: <edge>, <edge>, ...'; "
                'write e.g. "age: 50, 60" (bands <50, 50-60, >=60)'
            )
        try:
            edges = tuple(float(e) for e in rest.split(","))
        except ValueError:
            raise ConfigError(
                f"evaluation.bands entry {spec!r}: the edges must be numbers separated by "
                'commas, e.g. "age: 50, 60"'
            ) from None
        if not all(np.isfinite(edges)) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ConfigError(
                f"evaluation.bands entry {spec!r}: the edges must be finite and strictly "
                'increasing, e.g. "age: 50, 60"'
            )
        if column in out:
            raise ConfigError(
                f"evaluation.bands bands {column!r} twice; give one entry per column"
            )
        out[column] = edges
    return out


def band_labels(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Each value's band: ``<e1``, ``e1–e2``, ..., ``≥ek``; a band holds its lower edge; NaN
    is ``missing``."""
    shown = [f"{e:g}" for e in edges]
    names = np.array(
        [f"<{shown[0]}"]
        + [f"{a}{_DASH}{b}" for a, b in zip(shown, shown[1:])]
        + [f"{_AT_LEAST}{shown[-1]}", "missing"],
        dtype=object,
    )
    v = np.asarray(values, dtype=np.float64)
    which = np.where(np.isnan(v), len(edges) + 1,
                     np.searchsorted(np.asarray(edges, dtype=np.float64), v, side="right"))
    return names[which].astype(str)


# -- labels from encoded features -----------------------------------------------------------------


def _columns_of(names: Sequence[str], column: str) -> list[int]:
    """The feature indices that encode ``column``: itself or its one-hot block, and its
    missing-value indicator."""
    return [i for i, n in enumerate(names)
            if n == column or n.startswith(f"{column}=") or n == f"{column}_missing"]


def feature_group_labels(x: np.ndarray, names: Sequence[str], column: str) -> np.ndarray:
    """Each row's group label (text) for ``column``, read from the encoded features ``x``
    (``[n, d]``, columns named ``names``): a 0/1 feature gives ``"0"``/``"1"``, a one-hot
    block its category; a row marked by ``<column>_missing`` (or with no category set) is
    ``missing``.

    Raises:
        ConfigError: ``column`` is not a feature, or is a continuous one (band it instead).
    """
    names = list(names)
    missing_at = names.index(f"{column}_missing") if f"{column}_missing" in names else None
    missing = (x[:, missing_at] > 0.5) if missing_at is not None else np.zeros(len(x), bool)
    if column in names:
        v = x[:, names.index(column)]
        one, zero = np.isclose(v, 1.0), np.isclose(v, 0.0)
        if bool((~(one | zero) & ~missing).any()):
            raise ConfigError(
                f"evaluation.groups names {column!r}, a continuous feature (values other than "
                f"0 and 1); group it into bands instead: groups = [\"{column}{BAND_SUFFIX}\"] "
                f'with bands = ["{column}: <edge>, <edge>"]'
            )
        labels = np.where(one, "1", "0")
    else:
        block = [i for i, n in enumerate(names) if n.startswith(f"{column}=")]
        if not block:
            raise ConfigError(
                f"evaluation.groups names {column!r}, which is not a feature of this data set; "
                f"use a 0/1 feature or a categorical column, or a band "
                f"(\"<column>{BAND_SUFFIX}\" with evaluation.bands) (features: "
                f"{', '.join(names[:20])}{' …' if len(names) > 20 else ''})"
            )
        cats = np.array([names[i].split("=", 1)[1] for i in block] + ["missing"], dtype=object)
        onehot = x[:, block]
        which = np.where(onehot.max(axis=1) > 0.5, onehot.argmax(axis=1), len(block))
        labels = cats[which].astype(str)
    return np.where(missing, "missing", labels).astype(str)


def _band_values(
    x: np.ndarray, names: Sequence[str], column: str, scale: tuple[float, float] | None
) -> np.ndarray:
    """The raw values of feature ``column`` (``scale`` = the standardisation's mean and sd
    to invert, or None when the feature is raw); NaN where its indicator marks it missing."""
    names = list(names)
    if column not in names:
        raise ConfigError(
            f"evaluation.bands bands {column!r}, which is not a numeric feature of this data "
            f"set (features: {', '.join(names[:20])}{' …' if len(names) > 20 else ''})"
        )
    v = x[:, names.index(column)].astype(np.float64)
    if scale is not None:
        # float32 features: undo (v - mean) / sd, rounded so that an integer age stays one
        v = np.round(v * scale[1] + scale[0], 4)
    if f"{column}_missing" in names:
        v = np.where(x[:, names.index(f"{column}_missing")] > 0.5, np.nan, v)
    return v


def heart_disease_scales(cfg: DataConfig, *, seed: int) -> dict[str, tuple[float, float]]:
    """Heart disease's standardisation, column → (federated mean, sd), as
    :func:`~consortium.data.heart_disease.load_heart_disease` fits it for this ``seed`` and
    ``test_fraction`` (recomputed from the shipped files, so no raw value is kept)."""
    from importlib.resources import as_file, files

    from consortium.data.heart_disease import FEATURES, SITES, site_split
    from consortium.data.preprocess import fit_encoder, merge_summaries, summarize_site

    summaries = []
    for site, name in SITES.items():
        with as_file(files("consortium.data") / "_heart_disease" / name) as path:
            x_train, _, x_test, _ = site_split(path, site, seed=seed,
                                               test_fraction=cfg.test_fraction)
        summaries.append(summarize_site(x_train, columns=FEATURES, holdout=x_test))
    encoder = fit_encoder(FEATURES, merge_summaries(summaries))
    return {col.name: (float(encoder.mean[j]), float(encoder.std[j]))
            for j, (col, kind) in enumerate(zip(encoder.columns, encoder.kinds))
            if kind == "continuous"}


# -- the transform ------------------------------------------------------------------------------


def keep_groups_aside(
    dataset: FederatedDataset,
    groups: Sequence[str],
    *,
    bands: Mapping[str, Sequence[float]] | None = None,
    scales: Mapping[str, tuple[float, float]] | None = None,
    as_features: bool = False,
) -> FederatedDataset:
    """Store each row's group labels beside the data and take the group columns out of ``x``.

    Args:
        dataset: a tabular data set with ``feature_names``.
        groups: group columns: a 0/1 or one-hot feature's name, or ``<column>_band``.
        bands: column → band edges (:func:`parse_bands`), for each ``<column>_band``.
        scales: column → (mean, sd) of a standardised feature, inverted before banding.
        as_features: keep the group columns in ``x`` (``evaluation.group_features``).

    Returns:
        ``dataset`` with ``groups`` filled (client → column → ``{"train", "test"}`` labels)
        and, unless ``as_features``, without the group columns' features (``feature_names``
        and ``input_shape`` follow). A server-side test set loses the same columns.

    Raises:
        ConfigError: a column that is not a feature, a continuous one named without a band,
            a band without edges (or edges without the band), or features that are not a
            named table.
    """
    bands = dict(bands or {})
    scales = dict(scales or {})
    names = list(dataset.feature_names or ())
    if not names or len(dataset.input_shape) != 1:
        raise ConfigError(
            f"evaluation.groups needs a table with named columns; {dataset.name!r} has "
            f"features of shape {dataset.input_shape} without names; remove evaluation.groups"
        )
    banded = {g[: -len(BAND_SUFFIX)] for g in groups if g.endswith(BAND_SUFFIX)
              and g[: -len(BAND_SUFFIX)] in bands}
    unused = sorted(set(bands) - banded)
    if unused:
        raise ConfigError(
            f"evaluation.bands bands {unused[0]!r}, but evaluation.groups does not name "
            f"{unused[0] + BAND_SUFFIX!r}; add it to evaluation.groups or remove the band"
        )
    packed = dataset.packed()
    x_train = packed.train.x.numpy().reshape(len(packed.train), -1)
    x_test = packed.test.x.numpy().reshape(len(packed.test), -1)
    labels: dict[str, dict[str, np.ndarray]] = {}
    drop: set[int] = set()
    for column in groups:
        base = column[: -len(BAND_SUFFIX)] if column.endswith(BAND_SUFFIX) else None
        if base is not None and base in bands:
            labels[column] = {
                part: band_labels(_band_values(x, names, base, scales.get(base)), bands[base])
                for part, x in (("train", x_train), ("test", x_test))
            }
            continue  # the banded column stays a feature (see the module docstring)
        if column not in names and not any(n.startswith(f"{column}=") for n in names) and (
                base is not None):
            raise ConfigError(
                f"evaluation.groups names {column!r} but evaluation.bands has no edges for "
                f"{base!r}; add e.g. evaluation.bands = [\"{base}: 50, 60\"]"
            )
        labels[column] = {part: feature_group_labels(x, names, column)
                          for part, x in (("train", x_train), ("test", x_test))}
        drop.update(_columns_of(names, column))
    per_client = _split_by_client(packed, labels)
    if as_features or not drop:
        return dataclasses.replace(dataset, groups=per_client)
    keep = torch.tensor([i for i in range(len(names)) if i not in drop], dtype=torch.int64)
    clients = PackedClients(
        packed.client_ids,
        train=Split(packed.train.x[:, keep].contiguous(), packed.train.y),
        test=Split(packed.test.x[:, keep].contiguous(), packed.test.y),
        train_offsets=packed.train_offsets, test_offsets=packed.test_offsets,
    )
    server_test = dataset.server_test
    if server_test is not None:
        server_test = Split(server_test.x[:, keep].contiguous(), server_test.y)
    return dataclasses.replace(
        dataset, clients=clients, server_test=server_test, input_shape=(len(keep),),
        feature_names=tuple(names[i] for i in keep.tolist()), groups=per_client,
    )


def _split_by_client(
    packed: PackedClients, labels: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    tr, te = packed.train_offsets.tolist(), packed.test_offsets.tolist()
    for i, cid in enumerate(packed.client_ids):
        out[cid] = {column: {"train": parts["train"][tr[i]:tr[i + 1]],
                             "test": parts["test"][te[i]:te[i + 1]]}
                    for column, parts in labels.items()}
    return out


# -- reweighing ---------------------------------------------------------------------------------


def reweighing_weights(groups: np.ndarray, labels: np.ndarray) -> dict[tuple[str, int], float]:
    """Kamiran & Calders' reweighing weights (KAIS 2012, Algorithm 3): each (group, label)
    cell weighs ``P(g)·P(y) / P(g, y)`` = ``n_g·n_y / (n·n_gy)``, so that group and label are
    independent in the weighted data; computed from these rows only (one site's)."""
    groups, labels = np.asarray(groups).astype(str), np.asarray(labels)
    n = len(labels)
    out: dict[tuple[str, int], float] = {}
    for g in np.unique(groups):
        for y in np.unique(labels):
            n_gy = int(((groups == g) & (labels == y)).sum())
            if n_gy:
                out[(str(g), int(y))] = int((groups == g).sum()) * int((labels == y).sum()) / (
                    n * n_gy)
    return out


def uniform_sample(groups: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Kamiran & Calders' *uniform sampling* (KAIS 2012, Algorithm 4): the row indices of a
    resample in which each (group, label) cell has its expected size under independence,
    ``round(n_g·n_y / n)`` (the reweighing weight times its size): a cell above it loses
    randomly chosen rows (without replacement), a cell below it keeps all of its rows and
    duplicates randomly chosen ones. A cell with no rows stays empty. The indices are sorted.
    """
    groups, labels = np.asarray(groups).astype(str), np.asarray(labels)
    n = len(labels)
    parts: list[np.ndarray] = []
    for g in np.unique(groups):
        in_g = groups == g
        for y in np.unique(labels):
            rows = np.flatnonzero(in_g & (labels == y))
            if not len(rows):
                continue
            target = int(np.floor(int(in_g.sum()) * int((labels == y).sum()) / n + 0.5))
            if target <= len(rows):
                parts.append(rng.choice(rows, size=target, replace=False))
            else:
                parts.append(np.concatenate(
                    [rows, rng.choice(rows, size=target - len(rows), replace=True)]))
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def reweigh(dataset: FederatedDataset, column: str, *, seed: int) -> FederatedDataset:
    """``[fairness] method = "reweigh"``: every site resamples its own training rows by
    :func:`uniform_sample` over (``column``'s group, label), seeded from the run seed and its
    id, so that every executor trains on the same rows. Test rows are untouched; the group
    labels of the training rows follow the resample.

    Raises:
        ConfigError: ``column`` has no labels (name it in ``evaluation.groups``).
    """
    packed = dataset.packed()
    if any(column not in dataset.groups.get(cid, {}) for cid in packed.client_ids):
        raise ConfigError(
            f"fairness.column = {column!r} has no group labels; name it in evaluation.groups"
        )
    offsets = packed.train_offsets.tolist()
    y = packed.train.y.numpy()
    picks: list[np.ndarray] = []
    groups: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for i, cid in enumerate(packed.client_ids):
        a, b = offsets[i], offsets[i + 1]
        mine = dataset.groups[cid]
        pick = uniform_sample(mine[column]["train"], y[a:b], generator(seed, "reweigh", cid))
        picks.append(pick + a)
        groups[cid] = {c: {**parts, "train": parts["train"][pick]} for c, parts in mine.items()}
    rows = torch.from_numpy(np.concatenate(picks).astype(np.int64))
    sizes = torch.tensor([0] + [len(p) for p in picks], dtype=torch.int64)
    clients = PackedClients(
        packed.client_ids, train=Split(packed.train.x[rows], packed.train.y[rows]),
        test=packed.test, train_offsets=torch.cumsum(sizes, 0), test_offsets=packed.test_offsets,
    )
    return dataclasses.replace(dataset, clients=clients, groups=groups)


# -- the fitting split of equalised-odds post-processing ---------------------------------------


def fitting_split(
    dataset: FederatedDataset, column: str, *, fraction: float, seed: int
) -> FederatedDataset:
    """The rows on which ``[fairness] method = "thresholds"`` fits its per-group thresholds
    (Hardt, Price, Srebro, "Equality of Opportunity in Supervised Learning", NeurIPS 2016),
    kept at each site in :attr:`FederatedDataset.fitting`, with their group labels as the
    ``"fit"`` part of :attr:`FederatedDataset.groups`. Never a test row.

    ``fraction = 0``: the site's training rows themselves (before any reweighing), so the
    model trains on every row and the thresholds see the most rows of a small group; the
    model's scores on rows it was fitted to are optimistic (higher TPR, lower FPR than on new
    rows), more so for a small group and a flexible model, so the thresholds inherit that bias.
    ``fraction`` in ``(0, 1)``: a seeded share of each site's training rows, stratified by
    (``column``'s group, label) (:func:`~consortium.data.holdout.holdout`, seeded by the run
    seed and the site's id), taken out of training: the scores are those of unseen rows
    (unbiased), but the model trains on fewer rows and the thresholds rest on fewer.

    Raises:
        ConfigError: ``column`` has no group labels (name it in ``evaluation.groups``).
        DataError: ``fraction`` outside ``[0, 1)``, or a site with fewer than 2 training rows
            to share between training and fitting.
    """
    if not 0 <= fraction < 1:
        raise DataError(
            f"fairness.fit_fraction = {fraction!r} is not allowed: expected the share of each "
            "site's training rows to fit the thresholds on, in [0, 1) (0 = the training rows)"
        )
    packed = dataset.packed()
    if any(column not in dataset.groups.get(cid, {}) for cid in packed.client_ids):
        raise ConfigError(
            f"fairness.column = {column!r} has no group labels; name it in evaluation.groups"
        )
    offsets = packed.train_offsets.tolist()
    y = packed.train.y.numpy()
    keeps: list[np.ndarray] = []
    fitting: dict[str, Split] = {}
    groups: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for i, cid in enumerate(packed.client_ids):
        a, b = offsets[i], offsets[i + 1]
        mine = dataset.groups[cid]
        if fraction == 0:
            keep = fit = np.arange(b - a)
        else:
            if b - a < 2:
                raise DataError(
                    f"client {cid!r} has {b - a} training row(s), too few to keep one to train "
                    f"on and set one aside to fit thresholds on (fairness.fit_fraction = "
                    f"{fraction:g}); set fairness.fit_fraction = 0 (fit on the training rows)"
                )
            cells = np.char.add(np.asarray(mine[column]["train"]).astype(str),
                                np.char.add("|", y[a:b].astype(str)))
            keep, fit = holdout(cells, fraction=fraction, rng=generator(seed, "fairness-fit", cid))
        keeps.append(keep + a)
        rows = torch.from_numpy((fit + a).astype(np.int64))
        fitting[cid] = Split(packed.train.x[rows], packed.train.y[rows])
        groups[cid] = {c: {**parts, "train": parts["train"][keep], "fit": parts["train"][fit]}
                       for c, parts in mine.items()}
    if fraction == 0:
        return dataclasses.replace(dataset, fitting=fitting, groups=groups)
    rows = torch.from_numpy(np.concatenate(keeps).astype(np.int64))
    sizes = torch.tensor([0] + [len(k) for k in keeps], dtype=torch.int64)
    clients = PackedClients(
        packed.client_ids, train=Split(packed.train.x[rows], packed.train.y[rows]),
        test=packed.test, train_offsets=torch.cumsum(sizes, 0), test_offsets=packed.test_offsets,
    )
    return dataclasses.replace(dataset, clients=clients, fitting=fitting, groups=groups)


def apply_group_options(
    dataset: FederatedDataset, cfg: DataConfig, *, seed: int, groups: Sequence[str],
    bands: Sequence[str] = (), as_features: bool = False, reweigh_by: str = "",
    fit_by: str = "", fit_fraction: float = 0.0,
) -> FederatedDataset:
    """``load_dataset``'s last step: :func:`keep_groups_aside` with the ``[evaluation]``
    options, then :func:`fitting_split` when ``[fairness] method`` has ``"thresholds"``
    (``fit_by``, ``fit_fraction``: the fitting rows are set aside before any resampling), then
    :func:`reweigh` when it has ``"reweigh"`` (``reweigh_by``)."""
    if not groups:
        return dataset
    edges = parse_bands(bands)
    scales: dict[str, tuple[float, float]] = {}
    if edges:
        if dataset.name != "heart-disease":
            raise ConfigError(
                f"evaluation.bands needs the raw values of {', '.join(map(repr, edges))}, which "
                f"consortium recovers for heart-disease only (it inverts the standardisation); "
                f"for {dataset.name!r} add a categorical band column to your data and name it "
                "in evaluation.groups"
            )
        scales = heart_disease_scales(cfg, seed=seed)
    out = keep_groups_aside(dataset, groups, bands=edges, scales=scales, as_features=as_features)
    if fit_by:
        out = fitting_split(out, fit_by, fraction=fit_fraction, seed=seed)
    return reweigh(out, reweigh_by, seed=seed) if reweigh_by else out
