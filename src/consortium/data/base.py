"""FederatedDataset: client id → train/test data, plus an optional server-side test set."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from consortium.errors import DataError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ClientData", "FederatedDataset", "PackedClients", "Split"]


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


class PackedClients(Mapping[str, ClientData]):
    """Every client's data in one contiguous tensor per split, plus per-client offsets.

    A 10,000-client data set is four tensors and two offset vectors, not 10,000 Python
    objects; a :class:`ClientData` view is made only when one client is looked up. Executors
    that train many clients at once (vectorised, Ray) read the packed tensors directly.

    Attributes:
        train, test: all clients' examples, client after client.
        train_offsets, test_offsets: int64 ``[n_clients + 1]``; client ``i`` owns rows
            ``offsets[i]:offsets[i+1]``.
        client_ids: the ids, in order.
    """

    def __init__(
        self,
        client_ids: Sequence[str],
        *,
        train: Split,
        test: Split,
        train_offsets: torch.Tensor,
        test_offsets: torch.Tensor,
    ) -> None:
        ids = tuple(client_ids)
        if len(set(ids)) != len(ids):
            raise DataError("client ids must be unique")
        for name, offsets, split in (
            ("train", train_offsets, train),
            ("test", test_offsets, test),
        ):
            if offsets.shape != (len(ids) + 1,) or int(offsets[0]) != 0 or int(offsets[-1]) != len(split):
                raise DataError(
                    f"{name} offsets must have {len(ids) + 1} entries from 0 to {len(split)}"
                )
            if bool((offsets[1:] < offsets[:-1]).any()):
                raise DataError(f"{name} offsets must not decrease")
        self.client_ids = ids
        self.train = train
        self.test = test
        self.train_offsets = train_offsets.to(torch.int64)
        self.test_offsets = test_offsets.to(torch.int64)
        self._index = {cid: i for i, cid in enumerate(ids)}

    @classmethod
    def pack(cls, clients: Mapping[str, ClientData]) -> PackedClients:
        """Copy a mapping of client data into packed form."""
        if isinstance(clients, PackedClients):
            return clients
        ids = list(clients)
        trains = [clients[c].train for c in ids]
        tests = [clients[c].test for c in ids]

        def offsets(splits: list[Split]) -> torch.Tensor:
            sizes = torch.tensor([0] + [len(s) for s in splits], dtype=torch.int64)
            return torch.cumsum(sizes, 0)

        def cat(splits: list[Split]) -> Split:
            return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))

        return cls(
            ids, train=cat(trains), test=cat(tests),
            train_offsets=offsets(trains), test_offsets=offsets(tests),
        )

    def index(self, client_id: str) -> int:
        return self._index[client_id]

    def __getitem__(self, client_id: str) -> ClientData:
        i = self._index[client_id]
        a, b = int(self.train_offsets[i]), int(self.train_offsets[i + 1])
        c, d = int(self.test_offsets[i]), int(self.test_offsets[i + 1])
        return ClientData(
            train=Split(self.train.x[a:b], self.train.y[a:b]),
            test=Split(self.test.x[c:d], self.test.y[c:d]),
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.client_ids)

    def __len__(self) -> int:
        return len(self.client_ids)

    def train_sizes(self) -> torch.Tensor:
        return self.train_offsets[1:] - self.train_offsets[:-1]

    def test_sizes(self) -> torch.Tensor:
        return self.test_offsets[1:] - self.test_offsets[:-1]


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
        groups: client id → group column → ``{"train": labels, "test": labels}``, one text
            label per row of that split (``evaluation.groups``, kept beside the data at the
            site by :func:`consortium.data.groups.keep_groups_aside`); empty when none.
        fitting: client id → the rows on which ``[fairness] method = "thresholds"`` fits its
            per-group thresholds (:func:`consortium.data.groups.fitting_split`); empty when none.
    """

    name: str
    clients: Mapping[str, ClientData]
    num_classes: int
    input_shape: tuple[int, ...]
    server_test: Split | None = None
    feature_names: tuple[str, ...] | None = None
    citation: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    groups: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]] = field(default_factory=dict)
    fitting: Mapping[str, Split] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.clients:
            raise DataError(f"data set {self.name!r} has no clients")
        if isinstance(self.clients, PackedClients):
            self._check_packed(self.clients)
            return
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

    def _check_packed(self, packed: PackedClients) -> None:
        empty = (packed.train_sizes() == 0).nonzero()
        if len(empty):
            cid = packed.client_ids[int(empty[0])]
            raise DataError(
                f"client {cid!r} of {self.name!r} has no training examples; use fewer "
                "clients or a larger alpha so that every client gets data"
            )
        for part, split in (("train", packed.train), ("test", packed.test)):
            if tuple(split.x.shape[1:]) != tuple(self.input_shape):
                raise DataError(
                    f"{part} features have shape {tuple(split.x.shape[1:])}, "
                    f"expected {self.input_shape}"
                )
            # a broadcast placeholder (stride 0: one row standing for all, as a deployed server
            # holds) is checked through that one row
            x = split.x[:1] if split.x.dim() and split.x.stride(0) == 0 else split.x
            if not _all_finite(x):
                bad = int((~torch.isfinite(split.x)).reshape(len(split), -1).any(1).nonzero()[0])
                offsets = packed.train_offsets if part == "train" else packed.test_offsets
                cid = packed.client_ids[int(torch.searchsorted(offsets, bad, right=True)) - 1]
                raise DataError(f"client {cid!r} {part} features contain NaN or infinity")

    @property
    def client_ids(self) -> list[str]:
        return list(self.clients)

    def packed(self) -> PackedClients:
        """All clients' data in packed form (no copy if it is packed already)."""
        return PackedClients.pack(self.clients)

    def pooled_train(self) -> Split:
        """The union of all clients' training data (only for the *pooled* baseline)."""
        return self.packed().train


def _all_finite(x: torch.Tensor, rows: int = 1 << 16) -> bool:
    """``torch.isfinite(x).all()``, a block of rows at a time: on the whole tensor it builds
    temporaries (``abs``, two masks) about twice the size of ``x`` (3 GB for a 10-million-row
    table)."""
    return all(bool(torch.isfinite(block).all()) for block in torch.split(x, rows))
