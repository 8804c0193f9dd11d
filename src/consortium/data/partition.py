"""Partitioners: split one data set's sample indices across simulated clients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from consortium.errors import DataError

__all__ = ["PARTITIONS", "dirichlet", "iid", "natural", "partition_by", "quantity", "shards"]

PARTITIONS: dict[str, str] = {
    "natural": "the data's own sites (hospitals, files, a site column); nothing is re-split",
    "iid": "shuffle and deal out equal shares (McMahan et al. 2017)",
    "dirichlet": "label skew: each class spread over clients by Dirichlet(alpha) (Hsu et al. 2019)",
    "shards": "pathological non-IID: label-sorted shards, shards_per_client each "
    "(McMahan et al. 2017)",
    "quantity": "quantity skew: lognormal(0, quantity_sigma) client sizes (Li et al. 2022)",
}

# A request that needs more draws than this is close to impossible (a tiny alpha, few classes,
# many clients); a clear error beats an endless loop.
_DIRICHLET_ATTEMPTS = 1000


def iid(n: int, num_clients: int, *, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``n`` samples and deal them into ``num_clients`` shares of equal size (± 1).

    The IID baseline of FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of
    Deep Networks from Decentralized Data").

    Returns:
        One sorted ``int64`` index array per client; together they hold ``0 … n-1`` once.

    Raises:
        DataError: if ``num_clients < 1`` or there are fewer samples than clients.
    """
    _check_clients(n, num_clients, per_client=1, method="iid")
    order = rng.permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label skew: the samples of each class are spread over clients in Dirichlet proportions.

    For every class ``c`` a vector ``p_c ~ Dir(alpha · 1)`` over the clients decides which share
    of the class each client receives (Hsu et al. 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification"; this per-class form
    is the one of Yurochkin et al. 2019 and of Li et al. 2022's NIID-Bench). Small ``alpha``
    gives each client few classes; large ``alpha`` approaches IID. As in NIID-Bench, a client
    that already holds its fair share ``n / num_clients`` gets no more of later classes, which
    keeps client sizes from drifting far apart. The whole draw is repeated until every client
    has at least ``min_size`` samples.

    Args:
        labels: one integer label per sample.
        num_clients: number of clients.
        alpha: the Dirichlet concentration, ``> 0``.
        rng: the source of randomness.
        min_size: the fewest samples any client may get.

    Returns:
        One sorted ``int64`` index array per client; together they hold every sample once.

    Raises:
        DataError: if the arguments are out of range, if ``num_clients · min_size`` exceeds the
            number of samples, or if no draw in 1000 gives every client ``min_size`` samples.
    """
    labels = _labels(labels)
    n = labels.shape[0]
    if not alpha > 0:
        raise DataError(f"dirichlet partition needs alpha > 0, found alpha={alpha}; use e.g. 0.5")
    if min_size < 0:
        raise DataError(f"dirichlet partition needs min_size >= 0, found {min_size}")
    _check_clients(n, num_clients, per_client=max(min_size, 1), method="dirichlet")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for members in by_class:
            members = rng.permutation(members)
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * (sizes < n / num_clients)
            # Before the last class at least one client is below the fair share, so p has
            # positive mass, unless the Dirichlet draw underflowed to zero for those clients.
            total = p.sum()
            p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p)[:-1] * len(members)).astype(np.int64)
            for k, piece in enumerate(np.split(members, cuts)):
                parts[k].append(piece)
                sizes[k] += len(piece)
        if sizes.min() >= min_size:
            out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
            assert sum(len(p) for p in out) == n
            return out
    raise DataError(
        f"dirichlet partition with alpha={alpha} could not give each of {num_clients} clients "
        f"at least {min_size} of the {n} samples in {_DIRICHLET_ATTEMPTS} draws; use a larger "
        "alpha or fewer clients"
    )


def shards(
    labels: np.ndarray, num_clients: int, *, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID: sort by label, cut into shards, give each client a few shards.

    The samples are sorted by label (ties in random order), cut into
    ``num_clients · shards_per_client`` shards of equal size (± 1) and the shards are dealt
    out at random, ``shards_per_client`` to each client (McMahan et al. 2017,
    "Communication-Efficient Learning of Deep Networks from Decentralized Data", §3).

    A client sees at most ``shards_per_client`` labels when every class size is a multiple of
    the shard size. Otherwise, as in the paper's MNIST split, a shard can straddle the boundary
    between two classes and a client may see a few more.

    Returns:
        One sorted ``int64`` index array per client; together they hold every sample once.

    Raises:
        DataError: if there are fewer samples than shards or the arguments are out of range.
    """
    labels = _labels(labels)
    n = labels.shape[0]
    if shards_per_client < 1:
        raise DataError(f"shards partition needs shards_per_client >= 1, found {shards_per_client}")
    _check_clients(n, num_clients, per_client=shards_per_client, method="shards")
    shuffled = rng.permutation(n)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_clients * shards_per_client)
    dealt = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def quantity(
    n: int, num_clients: int, *, sigma: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Quantity skew: IID samples, but client sizes proportional to lognormal draws.

    Client weights ``w_k ~ LogNormal(0, sigma)``; after one sample per client, the rest are
    shared in proportion to the weights (largest remainder), so every client has at least one
    sample and ``sigma = 0`` gives equal sizes. Quantity skew is one of the non-IID settings of
    Li et al. 2022 ("Federated Learning on Non-IID Data Silos: An Experimental Study"), who
    draw the shares from a Dirichlet instead; the lognormal form used here (as in FedLab's
    unbalanced splits and the client sizes of FedProx's synthetic data) has one spread
    parameter and a heavy tail of large clients.

    Returns:
        One sorted ``int64`` index array per client; together they hold ``0 … n-1`` once.

    Raises:
        DataError: if there are fewer samples than clients or ``sigma < 0``.
    """
    if not sigma >= 0:
        raise DataError(f"quantity partition needs sigma >= 0, found sigma={sigma}; use e.g. 1.0")
    _check_clients(n, num_clients, per_client=1, method="quantity")
    weights = rng.lognormal(mean=0.0, sigma=sigma, size=num_clients)
    sizes = 1 + _largest_remainder(weights / weights.sum() * (n - num_clients))
    assert sizes.sum() == n
    order = rng.permutation(n)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def natural(groups: Sequence[Any] | np.ndarray) -> list[np.ndarray]:
    """One client per distinct value of ``groups`` (a site, hospital or user column).

    Clients come in the order in which their value first appears, so that
    ``list(dict.fromkeys(groups))`` names them; rows keep their order within a client.

    Returns:
        One sorted ``int64`` index array per distinct value.

    Raises:
        DataError: if ``groups`` is empty.
    """
    values = list(groups.tolist() if isinstance(groups, np.ndarray) else groups)
    if not values:
        raise DataError("natural partition found no rows; the site column is empty")
    rows: dict[Any, list[int]] = {}
    for i, value in enumerate(values):
        rows.setdefault(value, []).append(i)
    return [np.asarray(r, dtype=np.int64) for r in rows.values()]


def partition_by(
    method: str,
    labels: np.ndarray,
    num_clients: int,
    *,
    rng: np.random.Generator,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    sigma: float = 1.0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split samples by the partitioner named ``method`` (a key of :data:`PARTITIONS`).

    ``natural`` is not accepted here: it needs a site column, not labels.

    Raises:
        DataError: for an unknown or unsuitable ``method``, or what the partitioner raises.
    """
    labels = _labels(labels)
    if method == "iid":
        return iid(len(labels), num_clients, rng=rng)
    if method == "dirichlet":
        return dirichlet(labels, num_clients, alpha=alpha, rng=rng, min_size=min_size)
    if method == "shards":
        return shards(labels, num_clients, shards_per_client=shards_per_client, rng=rng)
    if method == "quantity":
        return quantity(len(labels), num_clients, sigma=sigma, rng=rng)
    allowed = ", ".join(repr(m) for m in PARTITIONS if m != "natural")
    raise DataError(f"partition {method!r} cannot split pooled samples; expected one of {allowed}")


def _labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"labels must be a 1-D array, found shape {arr.shape}")
    return arr


def _check_clients(n: int, num_clients: int, *, per_client: int, method: str) -> None:
    if num_clients < 1:
        raise DataError(f"{method} partition needs at least 1 client, found {num_clients}")
    if n < num_clients * per_client:
        what = {"shards": "shards_per_client"}.get(method, "samples per client")
        raise DataError(
            f"{method} partition of {num_clients} clients with {per_client} {what} needs at "
            f"least {num_clients * per_client} samples, found {n}; use at most "
            f"{n // per_client} clients"
        )


def _largest_remainder(quotas: np.ndarray) -> np.ndarray:
    """Round non-negative ``quotas`` to integers with the same (integer) total."""
    base = np.floor(quotas).astype(np.int64)
    short = round(float(quotas.sum())) - int(base.sum())
    base[np.argsort(-(quotas - base), kind="stable")[:short]] += 1
    return base
