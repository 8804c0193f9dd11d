"""Asynchronous aggregation on the simulated clock: FedBuff and FedAsync.

**FedBuff** (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022, Algorithm 1): the server keeps ``server.concurrency`` clients training at once,
each drawn uniformly among the clients online and idle, each training from the model version
it received. Updates arrive in simulated-time order (the clock's finish times,
:meth:`~consortium.server.clock.Clock.finish_times`); a client whose online interval ends
before its finish fails (``failed``), an update more than ``server.max_staleness`` versions old
is dropped (``stale``), and every other update joins the buffer weighted by ``s(τ)``
(:mod:`consortium.aggregation.staleness`; ``τ`` = server versions since it was sent). A new
client is dispatched for each one that finished, at the time it finished. When the buffer
holds ``K = server.buffer_size`` updates the server steps (the pipeline's aggregator, server
halves and server optimiser, as in a synchronous round) and the version increments: each
step is one "round" of ``metrics.jsonl`` (``round`` = the new version, ``clients`` = the
updates used, ``sim_time_s`` = when the K-th arrived, ``staleness_mean``/``staleness_max``,
``stale``, ``in_flight``).

**FedAsync** (Xie et al., "Asynchronous Federated Optimization", 2019, Algorithm 1): a buffer
of one, mixed in: ``x ← (1 − α_t) x + α_t x_client`` with ``α_t = α·s(τ)`` (``server.mixing``)
and ``x_client = x_{v₀} + Δ`` the client's model. The pipeline turns ``Δ`` into ``s(τ)·Δ'``
(decode, clip, noise ...), so the step handed to the server optimiser is
``α (s(τ)(x_{v₀} − x) + s(τ)Δ')``; with the default ``sgd`` at ``lr = 1`` that is the
paper's mixing.

**Training when the update arrives.** Who is dispatched when, the arrival order, the failures
and the staleness depend only on the clock and the seed, never on the model's values. So the
loop first plays the events until the buffer is full, then trains the buffer's clients as one
batch on the executor (the vectorised one trains tasks with per-task models, each from its
own start version), each from the model version it was sent and with the seed it was sent.
A client in flight is not trained by anything else meanwhile, so training it at its arrival
gives the update it would have computed at its dispatch. Clients that fail or whose update
is dropped as stale are not trained (their state stays, as a failed client's does on the
synchronous clock), which also saves the work.

**Checkpoint and resume.** The clients in flight (who, from which version, dispatched when,
finishing when, with which seed) and the models of the versions they started from are in
:attr:`~consortium.server.loop.RunState.asynchronous`, checkpointed after every step; the
buffer is empty at a step's end. A resumed run plays on from there and equals an
uninterrupted one bit for bit.

**What composes** (checked by :func:`check_asynchronous`): the client stages (clipping,
local DP, uplink compression), the robust rules (applied to each buffer's staleness-weighted
deltas; ``f`` is checked against ``buffer_size``), the update bound, simulated attacks and
central DP. Under central DP each buffer is one release of the Gaussian mechanism (noise
``z·clip`` on the sum of at most ``K`` clipped, staleness-weighted updates, ``s(τ) ≤ 1``;
a client is never twice in one buffer); a buffer's clients are whoever finished, not a
random sample, so the ledger composes the releases **without** amplification by sampling
(``epsilon`` is ``epsilon_without_sampling``, one step per server version).
FedBuff with secure aggregation runs each buffer as one SecAgg+ round among its clients (the
paper's setting): they are trained when the buffer is full, so the buffer is a cohort like a
synchronous round's, each client at most once; the server sees the sum only, so it needs
``server.staleness = "constant"`` (``max_staleness`` still drops old updates by their
version, before the protocol). Refused, with the reason: FedAsync with secure aggregation (a
step on one update has no sum to hide it in), distributed DP (its accounting assumes a
sampled cohort), stateful or personalised algorithms (SCAFFOLD, FedNova, ...), downlink
compression, synchronous policies (a deadline, over-selection). Over gRPC the same step
runs on the sites' answers as they arrive (:mod:`consortium.deploy.asynchronous`), where
FedBuff with secure aggregation is refused too (a per-buffer SecAgg+ cohort is not built). The stage payloads (central DP's adaptive clip norm) are
those of the step that trains a client, not of its dispatch.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from consortium.aggregation.base import Aggregate, Pipeline, RoundContext
from consortium.aggregation.staleness import (
    SCALE,
    Staleness,
    StalenessWeighted,
    buffer_weights,
    check_weighting,
)
from consortium.compression.admit import admit
from consortium.errors import ClientError, ConfigError, RoundAborted
from consortium.messages import Result, Task
from consortium.privacy.ledger import SampleTrust
from consortium.seeds import derive_seed
from consortium.server.loop import RunState, Server
from consortium.server.traces import Diurnal
from consortium.server.traffic import ExchangeTraffic
from consortium.types import Parameters, Update

__all__ = ["ASYNC_ALGORITHMS", "ASYNC_SAMPLE", "AsyncServer", "asynchronous_server",
           "check_asynchronous"]

ASYNC_ALGORITHMS = frozenset({"fedavg", "fedprox"})
"""Algorithms whose update means the same whatever version it started from: local SGD on the
client's loss (FedProx's proximal term pulls towards the model the client received, which is
its own start). Nguyen et al. and Xie et al. analyse exactly these."""

ASYNC_SAMPLE = SampleTrust(
    False, "asynchronous aggregation: a buffer's updates come from the clients that finished "
    "first, not from a random sample, so each buffer is a release composed without "
    "amplification by sampling")


def check_asynchronous(cfg: Any, *, algorithm: str, remote: bool) -> None:
    """Refuse what does not compose with ``server.mode = "fedbuff" | "fedasync"``.

    Raises:
        ConfigError: naming the key, the reason and what to do instead.
    """
    mode = cfg.server.mode
    if remote and cfg.secure_aggregation.enabled and mode == "fedbuff":
        raise ConfigError(
            "server.mode = \"fedbuff\" with secure aggregation over gRPC: each buffer would "
            "have to be its own SecAgg+ cohort (its sites re-keyed for every buffer while "
            "others are still training), which this version does not build; use server.mode "
            "= \"sync\" with secure aggregation, or fedbuff without it (central DP composes: "
            "each buffer one release)")
    if cfg.secure_aggregation.enabled and mode == "fedasync":
        raise ConfigError(
            "server.mode = \"fedasync\" with secure aggregation: FedAsync steps on every single "
            "update, so there is no sum of several clients to hide it in (SecAgg+ reveals only "
            "a sum of at least `threshold` clients); use server.mode = \"fedbuff\" or sync")
    if cfg.privacy.mode == "distributed":
        raise ConfigError(
            f"server.mode = {mode!r} with privacy.mode = \"distributed\": its accounting "
            "assumes each round's cohort is a sample, while a buffer holds whoever finished "
            "first; not built for the asynchronous modes; use central DP (each buffer one "
            "release, without amplification) or server.mode = \"sync\"")
    if cfg.secure_aggregation.enabled and cfg.server.staleness != "constant":
        raise ConfigError(
            f"server.mode = {mode!r} with secure aggregation and server.staleness = "
            f"{cfg.server.staleness!r}: the server sees only each buffer's sum, so it cannot "
            "weight one update by its staleness; set server.staleness = \"constant\" (each "
            "buffer is one SecAgg+ round; server.max_staleness still drops old updates, by "
            "their version, before the protocol)")
    if algorithm not in ASYNC_ALGORITHMS:
        raise ConfigError(
            f"server.mode = {mode!r} with algorithm.name = {algorithm!r}: its server state "
            "(SCAFFOLD's control variate, FedNova's normalisation, a personalised or clustered "
            "model) assumes every update of a step started from the same server state, which "
            "stale updates do not; use fedavg or fedprox (the algorithms FedBuff and FedAsync "
            "are analysed for), or server.mode = \"sync\"")
    if cfg.compression.downlink != "none":
        raise ConfigError(
            f"server.mode = {mode!r} with compression.downlink = "
            f"{cfg.compression.downlink!r}: EF21-P's reference model advances once per round "
            "for the whole cohort, while asynchronous clients start from different versions; "
            "set compression.downlink = \"none\" (uplink compression composes)")
    if cfg.server.deadline_s or cfg.sampling.over_select:
        raise ConfigError(
            f"server.mode = {mode!r} with server.deadline_s / sampling.over_select: those are "
            "synchronous policies (a round that waits); the asynchronous modes bound stale "
            "updates with server.max_staleness instead; set them to 0")


class AsyncServer(Server):
    """The round loop of FedBuff and FedAsync (see the module docstring): each call of
    :meth:`run_round` plays the simulated clock's events until one server step."""

    deployed = False
    """Whether the clients are sites over gRPC (real time, no simulated clock:
    :class:`consortium.deploy.asynchronous.DeployedAsyncServer`)."""

    weighting = "examples"
    """``server.async_weighting``: an update's weight in its buffer
    (:func:`consortium.aggregation.staleness.buffer_weights`)."""

    def __init__(self, *, mode: str, concurrency: int, buffer_size: int, max_staleness: int,
                 staleness: Staleness, mixing: float = 0.6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.clock is None and not self.deployed:
            raise ConfigError(f"server.mode = {mode!r} needs the simulated clock (simulation)")
        if mode not in ("fedbuff", "fedasync"):
            raise ConfigError(f"server.mode = {mode!r} is not asynchronous")
        p = self.pipeline
        self.secure = any(getattr(st, "name", "") == "secure_aggregation" for st in p.stages)
        if not self.secure:  # under SecAgg+ the server sees the sum only: s(τ) = 1
            self.pipeline = Pipeline(p.stages, aggregator=StalenessWeighted(p.aggregator),
                                     optimizer=p.optimizer)
        self.mode = mode
        self.buffer_size = 1 if mode == "fedasync" else int(buffer_size)
        self.concurrency = int(concurrency)
        if self.concurrency < (0 if self.deployed else 1):  # deployed 0: every online site
            raise ConfigError(f"server.concurrency = {concurrency!r}: at least one client "
                              "must train at a time")
        self.max_staleness = int(max_staleness)
        self.staleness = staleness
        self.mixing = float(mixing)
        self._ids: list[str] = []
        self._positions: np.ndarray | None = None
        self._order: dict[str, int] | None = None

    def init_state(self, params: Parameters) -> RunState:
        state = super().init_state(params)
        state.asynchronous = {"flights": [], "models": {}, "seq": 0}
        return state

    # -- one server step ------------------------------------------------------------------

    def run_round(self, state: RunState, *, last: bool = False) -> tuple[RunState, dict[str, Any]]:
        assert self.clock is not None
        began = time.perf_counter()
        v, rnd = state.round, state.round + 1
        ids = list(self.clients)
        saved = state.asynchronous or {}
        flights: list[tuple[float, int, dict[str, Any]]] = [
            (float(f["finish"]), int(f["seq"]), dict(f)) for f in saved.get("flights", [])]
        heapq.heapify(flights)
        models: dict[str, torch.Tensor] = dict(saved.get("models", {}))
        models[str(v)] = state.params.vector
        seq = int(saved.get("seq", 0))
        t = state.sim_time_s
        accepted: list[dict[str, Any]] = []
        failed: dict[str, str] = {}
        stale = 0
        down = 0
        row = self._rows()
        busy = np.zeros(len(row), dtype=bool)  # in flight, or waiting in the buffer
        busy[[row[f[2]["client_id"]] for f in flights]] = True
        while len(accepted) < self.buffer_size:
            free = self.concurrency - len(flights)
            if free > 0:
                new = self._dispatch(free, t=t, version=v, seq=seq, busy=busy,
                                     params=state.params, rnd=rnd)
                seq += len(new)
                for f in new:
                    down += int(f["nbytes"])
                    busy[row[f["client_id"]]] = True
                    heapq.heappush(flights, (float(f["finish"]), int(f["seq"]), f))
            if not flights:  # nobody idle is online: wait for the next client to come back
                nxt = self.clock.availability.next_online(t)
                if not math.isfinite(nxt) or nxt <= t:
                    raise ClientError(
                        f"step {rnd}: no idle client is online at {t:.1f} s (simulated) and "
                        "none comes back; lower server.buffer_size or check the availability "
                        "trace")
                t = nxt
                continue
            _, _, f = heapq.heappop(flights)
            t = max(t, float(f["finish"]))
            if f.get("error"):
                failed[f["client_id"]] = str(f["error"])
                busy[row[f["client_id"]]] = False
                continue
            tau = v - int(f["version"])
            if self.max_staleness and tau > self.max_staleness:
                stale += 1
                failed[f["client_id"]] = (
                    f"stale: sent at version {f['version']}, arrived at {v} (τ = {tau} > "
                    f"server.max_staleness = {self.max_staleness}); dropped")
                busy[row[f["client_id"]]] = False
                continue
            f["tau"] = tau
            accepted.append(f)
        return self._step(state, accepted, flights, models, seq=seq, t=t, failed=failed,
                          stale=stale, down=down, last=last, began=began, ids=ids)

    def _rows(self) -> dict[str, int]:
        """Each client's row (its position in ``self.clients``), and the clock's rows of them."""
        if self._order is None:
            assert self.clock is not None
            self._ids = list(self.clients)
            self._positions = self.clock._indices(self._ids)
            self._order = {c: i for i, c in enumerate(self._ids)}
        return self._order

    def _dispatch(self, n: int, *, t: float, version: int, seq: int, busy: np.ndarray,
                  params: Parameters, rnd: int) -> list[dict[str, Any]]:
        """Up to ``n`` clients drawn uniformly among those online at ``t`` and not ``busy``,
        each with its task's seed, work, bytes and finish time (or the time it goes offline)."""
        clock = self.clock
        assert clock is not None
        rng = np.random.default_rng(derive_seed(self.seed, "async", "dispatch", seq))
        rows, until = self._draw(n, t, busy, rng)
        if not rows.size:
            return []
        chosen = [self._ids[int(i)] for i in rows]
        work = {c: self._work(seq + j) for j, c in enumerate(chosen)}
        tasks = [Task(round=rnd, client_id=c, parameters=params, seed=0, work=work[c])
                 for c in chosen]
        finish = clock.finish_times(tasks, t)
        out = []
        for j, c in enumerate(chosen):
            s = seq + j
            ok = bool(finish[j] <= until[j])
            out.append({
                "client_id": c, "seq": s, "version": version, "start": t,
                "finish": float(finish[j]) if ok else float(until[j]),
                "seed": derive_seed(self.seed, "client", "async", s, c), "work": work[c],
                "nbytes": tasks[j].nbytes,
                "error": None if ok else (
                    f"went offline at {until[j]:.1f} s, before finishing at {finish[j]:.1f} s "
                    "(simulated)"),
            })
        return out

    def _draw(self, n: int, t: float, busy: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``n`` rows drawn uniformly without replacement among the clients online at
        ``t`` and not ``busy``, and when each goes offline.

        A few draws (a replacement for one finished client) under a diurnal trace are made by
        rejection: uniform rows, each kept if idle, online and new, so only the drawn clients'
        availability is computed (the whole population's costs 130 µs at N = 10,000, once per
        dispatch); after 16 rounds of rejections the rest is drawn from the full list, which
        keeps the draw uniform."""
        assert self.clock is not None and self._positions is not None
        av = self.clock.availability
        total = len(self._ids)
        picked: list[int] = []
        ends: list[float] = []
        if isinstance(av, Diurnal) and n <= 8:
            for _ in range(16):
                draw = rng.integers(0, total, size=4 * n)
                pos = self._positions[draw]
                subset = dataclasses.replace(av, phase=av.phase[pos], duty=av.duty[pos])
                for r, end in zip(draw.tolist(), subset.until(t).tolist()):
                    if end > t and not busy[r] and r not in picked:
                        picked.append(r)
                        ends.append(end)
                        if len(picked) == n:
                            return np.array(picked, dtype=np.int64), np.array(ends)
        until = (np.full(total, np.inf) if av.always else av.until(t)[self._positions])
        idle = (until > t) & ~busy
        idle[picked] = False
        candidates = np.flatnonzero(idle)
        more = rng.choice(candidates.size, size=min(n - len(picked), candidates.size),
                          replace=False)
        rows = np.concatenate([np.array(picked, dtype=np.int64), candidates[more]])
        return rows, until[rows]

    def _work(self, seq: int) -> float:
        """``simulation.stragglers`` one dispatch at a time: with that chance the client does a
        uniform share in (0, 1] of its local steps (a synchronous round picks exactly that
        share of its cohort, which a dispatch of one client would round to nobody)."""
        fraction = float(getattr(self.stragglers, "fraction", 0.0))
        if not fraction:
            return 1.0
        rng = np.random.default_rng(derive_seed(self.seed, "stragglers", "async", seq))
        return float(1.0 - rng.random()) if rng.random() < fraction else 1.0

    def _step(self, state: RunState, accepted: list[dict[str, Any]],
              flights: list[tuple[float, int, dict[str, Any]]], models: dict[str, torch.Tensor],
              *, seq: int, t: float, failed: dict[str, str], stale: int, down: int, last: bool,
              began: float, ids: list[str]) -> tuple[RunState, dict[str, Any]]:
        assert self.clock is not None
        v, rnd = state.round, state.round + 1
        payload = self.algorithm.make_payload(state.algorithm)
        stage_payloads = self.pipeline.broadcast(state.pipeline)
        sent: dict[str, Parameters] = {str(v): state.params}
        for f in accepted:  # one Parameters per version: the executor batches equal models
            key = str(f["version"])
            if key not in sent:
                sent[key] = state.params.replace(models[key])
        tasks = [Task(round=rnd, client_id=f["client_id"], parameters=sent[str(f["version"])],
                      seed=int(f["seed"]), payload=payload, stage_payloads=stage_payloads,
                      work=float(f["work"]), cohort_size=self.buffer_size) for f in accepted]
        by_client: dict[str, Result] = {}
        up = 0
        if tasks:
            try:
                for r in self.dropouts.fit(self.executor, tasks, self.clients, round=rnd,
                                           seed=self.seed):
                    up += r.nbytes
                    r = admit(r, self.pipeline.stages, state.params.layout)
                    by_client[r.client_id] = r
            except RoundAborted:
                pass
        updates = []
        taus: list[int] = []
        trips: list[float] = []  # each update's round trip, dispatch to arrival
        for f in accepted:  # in arrival order: the sum's order is the clock's, not the executor's
            got = by_client.get(f["client_id"])
            if got is None or got.update is None:
                failed[f["client_id"]] = (got.error if got is not None else None) or "no update"
                continue
            taus.append(int(f["tau"]))
            updates.append(got.update)
            trips.append(float(f["finish"]) - float(f["start"]))
        if self.weighting != "examples":  # server.async_weighting (aggregation/staleness.py)
            weights = buffer_weights(self.weighting, [u.weight for u in updates], trips)
            updates = [dataclasses.replace(u, weight=w) for u, w in zip(updates, weights)]
        start = (models[str(accepted[0]["version"])]
                 if self.mode == "fedasync" and accepted else None)
        stepped = self.buffer_step(state, updates, taus, start=start, population=len(ids),
                                   sampled=len(accepted))
        record = self.step_record(state, stepped, up=up, down=down, failed=failed, last=last,
                                  online=None if last else self._online(t))
        record["sim_time_s"] = t
        if not self.clock.availability.always:
            record["online"] = len(self.clock.online(ids, t))
        self.staleness_fields(record, stepped.taus, stale=stale, in_flight=len(flights),
                              began=began)
        # the models the clients in flight started from (within the staleness bound)
        keep = {str(f[2]["version"]) for f in flights if not f[2].get("error") and (
            not self.max_staleness or rnd - int(f[2]["version"]) <= self.max_staleness)}
        new_state = self.step_state(state, stepped, sim_time_s=t, asynchronous={
            "flights": [f for _, _, f in sorted(flights, key=lambda e: (e[0], e[1]))],
            "models": {k: models[k] for k in sorted(keep, key=int)}, "seq": seq})
        return new_state, record

    # -- the buffer's step, shared with the deployment (deploy/asynchronous.py) ------------

    def buffer_step(self, state: RunState, updates: list[Update], taus: list[int], *,
                    start: torch.Tensor | None, population: int, sampled: int) -> BufferStep:
        """One server step on a full buffer: each update weighted by ``s(τ)`` (under
        :data:`SCALE`, set here from the server's own record of ``τ``), then the pipeline's
        aggregator, the algorithm's server step, FedAsync's mixing towards ``start`` (the
        model the update started from) and the server optimiser, exactly as in a synchronous
        round. Errors an executor says come from its clients' messages (``round_errors``: a
        deployment) abort the step (the model and every state stay), never the run."""
        rnd = state.round + 1
        weighted = [dataclasses.replace(u, metrics={**u.metrics, SCALE: self.staleness(tau)})
                    for u, tau in zip(updates, taus)]

        def exchange(stage: str, phase: str, messages: Mapping[str, Any]):  # type: ignore[no-untyped-def]
            return self.executor.exchange(stage, phase, messages, self.clients, round=rnd)

        traffic = ExchangeTraffic()  # SecAgg+'s protocol phases among the buffer's clients
        ctx = RoundContext(
            round=rnd, seed=derive_seed(self.seed, "server", rnd), population=population,
            sampled=sampled, layout=state.params.layout,
            expected_clients=float(self.buffer_size), global_params=state.params,
            exchange=traffic.wrap(self.dropouts.wrap(exchange, round=rnd, seed=self.seed)),
        )
        contained: tuple[type[BaseException], ...] = tuple(
            getattr(self.executor, "round_errors", ()))
        aborted = None
        try:
            aggregate, pipeline_state = self.pipeline.aggregate(iter(weighted), state.pipeline,
                                                                ctx)
        except RoundAborted as exc:  # SecAgg+ lost too many of the buffer's clients
            aggregate, aborted = None, str(exc)
        except contained as exc:
            aggregate = None
            aborted = f"step {rnd}: aggregation failed ({type(exc).__name__}: {exc})"
        params, algorithm_state = state.params, state.algorithm
        if aggregate is None:
            pipeline_state = state.pipeline
            aggregate = Aggregate(torch.zeros(0), 0.0, 0)
            aborted = aborted or f"step {rnd}: no update in the buffer (every client failed)"
        else:
            try:
                delta, algorithm_state = self.algorithm.server_step(aggregate, state.algorithm,
                                                                    ctx)
                if self.mode == "fedasync":  # x + α(s(τ)(x_{v0} − x) + s(τ)Δ')
                    assert start is not None
                    s = self.staleness(taus[0])
                    delta = self.mixing * (s * (start - state.params.vector) + delta)
                new_vector, pipeline_state = self.pipeline.step(state.params.vector, delta,
                                                                pipeline_state)
                if contained and not bool(torch.isfinite(new_vector).all()):
                    raise ArithmeticError("the new model is not finite")
                params = state.params.replace(new_vector)
            except contained as exc:
                algorithm_state, pipeline_state = state.algorithm, state.pipeline
                aborted = f"step {rnd}: the server step failed ({type(exc).__name__}: {exc})"
                aggregate = Aggregate(torch.zeros(0), 0.0, 0)
        return BufferStep(params=params, algorithm_state=algorithm_state,
                          pipeline_state=pipeline_state, aggregate=aggregate, aborted=aborted,
                          updates=weighted, taus=list(taus), traffic=traffic)

    def step_record(self, state: RunState, stepped: BufferStep, *, up: int, down: int,
                    failed: dict[str, str], last: bool,
                    online: list[str] | None) -> dict[str, Any]:
        """The step's ``metrics.jsonl`` record up to the aggregate's info (evaluating the new
        model every ``evaluation.every`` steps, on the ``online`` clients); fills
        ``stepped.per_client`` and ``stepped.evaluated``."""
        rnd = state.round + 1
        updates = stepped.updates
        reporting = [u for u in updates if "train_loss" in u.metrics]
        total_w = sum(u.weight for u in reporting)
        record: dict[str, Any] = {
            "round": rnd, "clients": len(updates),
            "train_loss": (sum(u.metrics["train_loss"] * u.weight for u in reporting) / total_w
                           if total_w else None),
        }
        stepped.per_client, stepped.evaluated = state.per_client, state.last_metrics
        if rnd % self.eval_every == 0 or last:
            metrics, stepped.per_client = self.evaluator.evaluate(
                rnd, stepped.params, executor=self.executor, clients=self.clients,
                online=online)
            record.update(metrics)
            stepped.evaluated = dict(metrics)
        record["bytes_up"] = up + stepped.traffic.up
        record["bytes_down"] = down + stepped.traffic.down
        record["epsilon"] = None
        if failed:
            record["failed"] = failed
        if stepped.aborted is not None:
            record["aborted"] = stepped.aborted
        record.update(stepped.aggregate.info)
        return record

    @staticmethod
    def staleness_fields(record: dict[str, Any], taus: list[int], *, stale: int,
                         in_flight: int, began: float) -> None:
        """The record's ``staleness_mean``/``staleness_max``, ``stale``, ``in_flight`` and
        ``wall_s``."""
        record["staleness_mean"] = float(np.mean(taus)) if taus else None
        record["staleness_max"] = max(taus) if taus else None
        record["stale"] = stale
        record["in_flight"] = in_flight
        record["wall_s"] = time.perf_counter() - began

    def step_state(self, state: RunState, stepped: BufferStep, *, sim_time_s: float,
                   asynchronous: dict[str, Any]) -> RunState:
        """The run's state after the step (what is checkpointed)."""
        updates = stepped.updates
        return RunState(
            round=state.round + 1, params=stepped.params, pipeline=stepped.pipeline_state,
            algorithm=stepped.algorithm_state,
            participants=[u.client_id for u in updates],
            participant_steps={u.client_id: int(u.metrics.get("steps", 0)) for u in updates},
            last_metrics=stepped.evaluated, per_client=stepped.per_client,
            downlink=state.downlink, sim_time_s=sim_time_s, asynchronous=asynchronous,
        )


@dataclass
class BufferStep:
    """What one server step on a buffer produced (:meth:`AsyncServer.buffer_step`)."""

    params: Parameters
    algorithm_state: Any
    pipeline_state: Any
    aggregate: Aggregate
    aborted: str | None
    updates: list[Update]
    taus: list[int]
    traffic: ExchangeTraffic
    per_client: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluated: dict[str, Any] = field(default_factory=dict)



def asynchronous_server(f: Any) -> AsyncServer:
    """The asynchronous round loop for a federation whose ``server.mode`` is ``"fedbuff"`` or
    ``"fedasync"``, built from the synchronous server's parts (its clients, executor,
    evaluator, callbacks, clock); the privacy ledger composes each buffer without
    amplification by sampling (:data:`ASYNC_SAMPLE`)."""
    cfg, old = f.cfg, f.server
    check_asynchronous(cfg, algorithm=f.algorithm.name, remote=f.executor.name == "remote")
    check_weighting(cfg, remote=f.executor.name == "remote")
    s = cfg.server
    k = 1 if s.mode == "fedasync" else s.buffer_size
    check_clients = getattr(f.pipeline.aggregator, "check_clients", None)
    if check_clients is not None:  # a robust rule's f against the buffer it sees
        check_clients(k)
    if f.ledger is not None and hasattr(f.ledger, "sample"):
        f.ledger.sample = ASYNC_SAMPLE
    remote = f.executor.name == "remote"
    parts: Mapping[str, Any] = {
        "clients": old.clients, "algorithm": old.algorithm, "pipeline": old.pipeline,
        "sampler": old.sampler, "executor": old.executor, "evaluator": old.evaluator,
        "seed": old.seed, "stragglers": old.stragglers, "dropouts": old.dropouts,
        "callbacks": old.callbacks, "eval_every": old.eval_every, "downlink": old.downlink,
        "clock": old.clock,
    }
    if remote:  # sites over gRPC: arrivals in real time (deploy/asynchronous.py)
        from consortium.deploy.asynchronous import DeployedAsyncServer

        return DeployedAsyncServer(
            mode=s.mode, concurrency=s.concurrency, buffer_size=k,
            max_staleness=s.max_staleness,
            staleness=Staleness(s.staleness, s.staleness_a, s.staleness_b), mixing=s.mixing,
            **parts,
        )
    server = AsyncServer(
        mode=s.mode, concurrency=s.concurrency or f.per_round, buffer_size=k,
        max_staleness=s.max_staleness,
        staleness=Staleness(s.staleness, s.staleness_a, s.staleness_b), mixing=s.mixing,
        **parts,
    )
    server.weighting = s.async_weighting
    return server
