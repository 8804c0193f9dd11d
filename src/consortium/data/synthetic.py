"""FedProx's Synthetic(alpha, beta): per-client softmax-regression data with tunable skew."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from consortium.data._assemble import assemble_packed
from consortium.data._rng import generator
from consortium.data.base import FederatedDataset
from consortium.data.holdout import holdout
from consortium.errors import DataError

__all__ = ["CITATION", "NUM_CLASSES", "NUM_FEATURES", "load_synthetic"]

NUM_FEATURES = 60
NUM_CLASSES = 10
CITATION = (
    "Li, T., Sahu, A. K., Zaheer, M., Sanjabi, M., Talwalkar, A., Smith, V. (2020). Federated "
    "Optimization in Heterogeneous Networks. MLSys 2020, §5.1 (Synthetic(alpha, beta))."
)

# Diagonal of the feature covariance, Σ_jj = j^(-1.2) for j = 1 … 60.
_FEATURE_STD = np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** -0.6


def load_synthetic(
    *,
    alpha: float,
    beta: float,
    num_clients: int,
    seed: int,
    samples_per_client: int = 0,
    test_fraction: float = 0.25,
    sizes: Sequence[int] | None = None,
) -> FederatedDataset:
    """Synthetic(alpha, beta) of Li et al. 2020, "Federated Optimization in Heterogeneous
    Networks" (FedProx), §5.1: 60 features, 10 classes, one generating model per client.

    For client ``k``: ``u_k ~ N(0, alpha)``, ``W_k ~ N(u_k, 1)`` (10 × 60),
    ``b_k ~ N(u_k, 1)``; ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` (60-dim); each example
    ``x ~ N(v_k, Σ)`` with ``Σ`` diagonal, ``Σ_jj = j^(-1.2)``, and ``y = argmax(W_k x + b_k)``
    (the argmax of the softmax). ``alpha`` controls how much the clients' models differ,
    ``beta`` how much their inputs differ. As in the paper's reference code
    (``generate_niid.py``), ``alpha`` and ``beta`` are standard deviations, and client sizes
    are ``floor(LogNormal(4, 2)) + 50``, a power-law-like spread; ``samples_per_client > 0``
    fixes every client's size instead. Note that the lognormal tail is heavy: with many
    clients, some get tens of thousands of examples.

    Features are not standardised (as in the paper). There is no server test set: each client
    has its own distribution, so there is no single population to sample one from. Each
    client holds out ``test_fraction`` of its examples (stratified) as its test split.

    Every client's data comes from its own generator, derived from ``seed`` and its index, so
    client ``k`` is the same whatever ``num_clients`` is.

    Args:
        alpha: model heterogeneity, ``>= 0``.
        beta: input heterogeneity, ``>= 0``.
        num_clients: number of clients (the paper uses 30).
        seed: the run seed.
        samples_per_client: a fixed size per client, or 0 for the paper's lognormal sizes.
        sizes: explicit per-client sizes (length ``num_clients``), overriding both.
        test_fraction: the share of each client's examples held out for testing.

    Raises:
        DataError: if an argument is out of range.
    """
    if alpha < 0 or beta < 0:
        raise DataError(
            f"synthetic data need alpha >= 0 and beta >= 0, found alpha={alpha}, beta={beta}; "
            "the paper uses (0, 0), (0.5, 0.5) and (1, 1)"
        )
    if num_clients < 1:
        raise DataError(f"synthetic data need at least 1 client, found {num_clients}")
    if samples_per_client < 0:
        raise DataError(
            f"samples_per_client must be >= 0 (0 = the paper's lognormal sizes), found "
            f"{samples_per_client}"
        )
    if sizes is not None and (len(sizes) != num_clients or min(sizes) < 1):
        raise DataError(
            f"sizes must give a size >= 1 for each of the {num_clients} clients, found "
            f"{len(sizes)} sizes"
        )
    parts: dict[str, list[np.ndarray]] = {"x_train": [], "y_train": [], "x_test": [], "y_test": []}
    for k in range(num_clients):
        rng = generator(seed, "synthetic", k)
        size = int(sizes[k]) if sizes is not None else samples_per_client
        x, y = _client_examples(rng, alpha=alpha, beta=beta, size=size)
        keep, held = holdout(y, fraction=test_fraction, rng=rng)
        # float32 per client (as assemble would round them), so the packed arrays are built
        # from half the bytes: a 10,000-client set holds millions of examples
        x32 = x.astype(np.float32)
        for name, part in (("x_train", x32[keep]), ("y_train", y[keep]),
                           ("x_test", x32[held]), ("y_test", y[held])):
            parts[name].append(part)
    packed = {name: np.concatenate(arrays) for name, arrays in parts.items()}
    dataset = assemble_packed(
        "synthetic",
        [f"client-{k}" for k in range(num_clients)],
        **packed,
        train_offsets=np.cumsum([0, *(len(y) for y in parts["y_train"])]),
        test_offsets=np.cumsum([0, *(len(y) for y in parts["y_test"])]),
        num_classes=NUM_CLASSES,
        input_shape=(NUM_FEATURES,),
        feature_names=tuple(f"x{j}" for j in range(1, NUM_FEATURES + 1)),
        notes={"alpha": str(alpha), "beta": str(beta)},
    )
    return replace(dataset, citation=CITATION)


def _client_examples(
    rng: np.random.Generator, *, alpha: float, beta: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One client's size, generating model and examples."""
    n = size if size > 0 else int(rng.lognormal(4.0, 2.0)) + 50
    u = rng.normal(0.0, alpha)
    big_b = rng.normal(0.0, beta)
    v = rng.normal(big_b, 1.0, NUM_FEATURES)
    w = rng.normal(u, 1.0, (NUM_CLASSES, NUM_FEATURES))
    b = rng.normal(u, 1.0, NUM_CLASSES)
    x = rng.standard_normal((n, NUM_FEATURES))
    x *= _FEATURE_STD  # in place: v + Σ^½ z, the same numbers without two temporaries
    x += v
    y = np.argmax(x @ w.T + b, axis=1).astype(np.int64)
    return x, y
