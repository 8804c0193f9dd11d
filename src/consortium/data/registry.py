"""The built-in data sets by name, and ``load_dataset``, which builds one from ``[data]``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from consortium.data.partition import PARTITIONS
from consortium.errors import DataError

if TYPE_CHECKING:
    from consortium.config import DataConfig, EvaluationConfig, FairnessConfig
    from consortium.data.base import FederatedDataset

__all__ = ["DATASETS", "PARTITIONS", "load_dataset"]

DATASETS: dict[str, str] = {
    "heart-disease": "UCI Heart Disease, 920 patients at 4 real hospitals, binary diagnosis "
    "(shipped with consortium)",
    "synthetic": "FedProx's Synthetic(alpha, beta): 60 features, 10 classes, one generating "
    "model per client (Li et al. 2020)",
    "digits": "8x8 handwritten digits, 1,797 images, 10 classes (bundled with scikit-learn)",
    "breast-cancer": "Breast Cancer Wisconsin, 569 tumours, 30 features, binary "
    "(bundled with scikit-learn)",
    "csv": "your CSV files: one client per file, or one file with a site column",
    "parquet": "your Parquet files: one client per file, or one file with a site column "
    "(needs pyarrow)",
}

_SITED = ("heart-disease", "synthetic", "csv", "parquet")
_TABLES = ("heart-disease", "csv", "parquet")


def load_dataset(
    cfg: DataConfig, *, seed: int, min_count: int = 5, evaluation: EvaluationConfig | None = None,
    fairness: FairnessConfig | None = None,
) -> FederatedDataset:
    """Build the federated data set that the ``[data]`` section describes.

    ``heart-disease``, ``csv`` and ``parquet`` have real sites and ``synthetic`` generates
    one distribution per client, so they take only ``partition = "natural"``; ``digits`` and
    ``breast-cancer`` have no sites and take any other partition. Only ``digits`` and
    ``breast-cancer`` have a server test set (``server_test_fraction``). ``clients`` is
    ignored where the sites are given (heart disease has four, files have theirs). Keys
    that a data set does not use (``alpha`` for heart disease ...) are ignored. Nothing is
    downloaded. With ``validation`` > 0 the clients are evaluated on a validation split of
    their training rows instead of their test split
    (:func:`~consortium.data.validation.validation_split`).

    Args:
        cfg: the data configuration.
        seed: the run seed; with the same seed and configuration the data are identical.
        min_count: csv and parquet: a site names a category only when that many of its rows
            hold it, as a deployed site does
            (:func:`~consortium.data.preprocess.category_min_count`; pass
            ``category_min_count(analysis=cfg.analysis.min_count)``).
        evaluation, fairness: with ``evaluation.groups``, the last step keeps each row's
            group labels beside the data and takes the group columns out of the features,
            ``[fairness] method = "reweigh"`` resamples each site's training rows
            and ``"thresholds"`` sets aside the rows its thresholds are fitted on
            (:func:`~consortium.data.groups.apply_group_options`).

    Raises:
        DataError: for an unknown data set, a partition the data set cannot use, or anything
            the loader raises (missing files, columns, impossible partitions ...).
        MissingExtraError: for Parquet without ``pyarrow``.
    """
    dataset = _load_named(cfg, seed=seed, min_count=min_count)
    if cfg.validation:
        from consortium.data.validation import validation_split

        # evaluate on a validation split carved out of the training rows, never the test split
        dataset = validation_split(dataset, fraction=cfg.validation, seed=seed)
    if evaluation is not None and evaluation.groups:
        from consortium.data.groups import apply_group_options

        # last: group labels kept aside (and their columns out of x), then reweighing
        dataset = apply_group_options(
            dataset, cfg, seed=seed, groups=evaluation.groups, bands=evaluation.bands,
            as_features=evaluation.group_features,
            reweigh_by=fairness.column if fairness is not None and "reweigh" in fairness.method
            else "",
            fit_by=fairness.column if fairness is not None and "thresholds" in fairness.method
            else "",
            fit_fraction=fairness.fit_fraction if fairness is not None else 0.0,
        )
    return dataset


def _load_named(cfg: DataConfig, *, seed: int, min_count: int) -> FederatedDataset:
    """The data set ``cfg.dataset`` as its loader builds it (see :func:`load_dataset`)."""
    name = cfg.dataset
    if name not in DATASETS:
        raise DataError(
            f"unknown data set {name!r}; expected one of {', '.join(repr(d) for d in DATASETS)}"
        )
    if cfg.partition not in PARTITIONS:
        raise DataError(
            f"unknown partition {cfg.partition!r}; expected one of "
            f"{', '.join(repr(p) for p in PARTITIONS)}"
        )
    if name in _SITED:
        _check_natural(cfg)
    if cfg.harmonize and name not in ("csv", "parquet"):
        raise DataError(
            f"data.harmonize applies to your own csv or parquet files, not to {name!r}; "
            "remove it (set it to \"\")"
        )
    if (cfg.impute, cfg.impute_categorical) != ("mean", "indicator") and name not in _TABLES:
        raise DataError(
            f"data.impute / data.impute_categorical apply to tables with missing values "
            f"(heart-disease, csv, parquet), not to {name!r}; remove them"
        )
    if name == "heart-disease":
        from consortium.data.heart_disease import load_heart_disease

        return load_heart_disease(seed=seed, test_fraction=cfg.test_fraction, impute=cfg.impute,
                                  impute_categorical=cfg.impute_categorical)
    if name == "synthetic":
        from consortium.data.synthetic import load_synthetic

        return load_synthetic(
            alpha=cfg.alpha,
            beta=cfg.beta,
            num_clients=cfg.clients,
            seed=seed,
            samples_per_client=cfg.samples_per_client,
            test_fraction=cfg.test_fraction,
        )
    if name in ("csv", "parquet"):
        from consortium.data.files import load_csv, load_parquet

        load = load_csv if name == "csv" else load_parquet
        return load(
            path=cfg.path,
            target=cfg.target,
            seed=seed,
            site_column=cfg.site_column,
            test_fraction=cfg.test_fraction,
            harmonize=cfg.harmonize or None,
            impute=cfg.impute,
            impute_categorical=cfg.impute_categorical,
            min_count=min_count,
        )
    from consortium.data.sklearn_sets import load_breast_cancer, load_digits

    load_sk = load_digits if name == "digits" else load_breast_cancer
    return load_sk(
        num_clients=cfg.clients,
        seed=seed,
        partition=cfg.partition,
        alpha=cfg.alpha,
        shards_per_client=cfg.shards_per_client,
        quantity_sigma=cfg.quantity_sigma,
        test_fraction=cfg.test_fraction,
        server_test_fraction=cfg.server_test_fraction,
    )


def _check_natural(cfg: DataConfig) -> None:
    why = {
        "heart-disease": "its clients are the four real hospitals that collected it",
        "synthetic": "each client's data are generated from that client's own model",
        "csv": "its clients are your files (or the values of data.site_column)",
        "parquet": "its clients are your files (or the values of data.site_column)",
    }[cfg.dataset]
    if cfg.partition != "natural":
        raise DataError(
            f"data.partition = {cfg.partition!r} does not apply to {cfg.dataset!r}: {why}. "
            'Set data.partition = "natural" (the only allowed value), or use digits or '
            "breast-cancer to study re-partitioned data"
        )
    if cfg.server_test_fraction > 0:
        raise DataError(
            f"data.server_test_fraction = {cfg.server_test_fraction} does not apply to "
            f"{cfg.dataset!r}, which has no server-side test set; set it to 0 (each client "
            "keeps its own test split)"
        )
