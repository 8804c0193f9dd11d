"""Shared fixtures: small federated data sets built in memory."""

from __future__ import annotations

import pytest
import torch

from consortium.data.base import ClientData, FederatedDataset, Split


def make_toy(num_clients: int = 4, *, n_train: int = 60, n_test: int = 20, d: int = 5, seed: int = 0,
             sizes: list[int] | None = None) -> FederatedDataset:
    """Binary labels from a linear rule, each client's features shifted a little (non-IID)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)

    def split(n: int, shift: float) -> Split:
        x = torch.randn(n, d, generator=g) + shift
        return Split(x, ((x - shift) @ w > 0).long())

    clients = {}
    for i in range(num_clients):
        n = sizes[i] if sizes else n_train
        clients[f"c{i}"] = ClientData(split(n, 0.3 * i), split(n_test, 0.3 * i))
    return FederatedDataset("toy", clients, 2, (d,))


@pytest.fixture
def toy() -> FederatedDataset:
    return make_toy()
