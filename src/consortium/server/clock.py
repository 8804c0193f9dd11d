"""The simulated clock: how long each round takes, who is online, who finishes in time.

A client's time in a round (all in simulated seconds) is what FedScale's simulator charges
(Lai et al., "FedScale", ICML 2022)::

    finish = start + latency + bytes_down / downlink + examples / speed + bytes_up / uplink

with its profile from :mod:`consortium.server.traces`; ``bytes_down`` is the task's exact
size (:attr:`~consortium.messages.Task.nbytes`, so downlink compression shortens it),
``examples`` the training examples of its local steps (after the stragglers' cut), and
``bytes_up`` the update's size: the model's (or, under uplink compression, its encoding's,
measured once on a random vector of the model's size) plus the algorithm's payload-sized
extras (SCAFFOLD's control variate).
Which clients count is decided before they train, so a client that fails keeps its state (as
:class:`~consortium.server.heterogeneity.Dropouts` does), and the decision is a few numpy
operations over the cohort:

- a client offline at the round's start is not sampled (:meth:`Clock.sample`);
- a client whose online interval ends before its finish fails (``went offline``);
- with ``server.deadline_s`` a client not finished by ``start + deadline_s`` fails;
- with ``sampling.over_select = x`` only the first ``ceil(n / (1 + x))`` to finish count
  (over-selection, Bonawitz et al., "Towards Federated Learning at Scale", SysML 2019);
- a round with fewer than ``server.min_results`` clients left is aborted (the model stays).

The round ends when its last counted client finishes, or when the server stops waiting: at
the deadline for a late client, when a client goes offline (its heartbeat stops). A round
whose cohort is empty (nobody online) waits for the first client to come back. Federated
evaluation happens at the round's end on the clients then online (the last round, or every
round with ``evaluation.include_offline``, evaluates every client); it is not charged to the
clock, as FedScale reports training time.

``metrics.jsonl`` gains ``sim_time_s``, the simulated time at the round's end. The clock
holds no state of its own: the time is the last round's ``sim_time_s`` (in
:class:`~consortium.server.loop.RunState`, recovered from ``metrics.jsonl`` on resume), and
everything else is a function of the seed. :meth:`Clock.finish_times` is the piece an
asynchronous mode orders its events by.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from consortium.errors import RoundAborted
from consortium.messages import Result, Task
from consortium.server.traces import Availability, Profiles

__all__ = ["Clock", "RoundPlan", "time_to_target"]


@dataclass(frozen=True)
class RoundPlan:
    """One round on the clock: the tasks that run, those that fail and why, and when it ends."""

    round: int
    start: float
    end: float
    kept: list[Task]
    failed: dict[str, str] = field(default_factory=dict)
    aborted: str | None = None

    def run(self, fit: Callable[[Sequence[Task]], Iterable[Result]]) -> Iterator[Result]:
        """``fit(kept tasks)``'s results, then a result without an update for each failed
        client (it was not trained).

        Raises:
            RoundAborted: fewer clients than the minimum finish in time (after yielding the
                failures; nobody was trained).
        """
        inner: RoundAborted | None = None
        if self.aborted is None and self.kept:
            try:  # the dropouts may abort the round too: the clock's failures still count
                yield from fit(self.kept)
            except RoundAborted as exc:
                inner = exc
        for cid, why in self.failed.items():
            yield Result(self.round, cid, None, error=why)
        if self.aborted is not None:
            raise RoundAborted(self.aborted)
        if inner is not None:
            raise inner


@dataclass(frozen=True)
class Clock:
    """Simulated time for a federation's clients (see the module docstring).

    Args:
        profiles: each client's speed, bandwidths and latency.
        availability: when each client is online.
        train_sizes: each client's training examples (aligned with ``profiles.client_ids``).
        batch_size, epochs, steps: the local-training settings (``steps > 0`` overrides
            ``epochs``), from which a client's examples per round follow.
        deadline: seconds a round waits (0: none).
        over_select: the over-selection factor (0: off).
        min_results: the fewest updates a round goes on with.
        upload: bytes of a client's delta on the wire (its encoding under uplink
            compression); 0: the model's dense size.
        evaluate_offline: federated evaluation reaches every client, offline ones too
            (``evaluation.include_offline``).
    """

    profiles: Profiles
    availability: Availability
    train_sizes: np.ndarray
    batch_size: int
    epochs: int = 1
    steps: int = 0
    deadline: float = 0.0
    over_select: float = 0.0
    min_results: int = 1
    upload: int = 0
    evaluate_offline: bool = False
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {c: i for i, c in enumerate(self.profiles.client_ids)})

    @property
    def trivial(self) -> bool:
        """Every client always online, all alike, no deadline, no over-selection: the clock
        changes nothing but adds ``sim_time_s``."""
        return (self.availability.always and self.profiles.uniform and not self.deadline
                and not self.over_select)

    def describe(self) -> dict[str, Any]:
        p = self.profiles
        return {
            "availability": type(self.availability).__name__.lower(),
            "speed_median": float(np.median(p.speed)) if p.speed.size else None,
            "deadline_s": self.deadline, "over_select": self.over_select,
            "min_results": self.min_results,
        }

    # -- who is online ---------------------------------------------------------------------

    def online(self, client_ids: Sequence[str], t: float) -> list[str]:
        """The clients of ``client_ids`` online at ``t``, in their order."""
        if self.availability.always:
            return list(client_ids)
        up = self.availability.until(t) > t
        ids = np.asarray(client_ids, dtype=object)
        return list(ids[up[self._indices(client_ids)]])

    def sample(self, sampler: Any, round: int, client_ids: Sequence[str], *, seed: int,
               t: float) -> list[str]:
        """``sampler``'s draw among the clients online at ``t``. A sampler of a fixed count
        keeps its count (every online client when fewer are online); others (Poisson) draw
        from the online clients at their rate. Everyone online: exactly ``sampler.sample``."""
        online = self.online(client_ids, t)
        if len(online) == len(client_ids):
            return sampler.sample(round, client_ids, seed=seed)
        size = getattr(sampler, "size", None)
        count = getattr(sampler, "count", 0) or getattr(sampler, "fraction", 0)
        if size is not None and count:  # uniform: the same cohort size from fewer clients
            k = int(size(len(client_ids)))
            if k >= len(online):
                return online
            from consortium.server.sampling import UniformSampler

            return UniformSampler(count=k).sample(round, online, seed=seed)
        return sampler.sample(round, online, seed=seed)

    # -- timing ----------------------------------------------------------------------------

    def examples(self, idx: np.ndarray, work: np.ndarray) -> np.ndarray:
        """Training examples each client processes in a round (its local steps, after the
        stragglers' cut ``work``; :func:`~consortium.client.training.steps_for_work`)."""
        n = self.train_sizes[idx].astype(np.float64)
        b = float(self.batch_size)
        planned = np.full(n.shape, float(self.steps)) if self.steps > 0 else (
            self.epochs * np.ceil(n / b))
        steps = np.maximum(1.0, np.minimum(planned, np.ceil(np.round(work * planned, 9))))
        if self.steps > 0:
            return steps * np.minimum(b, n)
        return np.minimum(steps * b, self.epochs * n)

    def durations(self, idx: np.ndarray, *, down: np.ndarray, up: np.ndarray,
                  work: np.ndarray) -> np.ndarray:
        """Seconds from a task's dispatch to its update's arrival, for clients ``idx``."""
        p = self.profiles
        return (p.latency[idx] + down / p.down[idx] + self.examples(idx, work) / p.speed[idx]
                + up / p.up[idx])

    def finish_times(self, tasks: Sequence[Task], t: float) -> np.ndarray:
        """When each task's update arrives if it is dispatched at ``t`` (what an asynchronous
        mode orders its events by)."""
        idx = self._indices([task.client_id for task in tasks])
        down = np.fromiter((task.nbytes for task in tasks), np.float64, len(tasks))
        up = np.fromiter((_upload(task, self.upload) for task in tasks), np.float64, len(tasks))
        work = np.fromiter((task.work for task in tasks), np.float64, len(tasks))
        return t + self.durations(idx, down=down, up=up, work=work)

    def plan(self, tasks: Sequence[Task], *, round: int, t: float) -> RoundPlan:
        """Which of ``tasks`` (dispatched at ``t``) count, which fail and why, and when the
        round ends (see the module docstring)."""
        if not tasks:
            nxt = self.availability.next_online(t)
            return RoundPlan(round, t, nxt if math.isfinite(nxt) and nxt > t else t, [])
        ids = [task.client_id for task in tasks]
        finish = self.finish_times(tasks, t)
        until = self.availability.until(t)[self._indices(ids)]
        closes = t + self.deadline if self.deadline else math.inf
        offline = (finish > until) & (until < closes)  # gone before the server stops waiting
        late = (finish > closes) & ~offline
        ok = ~offline & ~late
        cut = np.zeros_like(ok)
        end: float | None = None
        if self.over_select:  # the round closes when the first `enough` have finished
            enough = math.ceil(len(tasks) / (1 + self.over_select))
            good = np.flatnonzero(ok)
            if good.size >= enough:
                order = good[np.argsort(finish[good], kind="stable")]
                end = float(finish[order[enough - 1]])
                cut[order[enough:]] = True
                cut |= offline & (until > end)  # still online when the round closed
                offline &= ~cut
                ok &= ~cut
        failed: dict[str, str] = {}
        for i in np.flatnonzero(offline):
            failed[ids[i]] = (f"went offline at {until[i]:.1f} s, before finishing at "
                              f"{finish[i]:.1f} s (simulated)")
        for i in np.flatnonzero(late):
            failed[ids[i]] = (f"not finished by the deadline ({self.deadline:g} s; it needed "
                              f"{finish[i] - t:.1f} s)")
        if cut.any():
            failed.update(dict.fromkeys(
                (ids[i] for i in np.flatnonzero(cut)),
                f"over-selected: the round closed with the first {int(ok.sum())} results"))
        if end is None:  # the last to finish, the deadline, or the last heartbeat heard
            ends = [finish[ok], until[offline], np.array([closes]) if late.any() else None]
            end = max((float(e.max()) for e in ends if e is not None and e.size), default=t)
        kept = [tasks[int(i)] for i in np.flatnonzero(ok)]
        aborted = None
        if len(kept) < self.min_results:
            aborted = (f"round {round}: {len(kept)} of {len(tasks)} clients finished in time "
                       f"on the simulated clock; a round needs at least {self.min_results} "
                       "(server.min_results)")
            failed.update({task.client_id: "not trained: the round was aborted" for task in kept})
            kept = []
        return RoundPlan(round, t, end, kept, failed, aborted)

    def _indices(self, client_ids: Sequence[str]) -> np.ndarray:
        if len(client_ids) == len(self.index) and tuple(client_ids) == self.profiles.client_ids:
            return np.arange(len(client_ids))  # the whole population, in order (every round)
        index = self.index
        return np.fromiter((index[c] for c in client_ids), np.int64, len(client_ids))


def _upload(task: Task, delta: int) -> int:
    """The bytes of the update answering ``task``: its delta (``delta`` bytes, or the model's
    dense size when 0) plus extras the size of the algorithm's payload (SCAFFOLD's control
    variate)."""
    p = task.parameters.vector
    return (delta or p.numel() * p.element_size()) + sum(
        t.numel() * t.element_size() for t in task.payload.values())


def time_to_target(history: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """``time_to_target_s`` (the simulated time at the end of the first round whose
    ``accuracy`` reaches ``target``) and ``updates_to_target`` (client updates aggregated by
    then; an aborted round's count none); both ``None`` if no round reaches it."""
    updates = 0
    for rec in history:
        if rec.get("aborted") is None:
            updates += int(rec.get("clients") or 0)
        acc = rec.get("accuracy")
        if isinstance(acc, (int, float)) and acc >= target:
            return {"target_accuracy": target, "time_to_target_s": rec.get("sim_time_s"),
                    "updates_to_target": updates, "round_to_target": rec.get("round")}
    return {"target_accuracy": target, "time_to_target_s": None, "updates_to_target": None,
            "round_to_target": None}

