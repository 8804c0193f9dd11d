"""Tests for the scikit-learn bundled data sets (digits, breast cancer) split across clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consortium.data.base import FederatedDataset
from consortium.data.sklearn_sets import load_breast_cancer, load_digits
from consortium.errors import DataError


def _total(ds: FederatedDataset) -> int:
    n = sum(len(c.train) + len(c.test) for c in ds.clients.values())
    return n + (len(ds.server_test) if ds.server_test is not None else 0)


def _all_labels(ds: FederatedDataset, cid: str) -> torch.Tensor:
    c = ds.clients[cid]
    return torch.cat([c.train.y, c.test.y])


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards", "quantity"])
def test_digits_every_partition_keeps_every_image(partition: str) -> None:
    ds = load_digits(num_clients=8, seed=0, partition=partition)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.clients) == 8
    assert _total(ds) == 1797
    x = torch.cat([c.train.x for c in ds.clients.values()])
    assert x.dtype == torch.float32
    assert x.min().item() == 0.0 and x.max().item() == 1.0


def test_digits_dirichlet_is_more_skewed_than_iid() -> None:
    def labels_per_client(partition: str) -> float:
        ds = load_digits(num_clients=10, seed=0, partition=partition, alpha=0.05)
        return float(np.mean([len(_all_labels(ds, cid).unique()) for cid in ds.client_ids]))

    assert labels_per_client("iid") == 10
    assert labels_per_client("dirichlet") < 5


def test_server_test_set_is_held_out_first() -> None:
    ds = load_breast_cancer(num_clients=4, seed=0, server_test_fraction=0.2)
    assert ds.server_test is not None
    assert len(ds.server_test) == round(569 * 0.2)
    assert _total(ds) == 569
    assert load_breast_cancer(num_clients=4, seed=0).server_test is None


def test_breast_cancer_is_standardised_with_client_train_statistics() -> None:
    ds = load_breast_cancer(num_clients=5, seed=1, partition="dirichlet", alpha=1.0)
    assert ds.input_shape == (30,) and ds.num_classes == 2
    assert ds.feature_names is not None and ds.feature_names[0] == "mean radius"
    pooled = ds.pooled_train().x.double()
    # Federated statistics over the client train splits equal the pooled ones.
    np.testing.assert_allclose(pooled.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(pooled.std(0, unbiased=False).numpy(), 1.0, rtol=1e-4)
    assert "Wolberg" in ds.citation


def test_every_client_has_train_and_test_data() -> None:
    ds = load_breast_cancer(num_clients=20, seed=0, partition="dirichlet", alpha=0.3)
    for c in ds.clients.values():
        assert len(c.train) >= 1 and len(c.test) >= 1


def test_seeded() -> None:
    a = load_digits(num_clients=3, seed=2, partition="dirichlet")
    b = load_digits(num_clients=3, seed=2, partition="dirichlet")
    c = load_digits(num_clients=3, seed=3, partition="dirichlet")
    assert all(torch.equal(_all_labels(a, k), _all_labels(b, k)) for k in a.client_ids)
    assert not all(torch.equal(_all_labels(a, k), _all_labels(c, k)) for k in a.client_ids)


def test_natural_partition_is_an_error_naming_the_allowed_ones() -> None:
    with pytest.raises(
        DataError, match="no natural sites.*'iid', 'dirichlet', 'shards', 'quantity'"
    ):
        load_digits(num_clients=3, seed=0, partition="natural")
    with pytest.raises(DataError, match="'bogus'"):
        load_breast_cancer(num_clients=3, seed=0, partition="bogus")


def test_too_many_clients_is_an_error() -> None:
    with pytest.raises(DataError, match="found 569"):
        load_breast_cancer(num_clients=600, seed=0)
