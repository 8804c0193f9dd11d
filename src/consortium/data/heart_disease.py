"""The UCI Heart Disease data: four real hospitals, a cross-silo federated data set."""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path

import numpy as np

from consortium.data._assemble import ClientArrays, assemble
from consortium.data._rng import generator
from consortium.data.base import FederatedDataset
from consortium.data.holdout import holdout
from consortium.data.preprocess import Column, encode_sites
from consortium.errors import DataError

__all__ = ["CITATION", "COLUMNS", "FEATURES", "SITES", "load_heart_disease", "site_split"]

CITATION = (
    "Janosi, A., Steinbrunn, W., Pfisterer, M., Detrano, R. (1988). Heart Disease. "
    "UCI Machine Learning Repository. https://doi.org/10.24432/C52P4X (CC BY 4.0). "
    "Principal investigators: Andras Janosi (Hungarian Institute of Cardiology, Budapest), "
    "William Steinbrunn (University Hospital, Zurich), Matthias Pfisterer (University Hospital, "
    "Basel), Robert Detrano (V.A. Medical Center, Long Beach and Cleveland Clinic Foundation)."
)

#: client id → file, in the order the clients appear in the data set.
SITES: dict[str, str] = {
    "cleveland": "processed.cleveland.data",
    "hungarian": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}

#: The 14 columns of the processed files, in file order; ``num`` is the diagnosis.
COLUMNS: tuple[str, ...] = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)  # fmt: skip

_FEATURES: tuple[Column, ...] = (
    Column("age", "continuous"),
    Column("sex", "binary"),
    Column("cp", "categorical", categories=(1, 2, 3, 4)),
    Column("trestbps", "continuous"),
    Column("chol", "continuous"),
    Column("fbs", "binary"),
    Column("restecg", "categorical", categories=(0, 1, 2)),
    Column("thalach", "continuous"),
    Column("exang", "binary"),
    Column("oldpeak", "continuous"),
    Column("slope", "categorical", categories=(1, 2, 3)),
    Column("ca", "continuous"),
    Column("thal", "categorical", categories=(3, 6, 7)),
)

# A recorded 0 is physically impossible for these; the files use it for "not measured"
# (Switzerland records every cholesterol as 0, and one V.A. patient has a blood pressure of 0).
_ZERO_MEANS_MISSING = ("chol", "trestbps")


def load_heart_disease(
    *, seed: int, test_fraction: float = 0.25, impute: str = "mean",
    impute_categorical: str = "indicator",
) -> FederatedDataset:
    """The UCI Heart Disease data, one client per hospital (920 patients).

    Clients, in order: ``cleveland`` (Cleveland Clinic Foundation, 303 patients), ``hungarian``
    (Hungarian Institute of Cardiology, Budapest, 294), ``switzerland`` (University Hospitals
    of Zurich and Basel, 123) and ``va`` (V.A. Medical Center, Long Beach, 200). Data:
    Janosi, Steinbrunn, Pfisterer and Detrano (1988), UCI Machine Learning Repository,
    CC BY 4.0; the same four sites form FLamby's Fed-Heart-Disease benchmark (Ogier du
    Terrail et al. 2022).

    The task is binary: disease (``num > 0``) or not. ``?`` and a recorded 0 for cholesterol
    or resting blood pressure mean missing. Each hospital splits its own patients into train
    and test, stratified by label and seeded by ``seed`` and the hospital's name. Features are
    encoded by :mod:`consortium.data.preprocess` with statistics summed over the hospitals'
    training splits: continuous ``age, trestbps, chol, thalach, oldpeak, ca`` standardised;
    binary ``sex, fbs, exang`` as 0/1; ``cp`` (1-4), ``restecg`` (0-2), ``slope`` (1-3) and
    ``thal`` (3, 6, 7) one-hot; every column with a missing value at some hospital gets a
    ``<name>_missing`` indicator and is imputed with the federated mean. The result has
    32 features, named in ``feature_names``.

    Args:
        seed: the run seed; the same seed gives the same splits.
        impute: ``"mean"`` (the federated mean) or ``"median"`` (the federated median, from
            summed histograms) for missing numeric values.
        impute_categorical: ``"indicator"`` (all zeros; the indicator marks them) or
            ``"mode"`` (the federated most frequent category).
        test_fraction: the share of each hospital's patients held out for testing.

    Raises:
        DataError: if ``test_fraction`` is not in ``(0, 1)`` or a shipped file is damaged.
    """
    raw = {site: _read_site(name) for site, name in SITES.items()}
    trains, tests, y_trains, y_tests = [], [], [], []
    for site, (x, y) in raw.items():
        keep, held = holdout(y, fraction=test_fraction, rng=generator(seed, "heart-disease", site))
        trains.append(x[keep])
        tests.append(x[held])
        y_trains.append(y[keep])
        y_tests.append(y[held])
    encoder, x_trains, x_tests = encode_sites(trains, tests, columns=_FEATURES, impute=impute,
                                              impute_categorical=impute_categorical)
    clients = [
        ClientArrays(site, x_trains[i], y_trains[i], x_tests[i], y_tests[i])
        for i, site in enumerate(SITES)
    ]
    return assemble(
        "heart-disease",
        clients,
        num_classes=2,
        input_shape=(encoder.num_features,),
        feature_names=encoder.feature_names,
        citation=CITATION,
        notes={
            "task": "coronary artery disease (num > 0) from 13 clinical attributes",
            "sites": "Cleveland, Budapest, Zurich/Basel, Long Beach",
            "labels": "0=no disease, 1=disease",
        },
    )


def _read_site(name: str) -> tuple[np.ndarray, np.ndarray]:
    """One hospital's shipped file: raw features ``[n, 13]`` (NaN = missing) and binary labels."""
    text = (files("consortium.data") / "_heart_disease" / name).read_text(encoding="ascii")
    return _parse(text, name)


def site_split(
    path: str | Path, site: str, *, seed: int, test_fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A deployed hospital's own file, split exactly as :func:`load_heart_disease` splits it.

    Returns raw ``(x_train, y_train, x_test, y_test)``; encode them with the encoder fitted on
    every site's :func:`~consortium.data.preprocess.summarize_site` (``FEATURES``), as the
    simulation does, so a deployment trains on the same numbers.

    Raises:
        DataError: ``site`` is not one of :data:`SITES` (its name seeds its split), or the file
            is unreadable or malformed.
    """
    if site not in SITES:
        raise DataError(
            f"site {site!r} is not a heart-disease hospital; expected one of {', '.join(SITES)} "
            "(its name seeds its train/test split)"
        )
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from None
    x, y = _parse(text, str(path))
    keep, held = holdout(y, fraction=test_fraction, rng=generator(seed, "heart-disease", site))
    return x[keep], y[keep], x[held], y[held]


def _parse(text: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    rows: list[list[float]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split(",")
        if len(fields) != len(COLUMNS):
            raise DataError(
                f"{name} line {line_no} has {len(fields)} fields, expected {len(COLUMNS)}; "
                "the packaged file is damaged, reinstall consortium"
            )
        try:
            rows.append([math.nan if f == "?" else float(f) for f in fields])
        except ValueError as exc:
            raise DataError(
                f"{name} line {line_no}: {exc}; the packaged file is damaged, reinstall consortium"
            ) from None
    table = np.asarray(rows, dtype=np.float64)
    for column in _ZERO_MEANS_MISSING:
        j = COLUMNS.index(column)
        table[table[:, j] == 0, j] = np.nan
    num = table[:, -1]
    if np.isnan(num).any():
        raise DataError(f"{name} has patients without a diagnosis; reinstall consortium")
    return table[:, :-1], (num > 0).astype(np.int64)


FEATURES = _FEATURES
"""How the 13 raw columns are encoded (the same at every site)."""
