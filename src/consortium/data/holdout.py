"""Seeded, stratified hold-out: split one site's samples into a kept part and a held-out part."""

from __future__ import annotations

import numpy as np

from consortium.errors import DataError

__all__ = ["holdout"]


def holdout(
    labels: np.ndarray, *, fraction: float, rng: np.random.Generator, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of the samples, in the same class proportions as the whole.

    The held-out size is ``round(n · fraction)``, but at least 1 when ``n >= 2`` and never all
    of them, so the kept part (the training data) is never empty. With ``stratify`` each class
    contributes in proportion to its size (largest remainder, ties broken at random), as
    scikit-learn's stratified ``train_test_split`` does.

    Args:
        labels: one integer label per sample.
        fraction: the share to hold out, in ``(0, 1)``.
        rng: the source of randomness.
        stratify: keep class proportions; ``False`` draws the held-out part uniformly.

    Returns:
        ``(kept, held_out)``: sorted ``int64`` index arrays that together hold each sample once.

    Raises:
        DataError: if ``fraction`` is not in ``(0, 1)``.
    """
    if not 0 < fraction < 1:
        raise DataError(f"a hold-out fraction must be in (0, 1), found {fraction}")
    labels = np.asarray(labels)
    n = labels.shape[0]
    n_out = min(max(int(np.floor(n * fraction + 0.5)), 1), n - 1) if n >= 2 else 0
    if not stratify:
        chosen = rng.permutation(n)[:n_out]
    else:
        inverse, counts = _class_of(labels)
        quotas = counts * (n_out / max(n, 1))
        per_class = np.floor(quotas).astype(np.int64)
        remainder = quotas - per_class
        # Largest remainder first; a random key breaks ties so no class is always favoured.
        order = np.lexsort((rng.random(len(counts)), -remainder))
        per_class[order[: n_out - int(per_class.sum())]] += 1
        # each class's sample indices, ascending (a stable sort groups them by class)
        grouped = np.argsort(inverse, kind="stable")
        ends = np.cumsum(counts).tolist()
        chosen = np.concatenate(
            [
                rng.permutation(grouped[a:b])[:k]
                for a, b, k in zip([0, *ends], ends, per_class.tolist())
            ]
            or [np.empty(0, dtype=np.int64)]
        )
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    assert int(mask.sum()) == n_out
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def _class_of(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's class number (classes in sorted order) and each class's size, as
    ``np.unique(labels, return_inverse=True, return_counts=True)`` gives them; by counting
    when the labels are small non-negative integers (the common case, and 10,000 sites split
    one after another make it worth it)."""
    if labels.dtype.kind in "iu" and labels.size and labels.min() >= 0 and labels.max() < 1024:
        sizes = np.bincount(labels)
        present = sizes > 0
        return (np.cumsum(present) - 1)[labels], sizes[present]
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts
