"""ClientPool: every simulated client, built on demand from one packed data set."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from consortium.aggregation.base import Pipeline
from consortium.algorithms.base import Algorithm
from consortium.client.app import SiteClient
from consortium.client.state import ClientStateStore
from consortium.client.training import LocalTraining
from consortium.data.base import PackedClients
from consortium.privacy.policy import SitePolicy

__all__ = ["ClientPool"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ClientPool(Mapping[str, SiteClient]):
    """Client id → :class:`SiteClient`, made when looked up, so 10,000 clients cost no more
    than their packed data. Batched executors read the shared parts (data, algorithm,
    settings) from here directly."""

    def __init__(
        self,
        packed: PackedClients,
        *,
        model_factory: Callable[[], torch.nn.Module],
        algorithm: Algorithm,
        pipeline: Pipeline,
        settings: LocalTraining,
        loss_fn: LossFn,
        num_classes: int,
        state: ClientStateStore,
        policies: Mapping[str, SitePolicy] | None = None,
    ) -> None:
        self.packed = packed
        self.model_factory = model_factory
        self.algorithm = algorithm
        self.pipeline = pipeline
        self.settings = settings
        self.loss_fn = loss_fn
        self.num_classes = num_classes
        self.state = state
        self.policies = dict(policies or {})
        self.sessions: dict[str, dict[str, Any]] = {}
        """Client id -> interactive stages' scratch (see ``SiteClient.session``)."""
        self._test_sizes = packed.test_sizes().tolist()

    def __getitem__(self, client_id: str) -> SiteClient:
        return SiteClient(
            client_id, self.packed[client_id], model_factory=self.model_factory,
            algorithm=self.algorithm, pipeline=self.pipeline, settings=self.settings,
            loss_fn=self.loss_fn, num_classes=self.num_classes, state=self.state,
            policy=self.policy(client_id), sessions=self.sessions,
        )

    def grow(self, packed: PackedClients) -> None:
        """Serve ``packed`` from now on: every client of this pool and more (a deployment's
        roster grew between rounds: deploy/roster.py). Clients already here keep their state.

        Raises:
            ValueError: ``packed`` lacks one of this pool's clients.
        """
        have = set(packed.client_ids)
        lost = [c for c in self.packed.client_ids if c not in have]
        if lost:
            raise ValueError(f"a grown pool must keep every client; {lost} are missing")
        self.packed = packed
        self._test_sizes = packed.test_sizes().tolist()

    def policy(self, client_id: str) -> SitePolicy | None:
        """The site's own policy (``"*"`` is the default for sites without one)."""
        return self.policies.get(client_id, self.policies.get("*"))

    def __iter__(self) -> Iterator[str]:
        return iter(self.packed.client_ids)

    def __len__(self) -> int:
        return len(self.packed)

    def test_size(self, client_id: str) -> int:
        return int(self._test_sizes[self.packed.index(client_id)])
