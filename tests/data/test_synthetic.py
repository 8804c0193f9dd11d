"""Tests for FedProx's Synthetic(alpha, beta) generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consortium.data.synthetic import load_synthetic
from consortium.errors import DataError


def _all_x(ds, client: str) -> torch.Tensor:
    c = ds.clients[client]
    return torch.cat([c.train.x, c.test.x]).double()


def test_shapes_and_fixed_sizes() -> None:
    ds = load_synthetic(
        alpha=0.5, beta=0.5, num_clients=5, seed=0, samples_per_client=40, test_fraction=0.25
    )
    assert ds.input_shape == (60,) and ds.num_classes == 10
    assert ds.client_ids == [f"client-{k}" for k in range(5)]
    assert ds.server_test is None
    for c in ds.clients.values():
        assert (len(c.train), len(c.test)) == (30, 10)
        assert c.train.x.dtype == torch.float32 and c.train.y.dtype == torch.int64
        assert int(c.train.y.min()) >= 0 and int(c.train.y.max()) <= 9


def test_default_sizes_are_lognormal_plus_50() -> None:
    ds = load_synthetic(alpha=0.0, beta=0.0, num_clients=20, seed=0, test_fraction=0.25)
    sizes = np.array([len(c.train) + len(c.test) for c in ds.clients.values()])
    assert sizes.min() >= 50
    assert len(set(sizes.tolist())) > 10  # sizes vary from client to client


def test_seeded_and_independent_of_the_number_of_clients() -> None:
    a = load_synthetic(alpha=1, beta=1, num_clients=3, seed=4, samples_per_client=20)
    b = load_synthetic(alpha=1, beta=1, num_clients=6, seed=4, samples_per_client=20)
    c = load_synthetic(alpha=1, beta=1, num_clients=3, seed=5, samples_per_client=20)
    for k in range(3):
        assert torch.equal(_all_x(a, f"client-{k}"), _all_x(b, f"client-{k}"))
    assert not torch.equal(_all_x(a, "client-0"), _all_x(c, "client-0"))


def test_feature_variance_follows_the_diagonal_covariance() -> None:
    ds = load_synthetic(alpha=0, beta=0, num_clients=1, seed=0, samples_per_client=4000)
    var = _all_x(ds, "client-0").var(dim=0).numpy()
    j = np.arange(1, 61)
    np.testing.assert_allclose(var, j**-1.2, rtol=0.1)


def test_labels_come_from_a_linear_model() -> None:
    """Within one client, y = argmax(W x + b): a linear classifier predicts held-out labels."""
    from sklearn.svm import LinearSVC

    ds = load_synthetic(alpha=1, beta=1, num_clients=2, seed=0, samples_per_client=2000)
    for c in ds.clients.values():
        y_test = c.test.y.numpy()
        majority = np.bincount(y_test).max() / len(y_test)
        clf = LinearSVC(C=100, max_iter=20000).fit(c.train.x.numpy(), c.train.y.numpy())
        accuracy = clf.score(c.test.x.numpy(), y_test)
        # Labels are skewed (as in the paper); a linear model still beats the majority class.
        assert accuracy >= 0.9
        assert accuracy >= majority + 0.15


def test_beta_controls_how_far_apart_the_clients_inputs_are() -> None:
    def spread(beta: float) -> float:
        ds = load_synthetic(alpha=0, beta=beta, num_clients=30, seed=0, samples_per_client=20)
        means = [_all_x(ds, cid).mean().item() for cid in ds.client_ids]
        return float(np.std(means))

    # beta = 0: a client's mean feature value averages 60 draws of N(0, 1), std ~ 0.13;
    # beta = 3: it is dominated by B_k ~ N(0, 3).
    assert spread(0.0) < 0.4
    assert spread(3.0) > 1.5


def test_errors() -> None:
    with pytest.raises(DataError, match="alpha >= 0 and beta >= 0"):
        load_synthetic(alpha=-1, beta=0, num_clients=2, seed=0)
    with pytest.raises(DataError, match="at least 1 client"):
        load_synthetic(alpha=0, beta=0, num_clients=0, seed=0)
    with pytest.raises(DataError, match="samples_per_client must be >= 0"):
        load_synthetic(alpha=0, beta=0, num_clients=2, seed=0, samples_per_client=-5)


def _digest(ds) -> str:
    import hashlib

    h = hashlib.sha256()
    for cid in ds.client_ids:
        c = ds.clients[cid]
        for split in (c.train, c.test):
            h.update(split.x.numpy().tobytes())
            h.update(split.y.numpy().tobytes())
    return h.hexdigest()[:16]


def test_the_generated_numbers_are_pinned() -> None:
    """Every client's examples, bit for bit, as the per-client generator made them before it
    was packed directly into float32 (a 10,000-client set loads twice as fast): the digests
    were taken from the earlier implementation; a change to them changes every seeded run."""
    assert _digest(load_synthetic(alpha=1.0, beta=1.0, num_clients=40, seed=7)) == "1636cd64d287c952"
    assert _digest(
        load_synthetic(alpha=0.5, beta=0.0, num_clients=5, seed=0, samples_per_client=30)
    ) == "1a31d48487c7f821"


def test_packed_offsets_give_each_client_its_own_rows() -> None:
    ds = load_synthetic(alpha=0.5, beta=0.5, num_clients=4, seed=1, samples_per_client=20)
    assert ds.citation.startswith("Li, T.") and ds.notes == {"alpha": "0.5", "beta": "0.5"}
    # clients differ in their generating model: their rows are not shared or shifted
    firsts = [ds.clients[cid].train.x[0] for cid in ds.client_ids]
    assert all(not torch.equal(a, b) for a, b in zip(firsts, firsts[1:], strict=False))
    assert sum(len(ds.clients[cid].test) for cid in ds.client_ids) == 4 * 5
