"""FederatedDataset: client id → train/test data, plus an optional server-side test set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from consortium.errors import DataError

__all__ = ["ClientData", "FederatedDataset", "Split"]


@dataclass(frozen=True)
class Split:
    """Features ``x`` (float32, ``[n, *input_shape]``) and integer labels ``y`` (int64, ``[n]``)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"features and labels disagree: {self.x.shape[0]} rows of features, "
                f"{self.y.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class ClientData:
    """One site's data: what it trains on and what it evaluates on. Never leaves the site."""

    train: Split
    test: Split


@dataclass(frozen=True)
class FederatedDataset:
    """A federated data set.

    Attributes:
        name: the data set's name (``heart-disease``, ``synthetic`` ...).
        clients: client id → :class:`ClientData`, in a fixed order.
        num_classes: number of label values (labels are ``0 … num_classes-1``).
        input_shape: shape of one example's features (``(d,)`` for tables, ``(c, h, w)`` images).
        server_test: a held-out test set on the server, if the data set has one.
        feature_names: names of the feature columns for tabular data.
        citation: where the data come from, for reports.
    """

    name: str
    clients: Mapping[str, ClientData]
    num_classes: int
    input_shape: tuple[int, ...]
    server_test: Split | None = None
    feature_names: tuple[str, ...] | None = None
    citation: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.clients:
            raise DataError(f"data set {self.name!r} has no clients")
        for cid, data in self.clients.items():
            if len(data.train) == 0:
                raise DataError(
                    f"client {cid!r} of {self.name!r} has no training examples; use fewer "
                    "clients or a larger alpha so that every client gets data"
                )
            for part, split in (("train", data.train), ("test", data.test)):
                if tuple(split.x.shape[1:]) != tuple(self.input_shape):
                    raise DataError(
                        f"client {cid!r} {part} features have shape {tuple(split.x.shape[1:])}, "
                        f"expected {self.input_shape}"
                    )
                if not torch.isfinite(split.x).all():
                    raise DataError(f"client {cid!r} {part} features contain NaN or infinity")

    @property
    def client_ids(self) -> list[str]:
        return list(self.clients)

    def pooled_train(self) -> Split:
        """The union of all clients' training data (only for the *pooled* baseline)."""
        xs = [c.train for c in self.clients.values()]
        return Split(torch.cat([s.x for s in xs]), torch.cat([s.y for s in xs]))
