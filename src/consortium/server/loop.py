"""The round loop: the one place where sampler, algorithm, executor, pipeline and callbacks meet."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from consortium.aggregation.base import (
    Aggregate,
    Pipeline,
    PipelineState,
    RoundContext,
    StageState,
)
from consortium.algorithms.base import Algorithm
from consortium.client.app import SiteClient
from consortium.compression.admit import admit
from consortium.compression.downlink import Downlink
from consortium.errors import ClientError, RoundAborted
from consortium.executors.base import Executor
from consortium.messages import Result, Task
from consortium.reporting.callbacks import CallbackList
from consortium.seeds import derive_seed
from consortium.server.clock import Clock
from consortium.server.evaluation import Evaluator
from consortium.server.heterogeneity import Dropouts, Stragglers
from consortium.server.sampling import Sampler
from consortium.server.traffic import ExchangeTraffic
from consortium.types import Parameters

__all__ = ["RunState", "Server"]


@dataclass(frozen=True)
class _Seen:
    """One result as the round's record needs it, without its tensors: the loop does not keep
    the round's updates (a deployment's 1,000 sites send 1 MB each), the aggregator folds them."""

    client_id: str
    has_update: bool
    weight: float
    metrics: dict[str, float]
    error: str | None
    refused: bool
    nbytes: int

    @classmethod
    def of(cls, r: Result) -> _Seen:
        u = r.update
        return cls(r.client_id, u is not None, u.weight if u is not None else 0.0,
                   dict(u.metrics) if u is not None else {}, r.error, r.refused, r.nbytes)


@dataclass
class RunState:
    """Everything the server needs to continue a run (checkpointed after every round)."""

    round: int
    params: Parameters
    pipeline: PipelineState
    algorithm: StageState
    last_metrics: dict[str, Any] = field(default_factory=dict)
    """The latest evaluation's metrics (what ``summary.json`` reports as ``final``)."""
    per_client: dict[str, dict[str, float]] = field(default_factory=dict)
    participants: list[str] = field(default_factory=list)
    """Clients whose updates went into the last round (for the privacy ledger)."""
    participant_steps: dict[str, int] = field(default_factory=dict)
    """Local steps each of them took (local DP accounting)."""
    downlink: dict[str, Any] = field(default_factory=dict)
    """Downlink compression's state (the clients' model ``x̂``, each client's last round, the
    messages' running byte total: :mod:`consortium.compression.downlink`); ``{}`` without it."""
    sim_time_s: float = 0.0
    """The simulated clock's time at the end of this round (:mod:`consortium.server.clock`)."""
    asynchronous: dict[str, Any] = field(default_factory=dict)
    """The asynchronous modes' clients in flight and the models they started from
    (:mod:`consortium.server.asynchronous`); ``{}`` in synchronous rounds."""


class Server:
    """Runs federated rounds. Knows the roles only through their contracts."""

    def __init__(
        self,
        *,
        clients: Mapping[str, SiteClient],
        algorithm: Algorithm,
        pipeline: Pipeline,
        sampler: Sampler,
        executor: Executor,
        evaluator: Evaluator,
        seed: int,
        stragglers: Stragglers | None = None,
        dropouts: Dropouts | None = None,
        callbacks: CallbackList | None = None,
        eval_every: int = 1,
        downlink: Downlink | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.clients = clients
        self.algorithm = algorithm
        self.pipeline = pipeline
        self.sampler = sampler
        self.executor = executor
        self.evaluator = evaluator
        self.seed = seed
        self.stragglers = stragglers or Stragglers(0.0)
        self.dropouts = dropouts or Dropouts(0.0)
        self.callbacks = callbacks or CallbackList()
        self.eval_every = eval_every
        self.downlink = downlink
        self.clock = clock  # None: no simulated time (a deployment)

    def _online(self, t: float) -> list[str] | None:
        """The clients online at simulated time ``t`` (whom a round's evaluation reaches);
        ``None``: every client."""
        if self.clock is None or self.clock.availability.always or self.clock.evaluate_offline:
            return None
        return self.clock.online(list(self.clients), t)

    def init_state(self, params: Parameters) -> RunState:
        return RunState(
            round=0,
            params=params,
            pipeline=self.pipeline.init(params.layout),
            algorithm=self.algorithm.init_server(params.layout),
        )

    def run(self, state: RunState, *, rounds: int) -> RunState:
        """Run rounds ``state.round + 1 … rounds``."""
        self.callbacks.on_run_start(state.round, rounds)
        while state.round < rounds:
            state, record = self.run_round(state, last=state.round + 1 == rounds)
            self.callbacks.on_round_end(record, state)
        return state

    def run_round(self, state: RunState, *, last: bool = False) -> tuple[RunState, dict[str, Any]]:
        start = time.perf_counter()
        rnd = state.round + 1
        ids = list(self.clients)
        now = state.sim_time_s
        participants = (self.sampler.sample(rnd, ids, seed=self.seed) if self.clock is None else
                        self.clock.sample(self.sampler, rnd, ids, seed=self.seed, t=now))
        work = self.stragglers.work(rnd, participants, seed=self.seed)
        payload = self.algorithm.make_payload(state.algorithm)
        stage_payloads = self.pipeline.broadcast(state.pipeline)
        # downlink compression: clients train from x̂ (x̂ᵢ per client), the server steps x
        # (EF21-P); ``deltas``: the message a deployed task carries instead of the model
        own: dict[str, Parameters] = {}
        model_nbytes: dict[str, int] = {}
        deltas: dict[str, Any] = {}
        downlink_state = state.downlink
        if self.downlink is not None:
            own, model_nbytes, deltas, downlink_state = self.downlink.prepare(
                state.downlink, state.params, participants, round=rnd,
                seed=derive_seed(self.seed, "downlink", rnd), population=len(ids),
            )
        tasks = [
            Task(
                round=rnd, client_id=cid, parameters=own.get(cid, state.params),
                seed=derive_seed(self.seed, "client", rnd, cid), payload=payload,
                stage_payloads=stage_payloads, work=work[cid], cohort_size=len(participants),
                model_nbytes=model_nbytes.get(cid), downlink=deltas.get(cid),
            )
            for cid in participants
        ]
        results: list[_Seen] = []  # what the record needs; the tensors go to the aggregator
        expected = getattr(self.sampler, "expected_size", None)

        def exchange(stage: str, phase: str, messages: Mapping[str, Any]):  # type: ignore[no-untyped-def]
            return self.executor.exchange(stage, phase, messages, self.clients, round=rnd)

        traffic = ExchangeTraffic()  # the protocol phases' bytes (secure aggregation)

        ctx = RoundContext(
            round=rnd, seed=derive_seed(self.seed, "server", rnd), population=len(ids),
            sampled=len(participants), layout=state.params.layout,
            expected_clients=float(expected(len(ids))) if expected else 0.0,
            exchange=traffic.wrap(self.dropouts.wrap(exchange, round=rnd, seed=self.seed)),
            global_params=state.params,
        )

        def successful():
            def fit(chosen: Sequence[Task]) -> Iterator[Result]:
                return self.dropouts.fit(self.executor, chosen, self.clients, round=rnd, seed=self.seed)

            # the simulated clock decides, before training, who finishes in time
            for r in fit(tasks) if plan is None else plan.run(fit):
                sent = r.nbytes  # what travelled, counted even when it is rejected here
                r = admit(r, self.pipeline.stages, state.params.layout)  # a malformed encoding
                results.append(dataclasses.replace(_Seen.of(r), nbytes=sent))
                if r.update is not None:
                    yield r.update

        plan = None if self.clock is None else self.clock.plan(tasks, round=rnd, t=now)
        aborted = None
        # errors an executor says come from its clients' messages (a deployment: what another
        # institution sent) end the round, never the run
        contained: tuple[type[BaseException], ...] = tuple(getattr(self.executor, "round_errors", ()))
        try:
            aggregate, pipeline_state = self.pipeline.aggregate(successful(), state.pipeline, ctx)
        except RoundAborted as exc:  # nothing revealed; the model and every state stay
            aggregate, pipeline_state, aborted = None, state.pipeline, str(exc)
        except contained as exc:
            aggregate, pipeline_state = None, state.pipeline
            aborted = f"round {rnd}: aggregation failed ({type(exc).__name__}: {exc})"
        updates = [r for r in results if r.has_update]
        failed = {r.client_id: r.error for r in results if not r.has_update}
        broken = [r.error for r in results if not r.has_update and not r.refused]
        if aggregate is None and broken and aborted is None:
            first = broken[0]
            raise ClientError(f"round {rnd}: no client returned an update; first error: {first}")
        if aggregate is None:  # an empty cohort, or every site refused: the model stays
            params, algorithm_state = state.params, state.algorithm
            aggregate = Aggregate(torch.zeros(0), 0.0, 0)
        else:
            try:
                delta, algorithm_state = self.algorithm.server_step(aggregate, state.algorithm, ctx)
                new_vector, pipeline_state = self.pipeline.step(
                    state.params.vector, delta, pipeline_state
                )
                if contained and not bool(torch.isfinite(new_vector).all()):
                    raise ArithmeticError("the new model is not finite")
                params = state.params.replace(new_vector)
            except contained as exc:
                params, algorithm_state, pipeline_state = state.params, state.algorithm, state.pipeline
                aborted = f"round {rnd}: the server step failed ({type(exc).__name__}: {exc})"
                aggregate = Aggregate(torch.zeros(0), 0.0, 0)

        # sites may keep their training loss to themselves (their policy's send_metrics)
        reporting = [u for u in updates if "train_loss" in u.metrics]
        total_w = sum(u.weight for u in reporting)
        record: dict[str, Any] = {
            "round": rnd,
            "clients": len(updates),
            "train_loss": (
                sum(u.metrics["train_loss"] * u.weight for u in reporting) / total_w
                if total_w else None
            ),
        }
        per_client, evaluated = state.per_client, state.last_metrics
        if rnd % self.eval_every == 0 or last:
            metrics, per_client = self.evaluator.evaluate(
                rnd, params, executor=self.executor, clients=self.clients,
                online=None if plan is None or last else self._online(plan.end),
            )
            record.update(metrics)
            evaluated = dict(metrics)
        record["bytes_up"] = sum(r.nbytes for r in results) + traffic.up
        record["bytes_down"] = sum(t.nbytes for t in tasks) + traffic.down
        resent = getattr(self.executor, "take_resent_bytes", None)  # deployed downlink resyncs
        if resent is not None:
            record["bytes_down"] += resent()
        record["epsilon"] = None
        if failed:
            record["failed"] = failed
        if aborted is not None:
            record["aborted"] = aborted
        record.update(aggregate.info)
        if plan is not None:
            record["sim_time_s"] = plan.end
            if self.clock is not None and not self.clock.availability.always:
                record["online"] = len(self.clock.online(ids, now))  # at the round's start
        record["wall_s"] = time.perf_counter() - start
        new_state = RunState(
            round=rnd, params=params, pipeline=pipeline_state, algorithm=algorithm_state,
            participants=[] if aborted is not None else [u.client_id for u in updates],
            participant_steps={u.client_id: int(u.metrics.get("steps", 0)) for u in updates},
            last_metrics=evaluated,
            per_client=per_client,
            downlink=downlink_state,
            sim_time_s=plan.end if plan is not None else state.sim_time_s,
        )
        return new_state, record
