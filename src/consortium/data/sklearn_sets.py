"""Small data sets bundled with scikit-learn (digits, breast cancer), split across clients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from consortium.data._assemble import ClientArrays, assemble, to_split
from consortium.data._rng import generator
from consortium.data.base import FederatedDataset
from consortium.data.holdout import holdout
from consortium.data.partition import PARTITIONS, partition_by
from consortium.data.preprocess import Column, encode_sites
from consortium.errors import DataError

__all__ = ["BREAST_CANCER_CITATION", "DIGITS_CITATION", "load_breast_cancer", "load_digits"]

DIGITS_CITATION = (
    "Alpaydin, E., Kaynak, C. (1998). Optical Recognition of Handwritten Digits. UCI Machine "
    "Learning Repository. https://doi.org/10.24432/C50P49 (CC BY 4.0); the 8x8 copy bundled "
    "with scikit-learn."
)
BREAST_CANCER_CITATION = (
    "Wolberg, W., Mangasarian, O., Street, N., Street, W. (1995). Breast Cancer Wisconsin "
    "(Diagnostic). UCI Machine Learning Repository. https://doi.org/10.24432/C5DW2B "
    "(CC BY 4.0); the copy bundled with scikit-learn."
)


@dataclass(frozen=True)
class _Layout:
    """Where each pooled sample went: the server's hold-out and each client's train/test."""

    server_test: np.ndarray
    clients: list[tuple[np.ndarray, np.ndarray]]


def load_digits(
    *,
    num_clients: int,
    seed: int,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    quantity_sigma: float = 1.0,
    test_fraction: float = 0.25,
    server_test_fraction: float = 0.0,
) -> FederatedDataset:
    """scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes) across ``num_clients``.

    Data: Alpaydin and Kaynak (1998), UCI, CC BY 4.0, read from scikit-learn's bundled copy
    (no download). Pixels are scaled from 0-16 to [0, 1]; one example has shape ``(1, 8, 8)``.
    See :func:`load_breast_cancer` for how samples are held out and partitioned.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    layout = _layout(
        "digits",
        y,
        num_clients=num_clients,
        seed=seed,
        partition=partition,
        alpha=alpha,
        shards_per_client=shards_per_client,
        quantity_sigma=quantity_sigma,
        test_fraction=test_fraction,
        server_test_fraction=server_test_fraction,
    )
    clients = [
        ClientArrays(f"client-{k}", x[tr], y[tr], x[te], y[te])
        for k, (tr, te) in enumerate(layout.clients)
    ]
    server = layout.server_test
    return assemble(
        "digits",
        clients,
        num_classes=10,
        input_shape=(1, 8, 8),
        server_test=to_split(x[server], y[server]) if server.size else None,
        citation=DIGITS_CITATION,
        notes={"partition": partition},
    )


def load_breast_cancer(
    *,
    num_clients: int,
    seed: int,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    quantity_sigma: float = 1.0,
    test_fraction: float = 0.25,
    server_test_fraction: float = 0.0,
) -> FederatedDataset:
    """Breast Cancer Wisconsin (Diagnostic): 569 tumours, 30 features, malignant or benign.

    Data: Wolberg, Mangasarian, Street and Street (1995), UCI, CC BY 4.0, read from
    scikit-learn's bundled copy (no download). Label 0 is malignant, 1 benign (scikit-learn's
    coding).

    Samples are placed in three steps, each with its own generator derived from ``seed``:
    when ``server_test_fraction > 0`` that share is first held out (stratified) as the server's
    test set; the rest is split across clients by ``partition`` (``iid``, ``dirichlet`` with
    ``alpha``, ``shards`` with ``shards_per_client`` or ``quantity`` with ``quantity_sigma``;
    see :mod:`consortium.data.partition`); each client then holds out ``test_fraction`` of
    its samples (stratified) as its test split. Features are standardised with federated
    statistics over the clients' training splits (:mod:`consortium.data.preprocess`); the
    server's test set is transformed with the same statistics.

    Raises:
        DataError: for ``partition = "natural"`` (these data have no sites) or an unknown one,
            or when the partition cannot give every client data.
    """
    from sklearn.datasets import load_breast_cancer as sk_load_breast_cancer

    bunch = sk_load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    names = tuple(str(n) for n in bunch.feature_names)
    layout = _layout(
        "breast-cancer",
        y,
        num_clients=num_clients,
        seed=seed,
        partition=partition,
        alpha=alpha,
        shards_per_client=shards_per_client,
        quantity_sigma=quantity_sigma,
        test_fraction=test_fraction,
        server_test_fraction=server_test_fraction,
    )
    encoder, x_trains, x_tests = encode_sites(
        [x[tr] for tr, _ in layout.clients],
        [x[te] for _, te in layout.clients],
        columns=[Column(n, "continuous") for n in names],
    )
    clients = [
        ClientArrays(f"client-{k}", x_trains[k], y[tr], x_tests[k], y[te])
        for k, (tr, te) in enumerate(layout.clients)
    ]
    server = layout.server_test
    return assemble(
        "breast-cancer",
        clients,
        num_classes=2,
        input_shape=(encoder.num_features,),
        server_test=to_split(encoder.transform(x[server]), y[server]) if server.size else None,
        feature_names=encoder.feature_names,
        citation=BREAST_CANCER_CITATION,
        notes={"partition": partition},
    )


def _layout(
    name: str,
    y: np.ndarray,
    *,
    num_clients: int,
    seed: int,
    partition: str,
    alpha: float,
    shards_per_client: int,
    quantity_sigma: float,
    test_fraction: float,
    server_test_fraction: float,
) -> _Layout:
    if partition == "natural" or partition not in PARTITIONS:
        allowed = ", ".join(repr(p) for p in PARTITIONS if p != "natural")
        why = "has no natural sites" if partition == "natural" else "has no partition"
        raise DataError(f"{name} {why} {partition!r}; set data.partition to one of {allowed}")
    if not 0 <= server_test_fraction < 1:
        raise DataError(f"server_test_fraction must be in [0, 1), found {server_test_fraction}")
    pool = np.arange(len(y))
    server = np.empty(0, dtype=np.int64)
    if server_test_fraction > 0:
        pool, server = holdout(
            y, fraction=server_test_fraction, rng=generator(seed, name, "server-test")
        )
    # min_size 2 lets every client keep a test example next to its training data.
    parts = partition_by(
        partition,
        y[pool],
        num_clients,
        rng=generator(seed, name, "partition"),
        alpha=alpha,
        shards_per_client=shards_per_client,
        sigma=quantity_sigma,
        min_size=2,
    )
    clients = []
    for k, part in enumerate(parts):
        members = pool[part]
        tr, te = holdout(y[members], fraction=test_fraction, rng=generator(seed, name, "split", k))
        clients.append((members[tr], members[te]))
    return _Layout(server, clients)
