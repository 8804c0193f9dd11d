"""Personal parameters (a shared body, a head each client keeps) and the algorithms on them:
FedPer and FedRep.

The seam: :class:`PersonalLayers` names the parameters that stay with each client
(``personalization.local_layers`` prefixes, or ``local_count`` final layers) and resolves them
into a bool mask over the flat layout (:func:`personal_mask`). Each client keeps its own values
of those coordinates in its client state (only them: memory is the head's size times the
clients, never a full model per client), starts local training from the global model with
its own head (the global initial head the first time), stores the trained head back and sends
exact zeros for it. The server's step never moves the personal coordinates of the global copy
(``server_step`` zeroes them and ``federation.build_frozen`` keeps them bit-identical through
server-side noise, as for frozen parameters).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from consortium.aggregation.base import Aggregate, ExtraSpec, RoundContext, StageState
from consortium.algorithms.base import LocalResult, TrainContext, train_with
from consortium.client.training import LocalTerms, LocalTraining, Phase
from consortium.errors import ConfigError
from consortium.types import Layout, Parameters, Update

__all__ = ["STATE_KEY", "FedPer", "FedRep", "PersonalLayers", "personal_layers", "personal_mask"]

STATE_KEY = "personal"
"""The client-state entry holding a client's personal coordinates (in mask order)."""


def personal_layers(names: Sequence[str], *, layers: Sequence[str] = (), count: int = 0) -> list[str]:
    """Which of the parameter ``names`` (a model's, in order) are personal: those ``layers``
    select by prefix (a full name such as ``"3.weight"`` or a submodule such as ``"3"`` or
    ``"head"``), or, with ``count``, every parameter of the last ``count`` layers (a layer: the
    module that owns a parameter, in the model's order). Neither given: the final layer.

    Raises:
        ConfigError: both given; a prefix that matches no parameter; a count that leaves no
            layer shared; prefixes that select every parameter.
    """
    names = list(names)
    if layers and count:
        raise ConfigError(
            "personalization.local_layers and personalization.local_count are both set; set "
            "only one (names of the personal layers, or how many final layers are personal)"
        )
    if layers:
        def selects(prefix: str, name: str) -> bool:
            return name == prefix or name.startswith(prefix + ".")

        unknown = [p for p in layers if not any(selects(p, n) for n in names)]
        if unknown:
            shown = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
            raise ConfigError(
                f"personalization.local_layers names {unknown}, which match no parameter of the "
                f"model; use a parameter name or the name of a submodule, from: {shown}"
            )
        chosen = [n for n in names if any(selects(p, n) for p in layers)]
        if len(chosen) == len(names):
            raise ConfigError(
                f"personalization.local_layers = {list(layers)} makes every parameter personal, "
                "so nothing is shared: leave at least the first layer out"
            )
        return chosen
    count = count or 1
    owners = list(dict.fromkeys(_owner(n) for n in names))
    if len(owners) < 2:
        raise ConfigError(
            "a personalised algorithm needs a model of at least two layers (a shared body and a "
            f"personal head), but this one has a single layer ({', '.join(names)}); use a "
            'deeper model (model.name = "mlp")'
        )
    if not 1 <= count < len(owners):
        raise ConfigError(
            f"personalization.local_count = {count} is not allowed for this model: it has "
            f"{len(owners)} layers with parameters ({', '.join(owners)}) and at least one must "
            f"stay shared; expected 1 to {len(owners) - 1}"
        )
    last = set(owners[-count:])
    return [n for n in names if _owner(n) in last]


def _owner(name: str) -> str:
    """The module that owns parameter ``name`` (``"3"`` for ``"3.weight"``; ``""`` at the root)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


@functools.lru_cache(maxsize=32)
def _cached_mask(specs: tuple[tuple[str, int], ...], layers: tuple[str, ...], count: int) -> torch.Tensor:
    chosen = set(personal_layers([n for n, _ in specs], layers=layers, count=count))
    return torch.cat([torch.full((n,), name in chosen, dtype=torch.bool) for name, n in specs])


def personal_mask(layout: Layout, *, layers: Sequence[str] = (), count: int = 0) -> torch.Tensor:
    """Bool vector of ``layout.size``, ``True`` at the personal coordinates (see
    :func:`personal_layers`). The result is cached and shared: do not modify it in place.

    Raises:
        ConfigError: as :func:`personal_layers`.
    """
    specs = tuple((s.name, s.numel) for s in layout.specs)
    return _cached_mask(specs, tuple(layers), count)


@dataclass(frozen=True)
class PersonalLayers:
    """Which parameters each client keeps for itself, and how its state holds them.

    Attributes:
        layers: parameter-name prefixes (``personalization.local_layers``).
        count: how many final layers (``personalization.local_count``); with neither, the
            final layer.
    """

    layers: tuple[str, ...] = ()
    count: int = 0

    def mask(self, layout: Layout) -> torch.Tensor:
        """The personal coordinates of ``layout`` (:func:`personal_mask`)."""
        return personal_mask(layout, layers=self.layers, count=self.count)

    def start(self, params: Parameters, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The client's own model as a flat vector: ``params`` with the client's personal
        values (the global ones until it has trained)."""
        own = state.get(STATE_KEY)
        if own is None:
            return params.vector
        vector = params.vector.clone()
        vector[self.mask(params.layout)] = own
        return vector

    def keep(self, params: Parameters, delta: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Store the trained personal values (``global + delta`` there) in ``state`` and return
        ``delta`` with exact zeros at the personal coordinates (what the client sends)."""
        mask = self.mask(params.layout)
        state[STATE_KEY] = (params.vector[mask] + delta[mask]).clone()
        return delta.masked_fill(mask, 0.0)

    def own(self, params: Parameters, state: Mapping[str, torch.Tensor]) -> Parameters:
        """The client's own model: the global shared part and its personal part."""
        return params.replace(self.start(params, state))


@dataclass(frozen=True)
class _Personal:
    """What FedPer and FedRep share: no server state, no extras, zeros for the head."""

    personal: PersonalLayers = field(default_factory=PersonalLayers)

    def init_server(self, layout: Layout) -> StageState:
        self.personal.mask(layout)  # a bad local_layers fails before round 1
        return {}

    def make_payload(self, state: StageState) -> dict[str, torch.Tensor]:
        return {}

    def expected_extras(
        self, layout: Layout, settings: LocalTraining, max_weight: float
    ) -> dict[str, ExtraSpec]:
        """None: the update is the shared part's delta (zeros at the personal coordinates)."""
        return {}

    def personal_mask(self, layout: Layout) -> torch.Tensor:
        """Where the personal coordinates are (the server keeps them out of its step)."""
        return self.personal.mask(layout)

    def own_parameters(self, params: Parameters, state: Mapping[str, torch.Tensor]) -> Parameters:
        """A client's own model (evaluation): global shared part, its personal head."""
        return self.personal.own(params, state)

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        delta = self.personal.keep(ctx.global_params, result.delta, ctx.client_state)
        return Update(
            ctx.client_id, delta, float(result.examples),
            metrics={"train_loss": result.mean_loss, "steps": float(result.steps)},
        )

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        # Zero: the personal part of the global copy never moves, whatever reached it
        # (server-side noise, a site that sent non-zeros).
        return aggregate.delta.masked_fill(self.personal.mask(ctx.layout), 0.0), state


@dataclass(frozen=True)
class FedPer(_Personal):
    """FedPer: a shared body trained by federated averaging, a personal head per client,
    trained jointly with the body in each client's local steps.

    Arivazhagan, Aggarwal, Singh, Choudhary. "Federated Learning with Personalization
    Layers", arXiv:1912.00818, 2019. Each client starts local training from the global body
    and its own head, runs local SGD on both, keeps the head and sends the body's delta; the
    server averages the bodies (sample-weighted, as FedAvg).
    """

    name: str = "fedper"

    def check_settings(self, settings: LocalTraining) -> None:
        pass

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        return LocalTerms(start=self.personal.start(ctx.global_params, ctx.client_state))

    def train(self, ctx: TrainContext) -> Update:
        return train_with(self, ctx)


@dataclass(frozen=True)
class FedRep(_Personal):
    """FedRep: alternating local updates — the personal head with the body fixed, then the
    shared body (representation) with the head fixed; only the body is sent.

    Collins, Hassani, Mokhtari, Shakkottai. "Exploiting Shared Representations for
    Personalized Federated Learning", ICML 2021, Algorithm 1: each round a client runs
    ``head_epochs`` epochs of SGD on its head from the received body, then the local
    epochs (``algorithm.local_epochs``) on the body with the new head, on one stream of
    mini-batches; the server averages the bodies.

    Attributes:
        head_epochs: epochs on the head each round (with fixed local steps ``S``:
            ``head_epochs · S`` steps).
    """

    name: str = "fedrep"
    head_epochs: int = 1

    def __post_init__(self) -> None:
        if self.head_epochs < 1:
            raise ConfigError(
                f"personalization.head_epochs = {self.head_epochs} is not allowed: expected an "
                "integer >= 1 (FedRep trains the head before the body every round)"
            )

    def check_settings(self, settings: LocalTraining) -> None:
        """Raise :class:`ConfigError` under local DP-SGD (not available in phases yet)."""
        if settings.local_dp:
            raise ConfigError(
                "fedrep trains head and body in turn, which local DP-SGD does not support yet "
                "(its per-example clipping spans every trainable parameter); use "
                'algorithm.name = "fedper" or privacy.mode = "central"'
            )

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        head = self.personal.mask(ctx.global_params.layout)
        return LocalTerms(
            start=self.personal.start(ctx.global_params, ctx.client_state),
            phases=(Phase(head, self.head_epochs), Phase(~head)),
        )

    def train(self, ctx: TrainContext) -> Update:
        return train_with(self, ctx)
