"""Pack per-client numpy arrays into a FederatedDataset whose splits share one tensor each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from consortium.data.base import FederatedDataset, PackedClients, Split
from consortium.errors import DataError

__all__ = ["ClientArrays", "assemble", "assemble_packed", "to_split"]


@dataclass(frozen=True)
class ClientArrays:
    """One client's data as numpy arrays, before they become tensors."""

    client_id: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def to_split(x: np.ndarray, y: np.ndarray) -> Split:
    """A :class:`Split` with ``float32`` features and ``int64`` labels."""
    return Split(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
    )


def assemble(
    name: str,
    clients: Sequence[ClientArrays],
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    server_test: Split | None = None,
    feature_names: Sequence[str] | None = None,
    citation: str = "",
    notes: dict[str, str] | None = None,
) -> FederatedDataset:
    """Build a :class:`FederatedDataset` in which every client's train (and test) split is a
    slice of one contiguous tensor, so thousands of clients cost one allocation, not thousands.
    """
    if not clients:
        raise DataError(f"data set {name!r} has no clients")
    train = to_split(
        _stack([c.x_train for c in clients], input_shape),
        np.concatenate([c.y_train for c in clients]),
    )
    test = to_split(
        _stack([c.x_test for c in clients], input_shape),
        np.concatenate([c.y_test for c in clients]),
    )
    def offsets(sizes: list[int]) -> torch.Tensor:
        return torch.cumsum(torch.tensor([0, *sizes], dtype=torch.int64), 0)

    out = PackedClients(
        [c.client_id for c in clients],
        train=train,
        test=test,
        train_offsets=offsets([len(c.y_train) for c in clients]),
        test_offsets=offsets([len(c.y_test) for c in clients]),
    )
    return FederatedDataset(
        name=name,
        clients=out,
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        server_test=server_test,
        feature_names=tuple(feature_names) if feature_names is not None else None,
        citation=citation,
        notes=dict(notes or {}),
    )


def assemble_packed(
    name: str,
    client_ids: Sequence[str],
    *,
    x_train: np.ndarray,
    y_train: np.ndarray,
    train_offsets: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    test_offsets: np.ndarray,
    num_classes: int,
    input_shape: tuple[int, ...],
    feature_names: Sequence[str] | None = None,
    notes: dict[str, str] | None = None,
) -> FederatedDataset:
    """A :class:`FederatedDataset` from arrays that are packed already (client ``i`` owns rows
    ``offsets[i]:offsets[i+1]``): no per-client arrays, and no copy of ``float32`` features."""
    if not len(client_ids):
        raise DataError(f"data set {name!r} has no clients")
    out = PackedClients(
        client_ids,
        train=to_split(x_train, y_train),
        test=to_split(x_test, y_test),
        train_offsets=torch.from_numpy(np.asarray(train_offsets, dtype=np.int64)),
        test_offsets=torch.from_numpy(np.asarray(test_offsets, dtype=np.int64)),
    )
    return FederatedDataset(
        name=name,
        clients=out,
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        feature_names=tuple(feature_names) if feature_names is not None else None,
        notes=dict(notes or {}),
    )


def _stack(parts: list[np.ndarray], input_shape: tuple[int, ...]) -> np.ndarray:
    # Empty test splits may arrive as (0,) arrays; give them the right trailing shape.
    shaped = [p.reshape((len(p), *input_shape)) for p in parts]
    return np.concatenate(shaped).astype(np.float32, copy=False)
