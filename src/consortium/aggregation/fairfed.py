"""FairFed: aggregation weights that move towards the sites whose fairness matches the federation's.

Ezzeldin, Yan, He, Ferrara, Avestimehr, "FairFed: Enabling Group Fairness in Federated
Learning", AAAI 2023, Algorithm 1. Each round, before the sites train, every site of the round
measures a group-fairness metric of the current global model on its own training rows, ``F_k``,
and sends its per-group confusion counts, from whose sum the server computes the same metric
over the round's sites, ``F_g``. With ``Δ_k = |F_g − F_k|`` the weights move as

    ω̄_k = max(0, ω_k − β (Δ_k − mean_{i in round} Δ_i)),    ω_k ← ω̄_k / Σ_i ω̄_i,

starting from ``ω_k = n_k / n`` (training rows), and the round's updates are averaged with the
weights ``ω_k`` in place of ``n_k``: a site whose local gap is far from the global one (its data
pull the model away from the federation's fairness) loses weight, one close to it gains.

Choices of this implementation, where the paper leaves room or differs:

- ``F`` is the equalised-odds gap used everywhere in consortium (Hardt, Price, Srebro 2016: the
  larger of the TPR and FPR spreads between groups, :mod:`consortium.server.groups`), the
  metric ``evaluation.groups`` reports; the paper's experiments use the signed equal-opportunity
  difference (TPR only) or statistical-parity difference.
- ``F_g`` pools the confusion counts of the round's sites (the paper's full participation makes
  that every site); weights of sites not in the round stay as they are, then all are
  normalised. A site whose rows leave its local gap undefined (one group only, or a group
  without positives and negatives) keeps its weight and is left out of the mean.
- β is ``fairness.beta``, 1 by default as in the paper's experiments. β = 0 never moves a weight,
  and the updates then reach the inner aggregator as the very same objects: FedAvg bit for bit.
- In a simulation the server computes each site's counts from the site's own rows and kept
  group labels (what the site would compute and send); the weights need every single update,
  so secure aggregation and central DP are refused (``consortium.config``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from consortium.aggregation.base import (
    Aggregate,
    Aggregator,
    RoundContext,
    StageState,
    WrapsAggregator,
)
from consortium.errors import ConfigError
from consortium.types import Layout, Parameters, Update

__all__ = ["FairFedWeights", "TrainingGaps", "fairfed_step", "fairfed_weights"]

Gaps = Callable[[Parameters | None, Sequence[str]],
               tuple["float | None", dict[str, "float | None"]]]
"""``(global params, the round's clients) -> (F_g, {client: F_k})``; the params are None where
no round loop gave them (unit tests of the pipeline)."""


def fairfed_step(
    omega: Mapping[str, float], local: Mapping[str, float | None], global_gap: float | None,
    *, beta: float,
) -> dict[str, float]:
    """One FairFed weight update (Ezzeldin et al. 2023, Algorithm 1): ``omega`` (every
    client's weight) moved by ``β (Δ_k − mean Δ)`` for the clients in ``local`` with a
    defined gap, clipped at 0 and normalised over every client. Unchanged when ``β = 0``,
    ``global_gap`` is undefined, no local gap is, or every weight would be 0."""
    deltas = {k: abs(global_gap - g) for k, g in local.items()
              if g is not None and global_gap is not None}
    if beta == 0 or not deltas:
        return dict(omega)
    mean = sum(deltas.values()) / len(deltas)
    moved = {k: max(0.0, w - beta * (deltas[k] - mean)) if k in deltas else w
             for k, w in omega.items()}
    total = sum(moved.values())
    if not total > 0:
        return dict(omega)
    return {k: w / total for k, w in moved.items()}


@dataclasses.dataclass(frozen=True)
class FairFedWeights(WrapsAggregator):
    """Average each round's updates with FairFed's weights, then hand them to ``inner``.

    ``clients`` and ``sizes`` (training rows) fix the order of the state's ``omega`` vector
    and its start ``n_k / n``; ``gaps`` measures ``F_g`` and every ``F_k`` of the round's
    global model (:class:`TrainingGaps` in a simulation). Each update's weight is scaled by
    ``ω_k / ω_k⁰`` (so a FedAvg weight ``n_k`` becomes ``n · ω_k``); a factor of exactly 1
    leaves the update object itself. State (checkpointed): ``{"omega": float32 tensor (the pipeline's state contract)}``, plus
    ``"inner"`` when ``inner`` keeps state. Info: ``fairfed_gap`` (``F_g``) and
    ``fairfed_weights`` ({client: ω_k}) after the update.
    """

    inner: Aggregator
    clients: tuple[str, ...]
    sizes: tuple[float, ...]
    gaps: Gaps
    beta: float = 1.0

    @property
    def name(self) -> str:
        return f"fairfed(β={self.beta:g}) → {self.inner.name}"

    @property
    def stateful(self) -> bool:
        return True

    def initial(self) -> dict[str, float]:
        """ω⁰: each client's share of the training rows (as the float32 state holds it, so
        an unmoved weight scales its update by exactly 1)."""
        n = sum(self.sizes)
        shares = torch.tensor([s / n for s in self.sizes], dtype=torch.float32).tolist()
        return dict(zip(self.clients, shares))

    def init(self, layout: Layout) -> StageState:
        w0 = self.initial()
        state: dict[str, Any] = {
            "omega": torch.tensor([w0[c] for c in self.clients], dtype=torch.float32)}
        if self.inner_stateful:
            state["inner"] = self.inner.init(layout)  # type: ignore[attr-defined]
        return state

    def aggregate(
        self, updates: list[Update], *, ctx: RoundContext, state: StageState | None = None
    ) -> tuple[Aggregate, StageState]:
        """The inner aggregate of the reweighted updates and the new state."""
        state = dict(state) if state else dict(self.init(ctx.layout))
        omega = dict(zip(self.clients, (float(w) for w in state["omega"].tolist())))
        info: dict[str, Any] = {}
        if self.beta != 0:  # β = 0: FedAvg's weights untouched (and no evaluation)
            ids = [u.client_id for u in updates]
            global_gap, local = self.gaps(ctx.global_params, ids)
            omega = fairfed_step(omega, local, global_gap, beta=self.beta)
            info = {"fairfed_gap": global_gap,
                    "fairfed_weights": {c: float(f"{omega[c]:.6g}") for c in sorted(ids)}}
            state["omega"] = torch.tensor([omega[c] for c in self.clients], dtype=torch.float32)
        w0 = self.initial()
        weighted = []
        for u in updates:
            factor = omega[u.client_id] / w0[u.client_id]
            weighted.append(u if factor == 1.0 else dataclasses.replace(u, weight=u.weight * factor))
        inner: Any = self.inner
        agg: Aggregate
        if self.inner_stateful:
            agg, state["inner"] = inner.aggregate(weighted, ctx=ctx, state=state.get("inner"))
        elif hasattr(inner, "aggregate"):
            agg = inner.aggregate(weighted, ctx=ctx)
        else:
            acc = inner.start(ctx.layout)
            for u in weighted:
                acc = inner.accumulate(acc, u)
            agg = inner.finalize(acc)
        agg.info = {**agg.info, **info}
        return agg, state


@dataclasses.dataclass(frozen=True)
class TrainingGaps:
    """``F_g`` and each ``F_k`` of a simulation: the global model's equalised-odds gap on every
    round client's training rows by the group column ``column`` (the labels each site keeps
    aside), per site and pooled over the round's sites (:func:`consortium.server.groups.
    summarize`). ``module`` is a scratch copy of the model the parameters are loaded into."""

    dataset: Any
    module: torch.nn.Module
    column: str

    def __call__(
        self, params: Parameters | None, ids: Sequence[str]
    ) -> tuple[float | None, dict[str, float | None]]:
        from consortium.server.groups import predict, row_labels, summarize

        if params is None:
            raise ConfigError("FairFed needs the round's global model (RoundContext."
                              "global_params); run it through the server loop")
        params.load_into(self.module)
        self.module.eval()
        preds: dict[str, Any] = {}
        labels: dict[str, Any] = {}
        for cid in ids:
            train = self.dataset.clients[cid].train
            if len(train) == 0:
                continue
            pred, _ = predict(self.module, train.x, binary=True)
            preds[cid] = (train.y.numpy(), pred, None)
            labels[cid] = row_labels(self.dataset, cid, self.column, "train",
                                     train.x.numpy().reshape(len(train.x), -1), len(pred))
        if not preds:
            return None, {}
        s = summarize(preds, labels, binary=True)
        return (s["overall"]["gaps"]["equalized_odds"],
                {cid: site["gaps"]["equalized_odds"] for cid, site in s["sites"].items()})


def fairfed_weights(
    aggregator: Aggregator, dataset: Any, factory: Callable[[], torch.nn.Module], *,
    column: str, beta: float,
) -> FairFedWeights:
    """``aggregator`` behind FairFed's weights for a simulation of ``dataset`` (binary task,
    group labels of ``column`` kept aside at each site).

    Raises:
        ConfigError: a task that is not binary, or β negative or not finite.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ConfigError(f"fairness.beta = {beta!r} is not allowed: expected a finite number "
                          ">= 0 (FairFed's step on the aggregation weights; 1 in the paper)")
    if int(dataset.num_classes) != 2:
        raise ConfigError(
            f'fairness.method = "fairfed" measures the equalised-odds gap of a binary task; '
            f"this data set has {dataset.num_classes} classes: choose a binary data set or "
            'another fairness.method')
    with torch.random.fork_rng(devices=[]):  # the run's torch RNG stays as it was
        module = factory()
    sizes = tuple(float(len(dataset.clients[c].train)) for c in dataset.client_ids)
    return FairFedWeights(aggregator, tuple(dataset.client_ids), sizes,
                          TrainingGaps(dataset, module, column), beta=float(beta))
