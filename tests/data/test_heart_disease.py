"""Tests for the UCI Heart Disease loader (four hospitals, federated encoding)."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest
import torch

from consortium.data.base import FederatedDataset
from consortium.data.heart_disease import SITES, load_heart_disease

ROWS = {"cleveland": 303, "hungarian": 294, "switzerland": 123, "va": 200}


@pytest.fixture(scope="module")
def ds() -> FederatedDataset:
    return load_heart_disease(seed=0)


def _raw_labels(site: str) -> np.ndarray:
    text = (files("consortium.data") / "_heart_disease" / SITES[site]).read_text()
    return np.array([int(line.rsplit(",", 1)[1]) > 0 for line in text.split()], dtype=np.int64)


def test_four_hospitals_in_order(ds: FederatedDataset) -> None:
    assert ds.client_ids == ["cleveland", "hungarian", "switzerland", "va"]
    assert ds.name == "heart-disease"
    assert ds.num_classes == 2


def test_920_patients_and_each_hospital_keeps_its_own(ds: FederatedDataset) -> None:
    for site, n in ROWS.items():
        c = ds.clients[site]
        assert len(c.train) + len(c.test) == n
        assert len(c.test) == round(n * 0.25)
    assert sum(len(c.train) + len(c.test) for c in ds.clients.values()) == 920


def test_labels_are_num_greater_than_zero(ds: FederatedDataset) -> None:
    for site in ROWS:
        c = ds.clients[site]
        got = torch.cat([c.train.y, c.test.y]).sum().item()
        assert got == _raw_labels(site).sum()


def test_split_is_stratified(ds: FederatedDataset) -> None:
    for site in ROWS:
        c = ds.clients[site]
        rate = _raw_labels(site).mean()
        n_test = len(c.test)
        # Largest-remainder allocation: within one example of the exact share.
        assert abs(c.test.y.sum().item() - rate * n_test) <= 1


def test_shapes_dtypes_and_names(ds: FederatedDataset) -> None:
    assert ds.input_shape == (32,)
    assert ds.feature_names is not None and len(ds.feature_names) == 32
    assert ds.feature_names[:6] == ("age", "sex", "cp=1", "cp=2", "cp=3", "cp=4")
    assert "thal=7" in ds.feature_names and "chol_missing" in ds.feature_names
    assert "age_missing" not in ds.feature_names  # age is never missing
    for c in ds.clients.values():
        for s in (c.train, c.test):
            assert s.x.dtype == torch.float32 and s.y.dtype == torch.int64
            assert s.x.shape[1:] == (32,)
            assert torch.isfinite(s.x).all()


def test_citation_names_the_investigators_and_licence(ds: FederatedDataset) -> None:
    for name in ("Janosi", "Steinbrunn", "Pfisterer", "Detrano", "UCI", "CC BY 4.0"):
        assert name in ds.citation


def test_zero_cholesterol_is_missing(ds: FederatedDataset) -> None:
    assert ds.feature_names is not None
    j = ds.feature_names.index("chol_missing")
    swiss = ds.clients["switzerland"]
    assert torch.all(torch.cat([swiss.train.x[:, j], swiss.test.x[:, j]]) == 1)
    assert ds.clients["cleveland"].train.x[:, j].sum() == 0


def test_continuous_features_are_standardised_over_the_union_of_train_splits(
    ds: FederatedDataset,
) -> None:
    assert ds.feature_names is not None
    x = ds.pooled_train().x.double()
    for name in ("age", "trestbps", "thalach"):
        col = x[:, ds.feature_names.index(name)]
        assert abs(col.mean().item()) < 1e-5
    # age has no missing values, so its standardised train column has std exactly 1.
    assert x[:, ds.feature_names.index("age")].std(unbiased=False).item() == pytest.approx(1.0)
    # binary and one-hot columns stay 0/1
    for name in ("sex", "cp=1", "thal_missing"):
        assert set(x[:, ds.feature_names.index(name)].unique().tolist()) <= {0.0, 1.0}


def test_client_splits_share_one_tensor(ds: FederatedDataset) -> None:
    ptrs = {c.train.x.untyped_storage().data_ptr() for c in ds.clients.values()}
    assert len(ptrs) == 1


def test_same_seed_same_split_other_seed_other_split(ds: FederatedDataset) -> None:
    again = load_heart_disease(seed=0)
    other = load_heart_disease(seed=1)
    for site in ROWS:
        assert torch.equal(ds.clients[site].test.x, again.clients[site].test.x)
    assert not torch.equal(ds.clients["cleveland"].test.x, other.clients["cleveland"].test.x)


def test_test_fraction_is_used() -> None:
    small = load_heart_disease(seed=0, test_fraction=0.1)
    assert len(small.clients["cleveland"].test) == 30


def test_pooled_logistic_regression_reaches_the_known_accuracy(ds: FederatedDataset) -> None:
    """Guards the encoding: published pooled baselines are about 0.80-0.84 accuracy."""
    from sklearn.linear_model import LogisticRegression

    train = ds.pooled_train()
    x_test = torch.cat([c.test.x for c in ds.clients.values()]).numpy()
    y_test = torch.cat([c.test.y for c in ds.clients.values()]).numpy()
    clf = LogisticRegression(max_iter=2000).fit(train.x.numpy(), train.y.numpy())
    assert clf.score(x_test, y_test) >= 0.75
