"""FedBuff and FedAsync over gRPC: results taken as they arrive from sites that come and go.

The simulated :class:`~consortium.server.asynchronous.AsyncServer` plays a clock's events; a
deployment has real time instead, and this loop (issue 18) replaces the events with the
sites' answers as they come:

- **dispatch** — every online site that is idle gets a task at once (each site holds at most
  one training task; ``server.concurrency`` > 0 caps how many train at a time, 0: every
  online site), drawn uniformly among the idle ones. A task carries the current model and
  the round number ``version + 1``; the server records which version it sent. A site that
  answers gets its next task as soon as its answer is in, or right after the step its answer
  completed (so it trains from the new model).
- **arrival** — each answer is validated by the hub exactly as in a synchronous round
  (:meth:`~consortium.deploy.hub.RemoteExecutor.start`: sender, task id, round, size,
  finiteness, update-norm cap, declared extras, uplink encoding; audited; receipts). Its
  staleness ``τ`` is the number of server versions since the server *sent* that task — the
  server's own record; a site cannot claim another version (a result whose round is not its
  task's is rejected). ``τ > server.max_staleness`` drops it (``stale`` in the record, a
  ``stale`` audit entry); otherwise it joins the buffer, weighted by ``s(τ)``
  (:mod:`consortium.aggregation.staleness`).
- **step** — when the buffer holds ``K = server.buffer_size`` updates (FedAsync: 1) the
  server steps through the same code as the simulation
  (:meth:`~consortium.server.asynchronous.AsyncServer.buffer_step`: the pipeline's
  aggregator, update bound, central DP, server optimiser, FedAsync's mixing). Each step is
  one ``metrics.jsonl`` record (``round`` = the new version, ``clients`` = updates used,
  ``staleness_mean``/``staleness_max``, ``stale``, ``in_flight``, and ``sites`` /
  ``sites_online`` from :class:`~consortium.deploy.roster.Membership`), and a checkpoint.
  A step that waits ``--round-timeout`` seconds steps on the updates it has (none: the model
  stays, ``aborted``).
- **sites that come and go** — before each dispatch :meth:`Membership.begin_round
  <consortium.deploy.roster.Membership.begin_round>` admits the sites that joined (they get
  work at once) and audits departures and returns; a site that leaves loses the task it
  held (failed when it goes silent, or at ``--round-timeout``), the others go on; when it
  is back it gets work again.
- **resume** — the checkpoint names the tasks in flight; a server resumed after a crash
  abandons them (an ``abandoned`` audit entry): a late answer to one is refused as a task
  this server never sent, and the idle sites get new tasks.

What does not compose over gRPC is refused when the run starts
(:func:`~consortium.server.asynchronous.check_asynchronous`): FedBuff with secure
aggregation (each buffer would be its own SecAgg+ cohort, not built), FedAsync with secure
aggregation, distributed DP, stateful algorithms, downlink compression. Central DP composes:
each buffer is one release, composed without amplification by sampling.

FedBuff: Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS
2022. FedAsync: Xie et al., "Asynchronous Federated Optimization", 2019.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from consortium.compression.admit import admit
from consortium.messages import Result, Task
from consortium.seeds import derive_seed
from consortium.server.asynchronous import AsyncServer
from consortium.server.loop import RunState, Server

__all__ = ["DeployedAsyncServer"]

POLL_S = 0.1
"""How often the loop looks at the roster, silent sites and overdue tasks while it waits."""

RETRY_S = 1.0
"""A site whose task failed at once (it was gone, not sent) is not sent another for this long."""


@dataclass
class _Flight:
    site: str
    task_id: str
    version: int  # the server's version when it sent the task: τ is counted from here
    sent_at: float  # monotonic
    future: cf.Future[Any]


class DeployedAsyncServer(AsyncServer):
    """FedBuff / FedAsync with sites over gRPC (see the module docstring); its executor is a
    :class:`~consortium.deploy.hub.RemoteExecutor` and its sampler the deployment's
    :class:`~consortium.deploy.roster.OnlineSampler` (whose membership says who is online)."""

    deployed = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.remote: Any = self.executor  # a RemoteExecutor (deploy/hub.py)
        self._flights: dict[str, _Flight] = {}
        self._arrivals: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._models: dict[int, torch.Tensor] = {}  # versions the tasks in flight started from
        self._retry: dict[str, float] = {}  # site -> not before (monotonic)
        self._seq = 0
        self._resumed = False
        self._chooser = random.SystemRandom()

    def init_state(self, params: Any) -> RunState:
        return Server.init_state(self, params)  # nothing in flight, no simulated clients

    # -- the loop -----------------------------------------------------------------------------

    def run_round(self, state: RunState, *, last: bool = False) -> tuple[RunState, dict[str, Any]]:
        began = time.perf_counter()
        v, rnd = state.round, state.round + 1
        if not self._resumed:
            self._resumed = True
            self._abandon(state)
        self._models[v] = state.params.vector
        payload = self.algorithm.make_payload(state.algorithm)
        stage_payloads = self.pipeline.broadcast(state.pipeline)
        buffer: list[tuple[Result, int, int]] = []  # (result, τ, version sent), arrival order
        failed: dict[str, str] = {}
        stale = up = down = 0
        timeout = float(getattr(self.executor, "round_timeout", 600.0))
        silence = float(getattr(self.executor, "silence_s", 0.0))
        deadline = time.monotonic() + timeout
        look = 0.0
        online: set[str] = set()
        while len(buffer) < self.buffer_size:
            now = time.monotonic()
            if now >= look:
                online = self._online_sites(rnd)
                self._overdue(now, timeout, failed)
                if silence:
                    self.remote.hub.fail_silent(silence)
                look = now + POLL_S
            down += self._send_tasks(online, state, rnd, payload, stage_payloads, now=now)
            if now >= deadline:
                break
            try:
                task_id = self._arrivals.get(timeout=max(min(POLL_S, deadline - now), 0.001))
            except queue.Empty:
                continue
            flight = self._flights.pop(task_id, None)
            if flight is None:
                continue
            result = flight.future.result()
            up += int(result.nbytes)
            if result.update is None:
                failed[flight.site] = result.error or "no update"
                continue
            tau = v - flight.version
            if self.max_staleness and tau > self.max_staleness:
                stale += 1
                failed[flight.site] = (
                    f"stale: sent at version {flight.version}, arrived at {v} (τ = {tau} > "
                    f"server.max_staleness = {self.max_staleness}); dropped")
                self.remote.hub.log_event("stale", site=flight.site, round=rnd,
                                            task_id=flight.task_id, staleness=tau)
                continue
            r = admit(result, self.pipeline.stages, state.params.layout)
            if r.update is None:  # an encoding that does not decode
                failed[flight.site] = r.error or "no update"
                continue
            buffer.append((r, tau, flight.version))
        audit = getattr(self.remote.hub, "audit", None)
        if audit is not None:  # every result on disk before the step's aggregate exists
            audit.sync()
        updates = [r.update for r, _, _ in buffer if r.update is not None]
        taus = [tau for _, tau, _ in buffer]
        start = self._models.get(buffer[0][2]) if self.mode == "fedasync" and buffer else None
        stepped = self.buffer_step(state, updates, taus, start=start,
                                   population=len(list(self.clients)), sampled=len(buffer))
        if stepped.aborted is not None and not buffer and not failed:
            stepped.aborted = (f"step {rnd}: no update within {timeout:.0f} s "
                               "(--round-timeout): no site online, or none answered")
        record = self.step_record(state, stepped, up=up, down=down, failed=failed, last=last,
                                  online=None)
        in_flight = len(self._flights)
        if last:
            self._drain(timeout)
        self.staleness_fields(record, stepped.taus, stale=stale, in_flight=in_flight,
                              began=began)
        keep = {f.version for f in self._flights.values()}
        self._models = {k: t for k, t in self._models.items() if k in keep}
        new_state = self.step_state(state, stepped, sim_time_s=state.sim_time_s, asynchronous={
            "deployed": True, "seq": self._seq,
            "in_flight": [{"site": f.site, "task_id": f.task_id, "version": f.version}
                          for f in self._flights.values()]})
        return new_state, record

    # -- its parts ----------------------------------------------------------------------------

    def _online_sites(self, rnd: int) -> set[str]:
        """The roster's sites online now, after admitting the sites that joined
        (:meth:`Membership.begin_round`); every client without a membership (a test's)."""
        membership = getattr(self.sampler, "membership", None)
        if membership is None:
            return set(self.clients)
        return set(membership.begin_round(rnd)) & set(self.clients)

    def _send_tasks(self, online: set[str], state: RunState, rnd: int, payload: Any,
                  stage_payloads: Any, *, now: float) -> int:
        """Tasks for idle online sites up to the concurrency; the bytes sent."""
        busy = {f.site for f in self._flights.values()}
        limit = min(self.concurrency, len(online)) if self.concurrency else len(online)
        free = limit - sum(f.site in online for f in self._flights.values())
        idle = sorted(s for s in online - busy if self._retry.get(s, 0.0) <= now)
        if free <= 0 or not idle:
            return 0
        sent = 0
        for site in self._chooser.sample(idle, min(free, len(idle))):
            task = Task(round=rnd, client_id=site, parameters=state.params,
                        seed=derive_seed(self.seed, "client", "async", self._seq, site),
                        payload=payload, stage_payloads=stage_payloads)
            self._seq += 1
            task_id, future = self.remote.start(task, self.clients)
            self._flights[task_id] = _Flight(site, task_id, state.round, time.monotonic(),
                                             future)
            if future.done():  # answered at once: the site is gone (not sent)
                self._retry[site] = now + RETRY_S
            future.add_done_callback(lambda _, t=task_id: self._arrivals.put(t))
            sent += task.nbytes
        return sent

    def _overdue(self, now: float, timeout: float, failed: dict[str, str]) -> None:
        """Close the tasks open longer than ``--round-timeout`` (a late answer is refused)."""
        late = [f for f in self._flights.values() if now - f.sent_at > timeout]
        if not late:
            return
        self.remote.hub.forget([f.task_id for f in late])
        for f in late:
            self._flights.pop(f.task_id, None)
            failed[f.site] = f"no result within {timeout:.0f} s (--round-timeout)"

    def _drain(self, timeout: float) -> None:
        """After the last step: wait (at most ``timeout``) for the tasks still in flight, so
        their sites are not cut off mid-upload; their updates are audited, not used."""
        open_ = list(self._flights.values())
        silence = float(getattr(self.remote, "silence_s", 0.0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # a site that goes silent fails its task
            _, waiting = cf.wait([f.future for f in open_], timeout=POLL_S)
            if not waiting:
                break
            if silence:
                self.remote.hub.fail_silent(silence)
        self.remote.hub.forget([f.task_id for f in open_ if not f.future.done()])
        self._flights.clear()

    def _abandon(self, state: RunState) -> None:
        """A resumed run: the tasks the dead server had in flight are never aggregated (this
        server never sent them: their answers are refused as unknown tasks)."""
        saved = (state.asynchronous or {}).get("in_flight") or []
        self._seq = int((state.asynchronous or {}).get("seq", 0))
        if not saved:
            return
        tasks = [str(f.get("task_id", "")) for f in saved if isinstance(f, dict)]
        self.remote.hub.log_event("abandoned", round=state.round, tasks=tasks)
        print(f"consortium server: resumed at version {state.round}: {len(tasks)} task(s) the "
              "previous server had in flight are abandoned (their answers are refused); idle "
              "sites get new tasks", file=sys.stderr, flush=True)
