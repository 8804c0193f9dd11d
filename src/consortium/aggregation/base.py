"""The pipeline contract: stages with a client half and a server half, aggregators, server optimisers.

A :class:`Pipeline` is the ordered stages (client halves in order, server halves in reverse,
so that encode/decode and mask/unmask pair up), one :class:`Aggregator` and one
:class:`ServerOptimizer`. State is explicit: ``init`` returns it, every server half returns
the new state, and the round loop keeps it for the checkpoint. See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from consortium.errors import PipelineError
from consortium.types import Layout, Parameters, Update

__all__ = [
    "Aggregate",
    "Aggregator",
    "BufferedAggregator",
    "ClientContext",
    "Exchange",
    "ExtraSpec",
    "Pipeline",
    "RoundContext",
    "ServerOptimizer",
    "Stage",
    "StageState",
    "StreamingAggregator",
    "WrapsAggregator",
    "pipeline",
]

StageState = dict[str, Any]
"""A stage's state: tensors and JSON-able values, checkpointed as they are."""

INDIVIDUAL = "individual_updates"
SUM_ONLY = "sum_only"


Exchange = Callable[[str, str, Mapping[str, Any]], Iterator[tuple[str, Any]]]
"""``exchange(stage_name, phase, {client_id: message})`` yields ``(client_id, reply)`` as the
replies arrive. A client that does not answer (dropped out, failed) is simply missing. The
executor provides it: in simulation the clients answer in this process; over gRPC, at the
sites. A message is handled by the stage's ``respond`` half at the client."""


@dataclass(frozen=True)
class RoundContext:
    """What the server side of a stage may know about the round.

    ``exchange`` lets an interactive part (secure aggregation) run extra message phases with the
    round's clients; it is ``None`` where no client can be reached (e.g. unit tests).
    """

    round: int
    seed: int
    population: int
    sampled: int
    layout: Layout
    expected_clients: float = 0.0
    """Expected cohort size (``q·N`` under Poisson sampling); 0 means ``sampled``."""
    exchange: Exchange | None = field(default=None, compare=False, repr=False)
    global_params: Parameters | None = field(default=None, compare=False, repr=False)
    """The model the round's updates are relative to (FLTrust trains it on its root data)."""

    @property
    def expected(self) -> float:
        return self.expected_clients or float(self.sampled)


@dataclass(frozen=True)
class ClientContext:
    """What the client half of a stage may know: the round, the client and its seed.

    ``session`` is the client's private scratch space for interactive stages (stage name ->
    object), kept where the client runs and never sent: secure aggregation keeps its quantised
    vector and keys there between the training result and the protocol phases.
    """

    round: int
    client_id: str
    seed: int
    session: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    site: Any = field(default=None, compare=False, repr=False)
    """The site's own :class:`~consortium.client.environment.SiteEnvironment` (its private
    randomness, its signing identity, the run it joined, its secure-aggregation minimums), or
    ``None`` in a simulation that draws everything from the task's seed."""
    state: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    """This client's persistent state (the client-state store's entry, the algorithm's
    ``client_state``): what a stage keeps across rounds, e.g. compression's error-feedback
    residual; ``None`` where there is none (unit tests)."""
    layout: Layout | None = field(default=None, compare=False, repr=False)
    """The layout of the vector the client halves transform (the task's parameters, which
    the client loaded into its own model): the tensors' shapes, e.g. for PowerSGD's matrices
    (:mod:`consortium.compression.lowrank`); ``None`` where the caller has none (unit tests)."""


@dataclass
class Aggregate:
    """The combined update of one round.

    Attributes:
        delta: the aggregated delta (for the mean: ``Σ wᵢ Δᵢ / Σ wᵢ``).
        weight: total weight ``Σ wᵢ``.
        count: number of updates combined.
        extras: per-name **sums** of the updates' extras.
        info: what a stage wants recorded this round (flagged clients, clip norm ...).
    """

    delta: torch.Tensor
    weight: float
    count: int
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExtraSpec:
    """What one extra tensor a client sends must be, declared by the code that makes it.

    A deployed server sums the extras of sites it does not trust: an extra of the wrong shape
    broke the round, and a centred bit of -1e6 broke adaptive clipping (issue 13). Algorithms
    declare theirs with ``expected_extras(layout, settings, max_weight)``, stages how their
    client half changes them with ``expected_extras(before, layout)``
    (:meth:`Pipeline.client_extras` folds them), and the server checks every result against
    the declaration (:func:`consortium.deploy.validate.validate_result`).

    Attributes:
        shape: the tensor's exact shape.
        dtype: its dtype.
        low: the smallest value any coordinate may take.
        high: the largest.
        per_weight: ``low`` and ``high`` are per unit of the update's weight (FedNova's
            ``w·a`` is at most ``w`` times the largest ``a``), so a site cannot pair a small
            weight with a large extra.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    low: float = -float("inf")
    high: float = float("inf")
    per_weight: bool = False


@runtime_checkable
class Stage(Protocol):
    """One step of the pipeline.

    Required: ``name``, ``needs``, ``gives`` and ``init(layout) -> state``. Optional halves
    (define the ones the stage has):

    - ``broadcast(state) -> dict``: what the clients need from the server state (sent in the task);
    - ``client(update, payload, ctx) -> Update``: runs on the client, in list order;
    - ``receive(update, state, ctx) -> Update``: runs on the server on each update as it arrives,
      before aggregation, in reverse order (decoding);
    - ``server(aggregate, state, ctx) -> (Aggregate, state)``: runs on the aggregate, reverse order;
    - ``respond(phase, message, ctx) -> reply``: runs on the client for each message an
      interactive part sends through ``RoundContext.exchange`` (``ctx.session`` holds what the
      client half kept);
    - ``expected_extras(before, layout) -> {name: ExtraSpec}``: the extras its client half
      leaves, given those it receives (see :class:`ExtraSpec`); without it, unchanged.

    ``needs`` and ``gives`` are capability names checked when the pipeline is built. A stage
    whose server half treats ``aggregate.delta × aggregate.weight`` as the plain sum of the
    (processed) updates sets ``needs_linear_aggregator = True``; the pipeline then refuses an
    aggregator without ``linear = True`` (the weighted mean and the secure sum are linear; the
    robust rules, but norm bounding with a fixed bound, are not).
    """

    @property
    def name(self) -> str: ...

    @property
    def needs(self) -> frozenset[str]: ...

    @property
    def gives(self) -> frozenset[str]: ...

    def init(self, layout: Layout) -> StageState: ...


class Aggregator(Protocol):
    """Combines the round's updates into one :class:`Aggregate`."""

    @property
    def name(self) -> str: ...

    @property
    def needs(self) -> frozenset[str]: ...


class StreamingAggregator(Aggregator, Protocol):
    """Constant memory: ``start``, ``accumulate`` each update, ``finalize``; works under SecAgg."""

    def start(self, layout: Layout) -> Any: ...

    def accumulate(self, acc: Any, update: Update) -> Any: ...

    def finalize(self, acc: Any) -> Aggregate: ...


class BufferedAggregator(Aggregator, Protocol):
    """Needs every update at once, stacked to an ``[n, d]`` matrix (median, Krum ...).

    A buffered aggregator with state across rounds also has ``init(layout) -> state`` and then
    is called as ``aggregate(updates, ctx=ctx, state=state) -> (Aggregate, new_state)``; the
    pipeline keeps the state and the checkpoint saves it.
    """

    def aggregate(self, updates: list[Update], *, ctx: RoundContext) -> Aggregate: ...


class WrapsAggregator:
    """What a wrapper around another aggregator (``self.inner``) forwards: it needs individual
    updates on top of what ``inner`` needs, and ``inner``'s client checks. Used by the update
    bound, FairFed's weights and the simulated model attacks, each a buffered aggregator that
    hands the (changed) updates on to ``inner``."""

    inner: Any

    @property
    def needs(self) -> frozenset[str]:
        return frozenset(self.inner.needs) | {INDIVIDUAL}

    @property
    def inner_stateful(self) -> bool:
        """Whether ``inner`` keeps state across rounds (centered clipping); a wrapper says so
        with its own ``stateful``, a plain rule by having ``init`` but no ``accumulate``."""
        declared = getattr(self.inner, "stateful", None)
        if declared is not None:
            return bool(declared)
        return not hasattr(self.inner, "accumulate") and hasattr(self.inner, "init")

    def check_clients(self, n: int) -> None:
        """``inner``'s check (a robust rule's f needs enough clients per round)."""
        check = getattr(self.inner, "check_clients", None)
        if check is not None:
            check(n)

    def min_clients(self) -> int:
        own = getattr(self.inner, "min_clients", None)
        return int(own()) if own is not None else 1


class ServerOptimizer(Protocol):
    """Turns the round's aggregated delta into a step of the global model (Reddi et al. 2021)."""

    @property
    def name(self) -> str: ...

    def init(self, layout: Layout) -> StageState: ...

    def step(
        self, params: torch.Tensor, delta: torch.Tensor, state: StageState
    ) -> tuple[torch.Tensor, StageState]: ...


@dataclass(frozen=True)
class PipelineState:
    stages: tuple[StageState, ...]
    optimizer: StageState
    aggregator: StageState = field(default_factory=dict)
    """State of a stateful aggregator (centered clipping's center); empty otherwise."""


class Pipeline:
    """Ordered stages + an aggregator + a server optimiser, validated when built."""

    def __init__(
        self,
        stages: Iterable[Stage] = (),
        *,
        aggregator: Aggregator | None = None,
        optimizer: ServerOptimizer | None = None,
    ) -> None:
        from consortium.aggregation.mean import weighted_mean
        from consortium.aggregation.optimizers import sgd

        self.stages: tuple[Stage, ...] = tuple(stages)
        self.aggregator: Aggregator = aggregator if aggregator is not None else weighted_mean()
        self.optimizer: ServerOptimizer = optimizer if optimizer is not None else sgd(lr=1.0)
        self._validate()

    # -- building -----------------------------------------------------------------------------

    def _validate(self) -> None:
        for stage in self.stages:
            if not isinstance(stage, Stage):
                raise PipelineError(
                    f"{stage!r} is not a pipeline stage: a stage needs name, needs, gives and "
                    "init(layout); aggregators and server optimisers go in their own slots"
                )
        available = {INDIVIDUAL}
        for stage in self.stages:
            missing = set(stage.needs) - available
            if missing:
                raise PipelineError(
                    f"stage {stage.name!r} needs {sorted(missing)}, which no earlier stage gives; "
                    f"put a stage that gives it before {stage.name!r}"
                )
            available |= set(stage.gives)
            if SUM_ONLY in stage.gives:
                available.discard(INDIVIDUAL)
        for stage in self.stages:
            if getattr(stage, "needs_linear_aggregator", False) and not getattr(
                self.aggregator, "linear", False
            ):
                raise PipelineError(
                    f"stage {stage.name!r} calibrates its noise to a sum of clipped updates, "
                    "which one client moves by at most the clip norm; aggregator "
                    f"{self.aggregator.name!r} is not such a sum (one client can move it "
                    "further), so the stated epsilon would not hold. Use the weighted mean "
                    "(or norm-bound with a fixed bound) with central DP, or local DP "
                    "(privacy.mode = \"local\") with a robust rule"
                )
        missing = set(self.aggregator.needs) - available
        if missing:
            hidden = " (a secure-aggregation stage hides individual updates)" if (
                INDIVIDUAL in missing
            ) else ""
            raise PipelineError(
                f"aggregator {self.aggregator.name!r} needs {sorted(missing)}, which the stages "
                f"before it do not give{hidden}; use a streaming aggregator such as "
                "weighted_mean() or remove the stage"
            )
        is_streaming = all(hasattr(self.aggregator, m) for m in ("start", "accumulate", "finalize"))
        if not is_streaming and not hasattr(self.aggregator, "aggregate"):
            raise PipelineError(
                f"{self.aggregator!r} is not an aggregator: it needs start/accumulate/finalize "
                "(streaming) or aggregate(updates) (buffered)"
            )

    @property
    def streaming(self) -> bool:
        return hasattr(self.aggregator, "accumulate")

    @property
    def stateful(self) -> bool:
        """The aggregator keeps state across rounds (``init`` + ``aggregate(..., state=)``);
        a wrapper says so with a ``stateful`` attribute."""
        declared = getattr(self.aggregator, "stateful", None)
        if declared is not None:
            return bool(declared)
        return not self.streaming and hasattr(self.aggregator, "init")

    # -- running ------------------------------------------------------------------------------

    def init(self, layout: Layout) -> PipelineState:
        return PipelineState(
            stages=tuple(s.init(layout) for s in self.stages),
            optimizer=self.optimizer.init(layout),
            aggregator=self.aggregator.init(layout) if self.stateful else {},  # type: ignore[attr-defined]
        )

    def broadcast(self, state: PipelineState) -> tuple[dict[str, Any], ...]:
        """Per-stage payloads the clients need (sent inside the task)."""
        return tuple(
            s.broadcast(st) if hasattr(s, "broadcast") else {}  # type: ignore[attr-defined]
            for s, st in zip(self.stages, state.stages)
        )

    def client(
        self, update: Update, payloads: tuple[Mapping[str, Any], ...], ctx: ClientContext
    ) -> Update:
        """Run the client halves, in order.

        Raises:
            PipelineError: ``payloads`` does not hold one entry per stage (zip would silently
                skip the client halves of the stages without one, a clipping stage among them).
        """
        if len(payloads) != len(self.stages):
            raise PipelineError(
                f"the task carries {len(payloads)} stage payloads but the pipeline has "
                f"{len(self.stages)} stages; send Pipeline.broadcast(state) with the task"
            )
        for stage, payload in zip(self.stages, payloads):
            if hasattr(stage, "client"):
                update = stage.client(update, payload, ctx)  # type: ignore[attr-defined]
        return update

    def aggregate(
        self, updates: Iterable[Update], state: PipelineState, ctx: RoundContext
    ) -> tuple[Aggregate | None, PipelineState]:
        """Decode each update, aggregate, then run the server halves in reverse order.

        Returns ``(None, state)`` when there is no update to aggregate.
        """
        receivers = [
            (s, st) for s, st in reversed(list(zip(self.stages, state.stages))) if hasattr(s, "receive")
        ]

        def received(u: Update) -> Update:
            for s, st in receivers:
                u = s.receive(u, st, ctx)  # type: ignore[attr-defined]
            return u

        agg: Aggregate | None
        aggregator_state = state.aggregator
        if self.streaming:
            acc = None
            n = 0
            for u in updates:
                u = received(u)
                if acc is None:
                    acc = self.aggregator.start(ctx.layout)  # type: ignore[attr-defined]
                acc = self.aggregator.accumulate(acc, u)  # type: ignore[attr-defined]
                n += 1
            agg = self.aggregator.finalize(acc) if n else None  # type: ignore[attr-defined]
        else:
            buffered = [received(u) for u in updates]
            if not buffered:
                agg = None
            elif self.stateful:
                agg, aggregator_state = self.aggregator.aggregate(  # type: ignore[attr-defined]
                    buffered, ctx=ctx, state=state.aggregator
                )
            else:
                agg = self.aggregator.aggregate(buffered, ctx=ctx)  # type: ignore[attr-defined]
        if agg is None:
            return None, state
        new_states = list(state.stages)
        for i in reversed(range(len(self.stages))):
            stage = self.stages[i]
            if hasattr(stage, "server"):
                agg, new_states[i] = stage.server(agg, new_states[i], ctx)  # type: ignore[attr-defined]
        return agg, PipelineState(tuple(new_states), state.optimizer, aggregator_state)

    def step(
        self, params: torch.Tensor, delta: torch.Tensor, state: PipelineState
    ) -> tuple[torch.Tensor, PipelineState]:
        """Apply the server optimiser to the global parameters."""
        new_params, opt_state = self.optimizer.step(params, delta, state.optimizer)
        return new_params, PipelineState(state.stages, opt_state, state.aggregator)

    def client_extras(
        self, extras: Mapping[str, ExtraSpec], layout: Layout
    ) -> dict[str, ExtraSpec]:
        """The extras an honest client sends after the client halves, given those its
        algorithm made (``Algorithm.expected_extras``).

        Each stage with ``expected_extras(before, layout)`` says what its client half makes of
        them (central DP adds its clipping bit, secure aggregation sends zeros of the same
        sizes); a stage without one passes them on unchanged, so a stage that adds an extra
        without declaring it has its clients' results rejected (naming the extra) rather than
        their extra summed unchecked.
        """
        out = dict(extras)
        for stage in self.stages:
            declare = getattr(stage, "expected_extras", None)
            if declare is not None:
                out = dict(declare(out, layout))
        return out

    def describe(self) -> str:
        parts = [s.name for s in self.stages] + [self.aggregator.name, self.optimizer.name]
        return " → ".join(parts)


def pipeline(*parts: Any) -> Pipeline:
    """Build a :class:`Pipeline` from parts in any order, optax-``chain`` style.

    Stages keep their relative order; at most one aggregator and one server optimiser may be
    given (defaults: ``weighted_mean()`` and ``sgd(lr=1.0)``).

    Raises:
        PipelineError: two aggregators or two optimisers, or stages that cannot combine.
    """
    stages: list[Stage] = []
    aggregator = optimizer = None
    for part in parts:
        if hasattr(part, "step") and hasattr(part, "init") and not hasattr(part, "gives"):
            if optimizer is not None:
                raise PipelineError(f"two server optimisers given: {optimizer.name!r} and {part.name!r}")
            optimizer = part
        elif hasattr(part, "accumulate") or hasattr(part, "aggregate"):
            if aggregator is not None:
                raise PipelineError(f"two aggregators given: {aggregator.name!r} and {part.name!r}")
            aggregator = part
        else:
            stages.append(part)
    return Pipeline(stages, aggregator=aggregator, optimizer=optimizer)
