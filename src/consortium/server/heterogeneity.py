"""Systems heterogeneity in simulation: some clients of each round do less local work, some drop out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from consortium.errors import ConfigError, RoundAborted
from consortium.messages import Result, Task
from consortium.seeds import derive_seed

__all__ = ["Dropouts", "Stragglers"]


@dataclass(frozen=True)
class Stragglers:
    """A ``fraction`` of each round's participants are stragglers doing a random share of
    their planned local steps, uniform in (0, 1] (at least one step).

    This follows the systems-heterogeneity setup of Li et al. 2020 (FedProx, §5.2), where a
    share of devices runs fewer local iterations than the others instead of being dropped.
    """

    fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ConfigError(f"simulation.stragglers = {self.fraction} must be in [0, 1]")

    def work(self, round: int, participants: Sequence[str], *, seed: int) -> dict[str, float]:
        """Fraction of planned steps for each participant (1.0 for the others)."""
        out = {cid: 1.0 for cid in participants}
        k = round_half_up(self.fraction * len(participants))
        if k == 0:
            return out
        rng = np.random.default_rng(derive_seed(seed, "stragglers", round))
        chosen = rng.choice(len(participants), size=k, replace=False)
        shares = 1.0 - rng.random(k)  # uniform in (0, 1]
        for i, share in zip(chosen, shares):
            out[participants[int(i)]] = float(share)
        return out


@dataclass(frozen=True)
class Dropouts:
    """Sampled clients that fail to answer (simulation), ``simulation.dropout``.

    ``during = "training"`` (a pipeline without an interactive stage): each sampled client
    fails to return its update with probability ``rate``, decided from the seed, round and
    client id. It is not trained (as if it crashed before finishing: its client state stays),
    the round goes on without it, and ``failed`` in ``metrics.jsonl`` names it; a round whose
    every client dropped is aborted (the model stays). This is the client unavailability of
    Bonawitz et al., "Towards Federated Learning at Scale" (SysML 2019), and what
    :class:`Stragglers` do not model.

    ``during = "protocol"`` (secure aggregation): every client still in the round drops out
    at each phase of the exchange (keys, shares, masked input, unmask) with probability
    ``rate``, decided from the seed, round, phase and client id; once dropped it stays silent
    for the rest of the round. This is the failure SecAgg+ is built to survive (Bell et al.
    2020): with too many drops the round aborts and the run goes on. The closing ``end``
    message is always delivered (it frees the simulated client's memory).
    """

    rate: float = 0.0
    during: Literal["training", "protocol"] = "protocol"

    def __post_init__(self) -> None:
        if not 0 <= self.rate < 1:
            raise ConfigError(f"simulation.dropout = {self.rate} must be in [0, 1)")
        if self.during not in ("training", "protocol"):
            raise ConfigError(f"Dropouts.during = {self.during!r}: expected 'training' or 'protocol'")

    @classmethod
    def of(cls, rate: float, pipeline: Any) -> Dropouts:
        """The dropouts for ``pipeline``: in its protocol if a stage is interactive (it has a
        ``respond`` half, as secure aggregation does), else of the training results."""
        interactive = any(hasattr(s, "respond") for s in getattr(pipeline, "stages", ()))
        return cls(rate, "protocol" if interactive else "training")

    def fit(
        self, executor: Any, tasks: Sequence[Task], clients: Any, *, round: int, seed: int
    ) -> Iterator[Result]:
        """``executor.fit(tasks, clients)`` with this round's training dropouts: the dropped
        clients' tasks are not run, each answered by a :class:`Result` without an update.

        Raises:
            RoundAborted: every task of the round dropped (after yielding their results).
        """
        if self.rate == 0 or self.during != "training" or not tasks:
            return executor.fit(tasks, clients)
        gone = {t.client_id for t in tasks if self.drops(round, t.client_id, seed=seed)}
        return self._fit_without(executor, tasks, clients, gone)

    def drops(self, round: int, client_id: str, *, seed: int) -> bool:
        """Whether ``client_id`` fails to return its update in ``round`` (training mode)."""
        rng = np.random.default_rng(derive_seed(seed, "dropout", round, "training", client_id))
        return bool(rng.random() < self.rate)

    def _fit_without(
        self, executor: Any, tasks: Sequence[Task], clients: Any, gone: set[str]
    ) -> Iterator[Result]:
        kept = [t for t in tasks if t.client_id not in gone]
        if kept:
            yield from executor.fit(kept, clients)
        for task in tasks:
            if task.client_id in gone:
                yield Result(task.round, task.client_id, None, error=(
                    f"dropped out: no update returned (simulation.dropout = {self.rate:g})"))
        if not kept:
            raise RoundAborted(f"round {tasks[0].round}: all {len(tasks)} sampled clients "
                               f"dropped out (simulation.dropout = {self.rate:g})")

    def wrap(self, exchange: Any, *, round: int, seed: int) -> Any:
        """``exchange`` with this round's dropouts applied (protocol mode)."""
        if self.rate == 0 or self.during != "protocol":
            return exchange
        gone: set[str] = set()

        def dropping(
            stage: str, phase: str, messages: Mapping[str, Any]
        ) -> Iterator[tuple[str, Any]]:
            if phase != "end":
                for cid in sorted(messages):
                    rng = np.random.default_rng(derive_seed(seed, "dropout", round, phase, cid))
                    if rng.random() < self.rate:
                        gone.add(cid)
                messages = {c: m for c, m in messages.items() if c not in gone}
            return exchange(stage, phase, messages)

        return dropping


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))
