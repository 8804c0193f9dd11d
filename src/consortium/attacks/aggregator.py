"""``AttackedAggregator``: in simulation, a model attack rewrites the malicious rows before aggregation."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from consortium.aggregation.base import (
    Aggregator,
    RoundContext,
    StageState,
    WrapsAggregator,
)
from consortium.attacks.base import ModelAttack
from consortium.seeds import derive_seed
from consortium.types import Layout, Update

__all__ = ["AttackedAggregator"]


class AttackedAggregator(WrapsAggregator):
    """Wraps any aggregator; the round's malicious clients send what ``attack`` makes of their updates.

    Each round it stacks the updates to ``[n, d]`` (so it is a buffered aggregator and needs
    individual updates: it cannot sit behind secure aggregation), asks ``attack`` for the
    malicious rows, and hands the updates, with only those deltas replaced (weights, metrics
    and extras kept), to ``inner``: as a list if ``inner`` is buffered, one by one through
    ``start``/``accumulate``/``finalize`` if it streams. The aggregate's ``info`` gets
    ``{"attack": name, "attackers": [ids of this round's malicious clients]}``.

    Randomness (the Gaussian attack) comes from ``derive_seed(seed, "attack", round)``.
    The attack runs after the client halves of the pipeline, so malicious clients skip
    client-side clipping, as a real attacker would; server-side defences still apply.
    """

    def __init__(
        self, inner: Aggregator, attack: ModelAttack, malicious_ids: Iterable[str], *, seed: int
    ) -> None:
        self.inner = inner
        self.attack = attack
        self.malicious = frozenset(malicious_ids)
        self.seed = seed

    @property
    def name(self) -> str:
        return f"{self.inner.name}[{self.attack.name} attack]"

    @property
    def linear(self) -> bool:
        return bool(getattr(self.inner, "linear", False))

    @property
    def stateful(self) -> bool:
        """Whether the wrapped rule keeps state across rounds (centered clipping)."""
        return self.inner_stateful

    def init(self, layout: Layout) -> StageState:
        inner: Any = self.inner
        return inner.init(layout) if self.stateful else {}

    def aggregate(
        self, updates: list[Update], *, ctx: RoundContext, state: StageState | None = None
    ) -> Any:
        """The inner aggregate of the poisoned updates; ``(aggregate, state)`` for a stateful
        inner rule (then ``state`` is its state)."""
        attackers = [u.client_id for u in updates if u.client_id in self.malicious]
        if attackers:
            updates = self._poison(updates, ctx)
        new_state = None
        if self.stateful:
            inner_rule: Any = self.inner
            agg, new_state = inner_rule.aggregate(updates, ctx=ctx, state=state)
        elif hasattr(self.inner, "aggregate"):
            agg = self.inner.aggregate(updates, ctx=ctx)
        else:
            inner: Any = self.inner
            acc = inner.start(ctx.layout)
            for u in updates:
                acc = inner.accumulate(acc, u)
            agg = inner.finalize(acc)
        agg.info = {**agg.info, "attack": self.attack.name, "attackers": attackers}
        return (agg, new_state) if self.stateful else agg

    def _poison(self, updates: list[Update], ctx: RoundContext) -> list[Update]:
        mask = torch.tensor([u.client_id in self.malicious for u in updates], dtype=torch.bool)
        honest = torch.stack([u.delta for u in updates])
        weights = torch.tensor([float(u.weight) for u in updates], dtype=torch.float64)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "attack", ctx.round))
        poisoned = self.attack(honest, mask, weights=weights, generator=generator)
        return [
            dataclasses.replace(u, delta=poisoned[i]) if bool(mask[i]) else u
            for i, u in enumerate(updates)
        ]
