"""Federated data: the data set type, built-in data sets, partitioners and file sources."""

from __future__ import annotations

from consortium.data import partition, preprocess
from consortium.data.base import ClientData, FederatedDataset, Split
from consortium.data.files import load_csv, load_parquet
from consortium.data.heart_disease import load_heart_disease
from consortium.data.registry import DATASETS, PARTITIONS, load_dataset
from consortium.data.sklearn_sets import load_breast_cancer, load_digits
from consortium.data.synthetic import load_synthetic

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "ClientData",
    "FederatedDataset",
    "Split",
    "load_breast_cancer",
    "load_csv",
    "load_dataset",
    "load_digits",
    "load_heart_disease",
    "load_parquet",
    "load_synthetic",
    "partition",
    "preprocess",
]
