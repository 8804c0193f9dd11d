"""FLamby's Fed-Heart-Disease: its preprocessing, its fixed train/test split and its model.

FLamby (Ogier du Terrail et al., "FLamby: Datasets and Benchmarks for Cross-Silo Federated
Learning in Realistic Healthcare Settings", NeurIPS 2022 Datasets and Benchmarks) turns the
four UCI Heart Disease hospitals into a benchmark with one fixed split and one published
table. This module rebuilds that split from FLamby's published description and code (read,
not copied), so that our numbers can be set beside theirs (``data.split = "flamby"``):

- 10 raw columns: ``slope``, ``ca`` and ``thal`` are dropped, and every patient with a
  missing value (``?``) in the rest is dropped (no imputation). A recorded 0 is kept as it is
  (Switzerland's cholesterol is all zeros; our own split reads it as missing).
- Train/test per hospital: scikit-learn's ``train_test_split`` of the hospital's rows in file
  order, 66 % train, ``random_state = 43``, stratified by the binary label when both classes
  have more than two patients: 199/104 (Cleveland), 172/89 (Hungary), 30/16 (Switzerland),
  85/45 (Long Beach) patients, the same for every run seed.
- 13 features: the 8 numeric columns in file order, then ``cp`` one-hot without its first
  category (2, 3, 4) and ``restecg`` one-hot without its first (1, 2), as pandas'
  ``get_dummies(drop_first=True)`` orders them.
- Standardisation per hospital with its own training rows' mean and sample standard
  deviation (``(x − mean) / (std + 1e-9)``, train and test alike); pooled training uses the
  pooled training rows' statistics instead (:func:`pooled_flamby_heart_disease`).
- Labels: ``num > 0``.

Every cell is parsed as a number by one columnar reader, so a code written ``1`` at one
hospital and ``1.0`` at another is the same category everywhere; a cell that is not a number
is refused with its file and column (pandas reads a column holding ``?`` as strings, and
one-hot encoding strings beside floats makes ``"1"`` and ``1.0`` two categories: FLamby's own
loader converts to numbers first for that reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files

import numpy as np
import torch
from torch import nn

from consortium.data._assemble import ClientArrays, assemble
from consortium.data.base import FederatedDataset
from consortium.data.heart_disease import CITATION, COLUMNS, SITES
from consortium.errors import DataError

__all__ = [
    "FEATURE_NAMES",
    "FLAMBY_CITATION",
    "SPLIT_SIZES",
    "baseline",
    "encode",
    "flamby_split",
    "load_flamby_heart_disease",
    "parse_site",
    "pooled_flamby_heart_disease",
]

FLAMBY_CITATION = (
    "Ogier du Terrail, J., Ayed, S.-S., Cyffers, E., et al. (2022). FLamby: Datasets and "
    "Benchmarks for Cross-Silo Federated Learning in Realistic Healthcare Settings. NeurIPS "
    "2022 Datasets and Benchmarks. https://github.com/owkin/FLamby (Fed-Heart-Disease)"
)

#: (train, test) patients per hospital on FLamby's split.
SPLIT_SIZES: dict[str, tuple[int, int]] = {
    "cleveland": (199, 104), "hungarian": (172, 89), "switzerland": (30, 16), "va": (85, 45),
}

_DROPPED = ("slope", "ca", "thal")
_KEPT = tuple(c for c in COLUMNS[:-1] if c not in _DROPPED)  # the 10 raw features
_ONE_HOT: dict[str, tuple[int, ...]] = {"cp": (1, 2, 3, 4), "restecg": (0, 1, 2)}
_NUMERIC = tuple(c for c in _KEPT if c not in _ONE_HOT)

#: The 13 features in FLamby's order: numeric columns, then the one-hot columns.
FEATURE_NAMES: tuple[str, ...] = _NUMERIC + tuple(
    f"{name}_{v}" for name, codes in _ONE_HOT.items() for v in codes[1:]
)

_TRAIN_FRACTION = 0.66
_SPLIT_SEED = 43
_EPS = 1e-9


def parse_site(text: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One hospital's processed file as FLamby reads it: the 10 kept raw columns ``[n, 10]``
    of its complete patients (file order) and their binary labels.

    Raises:
        DataError: a line with the wrong number of fields, or a cell that is neither a
            number nor ``?`` (named with its file, line and column).
    """
    import pyarrow as pa
    from pyarrow import csv

    options = csv.ConvertOptions(
        column_types={c: pa.float64() for c in COLUMNS}, null_values=["?"],
        strings_can_be_null=False,
    )
    try:
        table = csv.read_csv(
            pa.py_buffer(text.encode("ascii", errors="replace")),
            read_options=csv.ReadOptions(column_names=list(COLUMNS)),
            convert_options=options,
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(
            f"{name}: {exc}; every cell must be a number or '?' (missing), so that a code "
            "means the same category at every hospital; fix the file or reinstall consortium"
        ) from None
    data = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS])
    data = data.astype(np.float64)
    keep = [COLUMNS.index(c) for c in (*_KEPT, "num")]
    data = data[:, keep]
    complete = ~np.isnan(data).any(axis=1)
    data = data[complete]
    return data[:, :-1], (data[:, -1] > 0).astype(np.int64)


def flamby_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's train and test row indices for one hospital with labels ``y`` (file order):
    66/34, ``random_state = 43``, stratified when each class has more than two patients."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y, minlength=2)
    stratify = y if (counts > 2).all() else None
    train, test = train_test_split(
        np.arange(len(y)), test_size=1.0 - _TRAIN_FRACTION, train_size=_TRAIN_FRACTION,
        random_state=_SPLIT_SEED, shuffle=True, stratify=stratify,
    )
    # FLamby marks rows as train or test and then keeps them in file order.
    return np.sort(train), np.sort(test)


def encode(raw: np.ndarray, *, name: str = "") -> np.ndarray:
    """The 13 features (:data:`FEATURE_NAMES`) of raw rows ``[n, 10]``, not standardised.

    Raises:
        DataError: a ``cp`` or ``restecg`` code outside the UCI codebook.
    """
    numeric = raw[:, [_KEPT.index(c) for c in _NUMERIC]]
    blocks = [numeric]
    for column, codes in _ONE_HOT.items():
        values = raw[:, _KEPT.index(column)]
        known = np.isin(values, codes)
        if not known.all():
            bad = sorted(set(values[~known].tolist()))
            raise DataError(
                f"{name or 'the data'}: {column} holds {bad}, outside its codes {list(codes)}; "
                "fix the file or reinstall consortium"
            )
        dummies = values[:, None] == np.asarray(codes[1:], dtype=np.float64)
        blocks.append(dummies.astype(np.float64))
    return np.concatenate(blocks, axis=1)


def _standardise(x: np.ndarray, fit: np.ndarray) -> np.ndarray:
    # torch.std is the sample standard deviation; FLamby adds 1e-9, so a constant column
    # (a one-hot category a hospital never has) becomes 0 instead of NaN.
    mean = fit.mean(axis=0)
    std = fit.std(axis=0, ddof=1)
    return (x - mean) / (std + _EPS)


def _sites(texts: dict[str, str] | None = None) -> dict[str, tuple[np.ndarray, ...]]:
    """Per hospital: encoded train, train labels, encoded test, test labels (not scaled)."""
    out: dict[str, tuple[np.ndarray, ...]] = {}
    for site, file in SITES.items():
        text = texts[site] if texts is not None else (
            files("consortium.data") / "_heart_disease" / file).read_text(encoding="ascii")
        raw, y = parse_site(text, file)
        train, test = flamby_split(y)
        x = encode(raw, name=file)
        out[site] = (x[train], y[train], x[test], y[test])
    return out


def load_flamby_heart_disease(*, scaling: str = "site") -> FederatedDataset:
    """The four hospitals on FLamby's fixed split (module docstring), one client each.

    The split does not depend on the run seed (FLamby fixes it). ``scaling``: ``"site"``
    standardises each hospital with its own training statistics, as FLamby's current
    ``FedHeartDisease`` does; ``"pooled"`` uses the pooled training statistics for every
    hospital (what FLamby's seeds 42-44 result files match: benchmarks/RESULTS.md; a
    statistic no site could compute alone); ``"none"`` keeps the encoded values.

    Raises:
        DataError: an unknown ``scaling``.
    """
    if scaling not in ("site", "pooled", "none"):
        raise DataError(f"scaling = {scaling!r}; expected 'site', 'pooled' or 'none'")
    sites = _sites()
    pooled_train = np.concatenate([s[0] for s in sites.values()])
    clients = []
    for site, (x_tr, y_tr, x_te, y_te) in sites.items():
        fit = x_tr if scaling == "site" else pooled_train
        if scaling != "none":
            x_tr, x_te = _standardise(x_tr, fit), _standardise(x_te, fit)
        clients.append(ClientArrays(site, x_tr, y_tr, x_te, y_te))
    return _assemble(clients, {"site": "per hospital", "pooled": "pooled", "none": "none"}[scaling])


def pooled_flamby_heart_disease() -> FederatedDataset:
    """One client ``pooled`` holding every hospital's training rows, standardised with the
    pooled training statistics, as FLamby trains its pooled baseline. Its test split is every
    hospital's test rows with the same statistics (FLamby's "Pooled Test"); FLamby scores the
    pooled model per hospital on :func:`load_flamby_heart_disease`'s test splits."""
    sites = _sites()
    x_tr = np.concatenate([s[0] for s in sites.values()])
    x_te = np.concatenate([s[2] for s in sites.values()])
    y_tr = np.concatenate([s[1] for s in sites.values()])
    y_te = np.concatenate([s[3] for s in sites.values()])
    pooled = ClientArrays("pooled", _standardise(x_tr, x_tr), y_tr, _standardise(x_te, x_tr), y_te)
    return _assemble([pooled], "pooled")


def _assemble(clients: Sequence[ClientArrays], scaling: str) -> FederatedDataset:
    return assemble(
        "heart-disease", clients, num_classes=2, input_shape=(len(FEATURE_NAMES),),
        feature_names=FEATURE_NAMES, citation=f"{CITATION} Split: {FLAMBY_CITATION}",
        notes={"split": "flamby", "standardised": scaling,
               "task": "coronary artery disease (num > 0) from 10 clinical attributes"},
    )


class _BinaryLogistic(nn.Module):
    """``Linear(d, 1)`` read as the logit of class 1 against a fixed 0 for class 0.

    Softmax cross-entropy over ``[0, z]`` is exactly FLamby's sigmoid + binary cross-entropy
    on ``z``, with the same gradients and torch's default initialisation of one output: the
    zoo's two-output ``logistic`` learns ``z = w₁ − w₀``, which moves twice as fast for the
    same learning rate and starts from a wider initial spread.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x.flatten(1))
        return torch.cat([torch.zeros_like(z), z], dim=1)


def baseline(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """FLamby's Fed-Heart-Disease model: logistic regression with one output (see
    :class:`_BinaryLogistic`); ``model.name = "consortium.data.flamby:baseline"``.

    Raises:
        DataError: the task is not binary.
    """
    if num_classes != 2:
        raise DataError(
            f"FLamby's baseline is a binary classifier; this task has {num_classes} classes"
        )
    return _BinaryLogistic(int(np.prod(tuple(input_shape))))
