"""The validation split: each client's training split gives up a seeded, stratified share to tune on."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from consortium.data._rng import generator
from consortium.data.base import FederatedDataset, PackedClients, Split
from consortium.data.holdout import holdout
from consortium.errors import DataError

__all__ = ["validation_split"]


def validation_split(dataset: FederatedDataset, *, fraction: float, seed: int) -> FederatedDataset:
    """Carve a validation split out of every client's training split, and evaluate on it.

    Each client holds out ``fraction`` of its *training* rows, stratified by label and seeded
    by the run ``seed`` and the client's id (a stream of its own, so the train/test split and
    every other draw stay as they were; :func:`~consortium.data.holdout.holdout` rounds the
    size, at least one row, never all). The returned data set's clients train on the rest and
    take the validation rows as their ``test`` split: every evaluation of a run (the global
    model, personalised models, the local-only and pooled baselines) then reads the
    validation split, and the test split is not evaluated at all — so hyperparameters can be
    chosen without ever looking at it. A server-side test set (``server_test``, digits and
    breast-cancer) is dropped too, for the same reason. ``fraction = 0`` returns ``dataset``
    itself.

    Preprocessing (standardisation, imputation) was fitted by the loader on the whole
    training split, validation rows included; it reads no labels, so no label leaks.

    Args:
        dataset: the loaded data set (its clients' ``train`` and ``test`` splits).
        fraction: the share of each client's training rows to hold out, in ``[0, 1)``.
        seed: the run seed.

    Returns:
        A data set whose clients hold ``train`` = training rows minus validation rows and
        ``test`` = validation rows (packed), with ``server_test = None`` and
        ``notes["evaluated_on"] = "validation"``.

    Raises:
        DataError: ``fraction`` is outside ``[0, 1)``, or a client has fewer than 2 training
            rows (it could not keep one to train on and give one to validate on).
    """
    if not 0 <= fraction < 1:
        raise DataError(
            f"data.validation = {fraction!r} is not allowed: expected the share of each "
            "client's training rows to validate on, in [0, 1) (0 = off, evaluate on the test split)"
        )
    if fraction == 0:
        return dataset
    packed = dataset.packed()
    sizes = packed.train_sizes().tolist()
    labels = packed.train.y.numpy()
    keep_parts: list[np.ndarray] = []
    held_parts: list[np.ndarray] = []
    start = 0
    for cid, n in zip(packed.client_ids, sizes):
        if n < 2:
            raise DataError(
                f"client {cid!r} of {dataset.name!r} has {n} training row(s), too few to keep one "
                f"to train on and hold one out for validation (data.validation = {fraction:g}); "
                "set data.validation = 0, or give every client at least 2 training rows (fewer "
                "clients, a larger alpha, a smaller data.test_fraction)"
            )
        keep, held = holdout(
            labels[start:start + n], fraction=fraction, rng=generator(seed, "validation", cid)
        )
        keep_parts.append(keep + start)
        held_parts.append(held + start)
        start += n
    keep_all = torch.from_numpy(np.concatenate(keep_parts))
    held_all = torch.from_numpy(np.concatenate(held_parts))
    clients = PackedClients(
        packed.client_ids,
        train=Split(packed.train.x[keep_all], packed.train.y[keep_all]),
        test=Split(packed.train.x[held_all], packed.train.y[held_all]),
        train_offsets=_offsets([len(k) for k in keep_parts]),
        test_offsets=_offsets([len(h) for h in held_parts]),
    )
    return dataclasses.replace(
        dataset, clients=clients, server_test=None,
        notes={**dataset.notes, "evaluated_on": "validation"},
    )


def _offsets(sizes: list[int]) -> torch.Tensor:
    return torch.cumsum(torch.tensor([0, *sizes], dtype=torch.int64), 0)
