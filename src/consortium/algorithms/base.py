"""The Algorithm contract: what a client optimises locally and what the server does with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from consortium.aggregation.base import Aggregate, ExtraSpec, RoundContext, StageState
from consortium.client.training import LocalTerms, LocalTraining, local_steps, train_locally
from consortium.data.base import Split
from consortium.types import Layout, Parameters, Update

__all__ = ["Algorithm", "LocalResult", "PlainServer", "TrainContext", "local_update", "train_with"]


@dataclass
class TrainContext:
    """Everything a client's local training sees.

    Attributes:
        module: the model, already holding the global parameters.
        global_params: the global parameters as received.
        data: the client's training split.
        settings: local optimiser settings.
        loss_fn: the loss.
        seed: seed for this client and round.
        work: fraction of the planned steps to do (stragglers do less).
        payload: tensors the algorithm's server side sent (``make_payload``).
        client_state: this client's persistent state (mutable; survives rounds).
        randomness: the site's own CSPRNG for privacy-relevant draws (DP-SGD noise and
            batches); ``None`` draws them from ``seed`` (simulation only).
    """

    client_id: str
    module: torch.nn.Module
    global_params: Parameters
    data: Split
    settings: LocalTraining
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    seed: int
    work: float = 1.0
    payload: dict[str, torch.Tensor] = field(default_factory=dict)
    client_state: dict[str, torch.Tensor] = field(default_factory=dict)
    randomness: Any = None


@dataclass(frozen=True)
class LocalResult:
    delta: torch.Tensor
    steps: int
    mean_loss: float
    examples: int


@runtime_checkable
class Algorithm(Protocol):
    """A federated optimisation algorithm, split into its client and server halves.

    The client half is two pure steps around the local loop, so that every executor
    (sequential, vectorised, Ray, remote) runs the same algorithm: ``local_terms`` says what
    to add to each local gradient, the executor runs local SGD, and ``make_update`` turns the
    result into what the client sends (updating the client's state if the algorithm has any).

    Optional: ``expected_extras(layout, settings, max_weight) -> {name: ExtraSpec}``, the
    extras ``make_update`` sends for a client of at most ``max_weight`` examples (see
    :class:`~consortium.aggregation.base.ExtraSpec`); a deployed server rejects any other.
    Without it the server checks the extras' values but not their names and shapes.

    Other optional parts, each found with ``getattr`` where the run is assembled
    (:mod:`consortium.federation`) or summarised:

    - ``personal_mask(layout) -> bool tensor``: coordinates each client keeps for itself
      (FedPer, FedRep, FedBN); the server never moves them and a deployed site never uploads
      them.
    - ``own_parameters(params, client_state) -> Parameters``: a client's own model, for
      personalised evaluation (every personalised algorithm).
    - ``check_model(module)``: raise :class:`ConfigError` for a model the algorithm cannot
      train (APFL and batch norm), before round 1.
    - ``with_model(init, factory, seed) -> Algorithm``: the algorithm with server state that
      starts from models (IFCA's clusters).
    - ``summary(state, client_states) -> dict``: what ``summary.json`` reports of the
      algorithm under its name (IFCA's cluster sizes).
    """

    @property
    def name(self) -> str: ...

    def init_server(self, layout: Layout) -> StageState:
        """The server's algorithm state (for example SCAFFOLD's control variate)."""
        ...

    def make_payload(self, state: StageState) -> dict[str, torch.Tensor]:
        """Tensors sent to every client with the task."""
        ...

    def check_settings(self, settings: LocalTraining) -> None:
        """Raise :class:`ConfigError` if the local settings do not suit the algorithm."""
        ...

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        """What to add to each local gradient (nothing for FedAvg)."""
        ...

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        """Build the client's update from its local result (may update ``ctx.client_state``)."""
        ...

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        """Turn the round's aggregate into the delta handed to the server optimiser."""
        ...


def local_update(ctx: TrainContext, terms: LocalTerms | None = None) -> LocalResult:
    """Run local training from the global model (or ``terms.start``) and return
    ``local − global``."""
    steps = local_steps(len(ctx.data), ctx.settings, ctx.work, terms)
    if terms is not None and terms.start is not None:
        ctx.global_params.replace(terms.start).load_into(ctx.module)
    stats = train_locally(
        ctx.module, ctx.data, ctx.settings, loss_fn=ctx.loss_fn, seed=ctx.seed, steps=steps,
        terms=terms, randomness=ctx.randomness,
    )
    local = Parameters.from_module(ctx.module).vector.cpu()  # from executor.device: no-op on CPU
    return LocalResult(
        delta=local - ctx.global_params.vector,
        steps=stats.steps,
        mean_loss=stats.mean_loss,
        examples=stats.examples,
    )


def train_with(algorithm: Algorithm, ctx: TrainContext) -> Update:
    """One client's whole local half in this process: terms, local SGD, update."""
    algorithm.check_settings(ctx.settings)
    return algorithm.make_update(ctx, local_update(ctx, algorithm.local_terms(ctx)))


class PlainServer:
    """The parts of an algorithm whose server keeps no state, sends no payload and steps by the
    plain aggregate, and whose update is the delta and the weight alone (no extras): FedAvg,
    FedProx, Ditto and APFL take all of them, q-FFL some. An algorithm overrides what it does
    differently."""

    def init_server(self, layout: Layout) -> StageState:
        return {}

    def make_payload(self, state: StageState) -> dict[str, torch.Tensor]:
        return {}

    def check_settings(self, settings: LocalTraining) -> None:
        pass

    def expected_extras(
        self, layout: Layout, settings: LocalTraining, max_weight: float
    ) -> dict[str, ExtraSpec]:
        """None: the update is the delta and the weight."""
        return {}

    def train(self, ctx: TrainContext) -> Update:
        return train_with(self, ctx)  # type: ignore[arg-type]

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        return aggregate.delta, state
