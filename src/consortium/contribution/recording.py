"""What the server keeps to value each site: every round's updates, and the round-wise scores.

GTG-Shapley's reconstruction (Liu et al., ACM TIST 2022): the model a coalition ``S`` would
have produced in round ``t`` is the round's starting model plus ``S``'s updates combined as
FedAvg combines them, ``x_t + Σ_{i∈S} wᵢ Δᵢ / Σ_{i∈S} wᵢ`` (the weights are the ones the
aggregator received, normally training-set sizes; a server optimiser other than plain
averaging, and a robust rule, are not replayed: the coalition model is the weighted mean's).
``v(∅)`` is the round's starting model; ``v(N)`` is the full cohort's reconstruction (the
real next model under FedAvg with ``server.lr = 1``). Each round is a game over its
participants; a site's score is the sum over rounds of its round values (sites not sampled
in a round get 0 for it), so for exact Shapley the scores add up to ``Σ_t v_t(N) − v_t(∅)``.

:class:`RecordingAggregator` wraps the pipeline's aggregator and copies each update it is
given (after the server halves of the stages: decompressed, as the rule sees them); it
forwards everything else, so a streaming aggregator keeps streaming and the trained model is
bit-identical with and without recording. :class:`ContributionRecorder` is the round-loop
callback that scores each round when it ends (memory: one round's updates) and, with
``contribution.record = true``, writes them to ``RUN_DIR/contribution/round_NNNNN.safetensors``
(``(n + 1) · d · 4`` bytes per round for ``n`` participants and ``d`` parameters) so that
``consortium contribution RUN_DIR`` can score the run again with another method.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consortium.contribution.shapley import (
    CountingGame,
    Estimate,
    exact_shapley,
    gtg_shapley,
    leave_one_out,
    tmc_shapley,
)
from consortium.data.base import Split
from consortium.errors import CheckpointError, ConfigError
from consortium.seeds import derive_seed
from consortium.types import Parameters, Update

__all__ = [
    "METHODS", "ContributionRecorder", "ModelUtility", "RecordingAggregator", "RoundUpdates",
    "Settings", "benefit", "combine_rounds", "load_rounds", "score_round", "validation_data",
]

METHODS = ("exact-shapley", "gtg-shapley", "tmc-shapley", "leave-one-out")


@dataclass(frozen=True)
class Settings:
    """The ``[contribution]`` parameters an estimator needs (see ``ContributionConfig``)."""

    method: str
    utility: str = "loss"
    permutations: int = 50
    truncation: float = 0.0
    between: float = 0.0
    convergence: float = 0.05
    free_rider: float = 0.1
    seed: int = 0

    @classmethod
    def of(cls, c: Any, *, seed: int, method: str | None = None) -> Settings:
        return cls(method=method or c.method, utility=c.utility, permutations=c.permutations,
                   truncation=c.truncation, between=c.between, convergence=c.convergence,
                   free_rider=c.free_rider, seed=seed)


@dataclass(frozen=True)
class RoundUpdates:
    """One round as the server saw it: the starting model and each participant's update."""

    round: int
    start: torch.Tensor  # [d] float32
    clients: tuple[str, ...]
    deltas: torch.Tensor  # [n, d] float32
    weights: torch.Tensor  # [n] float64

    def coalition(self, members: frozenset[Hashable]) -> torch.Tensor:
        """The reconstructed model of ``members`` (the start itself for ∅)."""
        idx = [i for i, c in enumerate(self.clients) if c in members]
        if not idx:
            return self.start
        w = self.weights[idx]
        total = float(w.sum())
        if total <= 0:
            return self.start
        mean = (w.unsqueeze(1) * self.deltas[idx].to(torch.float64)).sum(0) / total
        return (self.start.to(torch.float64) + mean).to(torch.float32)

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"round_{self.round:05d}.safetensors"
        save_file({"start": self.start.contiguous(), "deltas": self.deltas.contiguous(),
                   "weights": self.weights.contiguous()}, str(path),
                  metadata={"round": str(self.round), "clients": json.dumps(list(self.clients))})
        return path


def load_rounds(directory: Path) -> list[RoundUpdates]:
    """Every ``round_NNNNN.safetensors`` under ``directory``, in round order.

    Raises:
        CheckpointError: none recorded, or a file whose shapes disagree.
    """
    from safetensors import safe_open

    paths = sorted(directory.glob("round_*.safetensors"))
    if not paths:
        raise CheckpointError(
            f"{str(directory)!r} holds no recorded rounds; run the experiment with "
            "contribution.record = true (it stores each round's updates: (n + 1) · d · 4 bytes "
            "per round) to score it afterwards"
        )
    out = []
    for path in paths:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            t = {k: fh.get_tensor(k) for k in ("start", "deltas", "weights")}
        clients = tuple(str(c) for c in json.loads(meta.get("clients", "[]")))
        if t["deltas"].shape != (len(clients), t["start"].numel()) or t["weights"].shape != (
                len(clients),):
            raise CheckpointError(f"{str(path)!r}: its tensors do not match its {len(clients)} clients")
        out.append(RoundUpdates(int(meta.get("round", 0)), t["start"], clients, t["deltas"],
                                t["weights"].to(torch.float64)))
    return out


def validation_data(dataset: Any, source: str) -> Split:
    """The examples the utility is measured on: ``"sites"`` — every site's evaluation split
    (test, or validation under ``data.validation``) pooled, i.e. Σ accuracyᵢ × sizeᵢ / Σ sizeᵢ
    as a federated evaluation computes it; ``"server"`` — the server's own test set.

    Raises:
        ConfigError: ``"server"`` for a data set without a server test set.
    """
    if source == "server":
        test = dataset.server_test
        if test is None or len(test) == 0:
            raise ConfigError(
                f"contribution.validation = \"server\", but data set {dataset.name!r} has no "
                "server test set; set data.server_test_fraction > 0 or use "
                'contribution.validation = "sites" (each site\'s own evaluation split)'
            )
        return test
    splits = [c.test for c in dataset.clients.values() if len(c.test) > 0]
    return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))


WORST_LOSS = 100.0
"""Cross-entropy (nats) beyond which a coalition model counts as broken: the utility of a
model that is not finite, so that one site's absurd update gives finite (very negative)
marginals rather than NaN scores for everyone."""


class ModelUtility:
    """``v(model)``: accuracy, or minus the mean cross-entropy (``utility = "loss"``, capped at
    :data:`WORST_LOSS`), of a parameter vector on ``data``; a non-finite model scores 0
    accuracy or ``−WORST_LOSS``; ``calls`` counts model evaluations."""

    def __init__(self, factory: Callable[[], torch.nn.Module], template: Parameters, data: Split,
                 *, utility: str = "accuracy") -> None:
        with torch.random.fork_rng(devices=[]):  # the run's torch RNG stays untouched
            self.module = factory().eval()
        self.template, self.data, self.utility = template, data, utility
        self.calls = 0

    def __call__(self, vector: torch.Tensor) -> float:
        self.calls += 1
        if not bool(torch.isfinite(vector).all()):  # a site's absurd update: the worst score
            return -WORST_LOSS if self.utility == "loss" else 0.0
        self.template.replace(vector).load_into(self.module)
        with torch.no_grad():
            logits = self.module(self.data.x)
        if not bool(torch.isfinite(logits).all()):
            return -WORST_LOSS if self.utility == "loss" else 0.0
        if self.utility == "loss":
            return -min(float(torch.nn.functional.cross_entropy(logits, self.data.y)), WORST_LOSS)
        return float((logits.argmax(1) == self.data.y).double().mean())


def score_round(rnd: RoundUpdates, evaluate: Callable[[torch.Tensor], float],
                settings: Settings) -> dict[str, Any]:
    """One round's values, standard errors, ``v(∅)``, ``v(N)``, evaluations and seconds."""
    started = time.perf_counter()
    game = CountingGame(lambda s: evaluate(rnd.coalition(s)))
    players = list(rnd.clients)
    rng = np.random.default_rng(derive_seed(settings.seed, "contribution", rnd.round))
    m = settings.method
    est: Estimate
    if m == "exact-shapley":
        est = exact_shapley(players, game)
    elif m == "leave-one-out":
        est = leave_one_out(players, game)
    elif m == "tmc-shapley":
        est = tmc_shapley(players, game, permutations=settings.permutations,
                          truncation=settings.truncation, rng=rng)
    elif m == "gtg-shapley":
        est = gtg_shapley(players, game, max_permutations=settings.permutations,
                          truncation=settings.truncation, between=settings.between,
                          convergence=settings.convergence, rng=rng)
    else:
        raise ConfigError(f"contribution.method = {m!r} is not one of {', '.join(METHODS)}")
    everyone = frozenset(players)
    return {
        "round": rnd.round, "values": {str(k): v for k, v in est.values.items()},
        "standard_error": {str(k): v for k, v in est.standard_error.items()},
        "empty": game(frozenset()), "full": game(everyone), "evaluations": game.evaluations,
        "permutations": est.permutations, "truncated": est.truncated,
        "seconds": time.perf_counter() - started,
    }


def combine_rounds(rounds: Sequence[Mapping[str, Any]], sites: Sequence[str],
                   settings: Settings) -> dict[str, Any]:
    """Scores over the run: each site's round values summed, standard errors in quadrature,
    and the free-rider / low-quality flag.

    A site is ``flagged`` (harmful, or a free rider) when even the upper end of its score's
    interval, ``score + 2 · standard error``, is at most ``free_rider`` × the fair share
    ``max(Σ_t v_t(N) − v_t(∅), 0) / n``: its score is then below that share (negative
    scores included) beyond the method's stated error. A score whose interval
    ``score ± 2 · SE`` holds 0 but that is not flagged is *undetermined*: listed in
    ``indistinguishable``, not flagged — a sampled estimate's noise (GTG and TMC with few
    permutations over many small sites) must not flag honest sites; more permutations
    separate them. For exact Shapley and leave-one-out (SE 0) the rule is ``score ≤
    free_rider × share``, so a score ≤ 0 is always flagged."""
    scores = dict.fromkeys(sites, 0.0)
    var = dict.fromkeys(sites, 0.0)
    for r in rounds:
        for c, v in r["values"].items():
            scores[c] = scores.get(c, 0.0) + float(v)
            var[c] = var.get(c, 0.0) + float(r["standard_error"].get(c, 0.0)) ** 2
    se = {c: math.sqrt(v) for c, v in var.items()}
    total = sum(float(r["full"]) - float(r["empty"]) for r in rounds)
    share = max(total, 0.0) / max(len(scores), 1)
    flagged = sorted(c for c, s in scores.items() if s + 2 * se[c] <= settings.free_rider * share)
    indistinguishable = sorted(c for c, s in scores.items()
                               if c not in flagged and abs(s) <= 2 * se[c])
    ranking = sorted(scores, key=lambda c: -scores[c])
    return {
        "method": settings.method, "utility": settings.utility, "scores": scores,
        "standard_error": se, "flagged": flagged, "indistinguishable": indistinguishable,
        "ranking": ranking,
        "total": total, "rounds": len(rounds),
        "evaluations": int(sum(int(r["evaluations"]) for r in rounds)),
        "seconds": float(sum(float(r["seconds"]) for r in rounds)),
        "truncated_rounds": int(sum(bool(r.get("truncated")) for r in rounds)),
    }


def benefit(per_client: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, float], str | None]:
    """Each site's accuracy with the federated model — its personalised one where the run has
    it — minus its local-only baseline's (``summary.json``'s ``per_client``); ``({}, None)``
    without the local baseline (``evaluation.baselines`` must name ``"local"``)."""
    out: dict[str, float] = {}
    basis = None
    personal = any("personalized_accuracy" in m for m in per_client.values())
    key = "personalized_accuracy" if personal else "global_accuracy"
    for cid, m in per_client.items():
        if isinstance(m.get(key), (int, float)) and isinstance(m.get("local_accuracy"), (int, float)):
            out[cid] = float(m[key]) - float(m["local_accuracy"])
            basis = "personalized" if personal else "global"
    return out, basis


@dataclass
class RecordingAggregator:
    """The pipeline's aggregator, unchanged, with a copy of each update handed to ``sink``.

    Forwards every attribute, so ``hasattr(·, "accumulate")`` (streaming) and ``init``
    (stateful) answer as ``inner`` does and the :class:`~consortium.aggregation.base.Pipeline`
    runs exactly as without it."""

    inner: Any
    sink: Callable[[Update], None]

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "sink"):  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        attr = getattr(self.inner, name)
        if name == "accumulate":
            def accumulate(acc: Any, update: Update) -> Any:
                self.sink(update)
                return attr(acc, update)
            return accumulate
        if name == "aggregate":
            def aggregate(updates: list[Update], **kwargs: Any) -> Any:
                for u in updates:
                    self.sink(u)
                return attr(updates, **kwargs)
            return aggregate
        return attr


@dataclass
class ContributionRecorder:
    """Round-loop callback: scores each round when it ends from the updates its
    :meth:`sink` received, keeps the round results (``rounds.jsonl`` in ``directory``, read
    back on resume) and, with ``record``, the round's updates (:meth:`RoundUpdates.save`)."""

    settings: Settings
    evaluate: Callable[[torch.Tensor], float]
    start: torch.Tensor
    sites: Sequence[str]
    directory: Path | None = None
    record: bool = False
    rounds: list[dict[str, Any]] = field(default_factory=list)
    pending: list[tuple[str, torch.Tensor, float]] = field(default_factory=list)
    kept: list[RoundUpdates] | None = None
    """A deployment's recorder (``None`` in simulation): the rounds' updates, kept for scoring
    with the sites after the last round (:func:`consortium.deploy.interpret.
    deployed_contribution`; ``evaluate`` is then unused)."""

    def resume(self, round: int) -> None:
        """Keep the scores of rounds up to ``round`` from ``rounds.jsonl`` (a resumed run)."""
        path = self._log
        if path is None or self.directory is None:
            return
        if self.kept is None and not path.exists():
            return
        if self.kept is not None:  # a deployment: the recorded rounds (contribution.record)
            self.kept = [r for r in load_rounds(self.directory) if r.round <= round] if any(
                self.directory.glob("round_*.safetensors")) else []
            return
        kept = [r for r in (json.loads(line) for line in path.read_text().splitlines() if line)
                if int(r["round"]) <= round]
        self.rounds = kept
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    @property
    def _log(self) -> Path | None:
        return self.directory / "rounds.jsonl" if self.directory is not None else None

    def sink(self, update: Update) -> None:
        self.pending.append((update.client_id, update.delta.detach().to(torch.float32).clone(),
                             float(update.weight)))

    def on_round_end(self, record: Mapping[str, Any], state: Any) -> None:
        pending, self.pending = self.pending, []
        start, self.start = self.start, state.params.vector.detach().clone()
        if record.get("aborted") or not pending:
            return
        rnd = RoundUpdates(
            round=int(state.round), start=start, clients=tuple(c for c, _, _ in pending),
            deltas=torch.stack([d for _, d, _ in pending]),
            weights=torch.tensor([w for _, _, w in pending], dtype=torch.float64),
        )
        if self.record and self.directory is not None:
            rnd.save(self.directory)
        if self.kept is not None:  # scored with the sites after the last round
            self.kept.append(rnd)
            return
        result = score_round(rnd, self.evaluate, self.settings)
        self.rounds.append(result)
        if self._log is not None:
            self._log.parent.mkdir(parents=True, exist_ok=True)
            with self._log.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(result) + "\n")

    def summary(self, per_client: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """``summary.json``'s ``contribution``: :func:`combine_rounds` and :func:`benefit`."""
        if self.kept is not None:
            return {"method": self.settings.method, "utility": self.settings.utility,
                    "pending": "scored with the sites after the last round"}
        out = combine_rounds(self.rounds, self.sites, self.settings)
        out["benefit"], out["benefit_basis"] = benefit(per_client)
        out["recorded"] = bool(self.record and self.directory is not None)
        return out
