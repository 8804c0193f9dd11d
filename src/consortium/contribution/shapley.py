"""Shapley values of a cooperative game: exact, truncated Monte Carlo, GTG-Shapley and leave-one-out.

A *game* is a utility ``v`` over coalitions (frozensets of players). Each estimator returns
:class:`Estimate`: one value per player, its standard error (0 for exact methods) and the
number of distinct coalitions whose utility was computed — the cost that matters when every
utility is a model evaluation. Utilities are cached per coalition (:class:`CountingGame`), so
an estimator never pays twice for the same coalition.

- :func:`exact_shapley`: all ``2^n`` coalitions (Shapley 1953), refused beyond
  :data:`MAX_EXACT_PLAYERS`.
- :func:`tmc_shapley`: truncated Monte Carlo over random permutations (Ghorbani & Zou, "Data
  Shapley: Equitable Valuation of Data for Machine Learning", ICML 2019): once a prefix's
  utility is within ``truncation`` of ``v(N)`` the remaining players' marginals are taken as 0.
- :func:`gtg_shapley`: Liu et al., "GTG-Shapley: Efficient and Accurate Participant
  Contribution Evaluation in Federated Learning", ACM TIST 2022 (Algorithm 1): between-round
  truncation (a round whose ``|v(N) − v(∅)|`` is below ``between`` gives every player 0),
  within-round truncation as TMC's, guided permutations (every player leads once per cycle of
  ``n`` permutations) and a convergence stop.
- :func:`leave_one_out`: ``v(N) − v(N ∖ {i})``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from consortium.errors import ConfigError

__all__ = [
    "MAX_EXACT_PLAYERS", "CountingGame", "Estimate", "exact_shapley", "gtg_shapley",
    "leave_one_out", "tmc_shapley",
]

MAX_EXACT_PLAYERS = 10
"""Exact Shapley evaluates ``2^n`` coalitions: 1,024 at 10 players (per round)."""

Utility = Callable[[frozenset[Hashable]], float]


@dataclass
class CountingGame:
    """A utility with a per-coalition cache; ``evaluations`` counts the distinct coalitions."""

    utility: Utility
    cache: dict[frozenset[Hashable], float] = field(default_factory=dict)

    def __call__(self, coalition: frozenset[Hashable]) -> float:
        if coalition not in self.cache:
            self.cache[coalition] = float(self.utility(coalition))
        return self.cache[coalition]

    @property
    def evaluations(self) -> int:
        return len(self.cache)


@dataclass(frozen=True)
class Estimate:
    """Per-player values, their standard errors, the coalitions evaluated, permutations drawn."""

    values: dict[Hashable, float]
    standard_error: dict[Hashable, float]
    evaluations: int
    permutations: int = 0
    truncated: bool = False
    """GTG's between-round truncation: the round was skipped (every value 0)."""


def _game(v: Utility | CountingGame) -> CountingGame:
    return v if isinstance(v, CountingGame) else CountingGame(v)


def exact_shapley(players: Sequence[Hashable], v: Utility | CountingGame) -> Estimate:
    """The Shapley value of each player, from every coalition's utility (Shapley 1953):
    ``φᵢ = Σ_{S ⊆ N∖{i}} |S|! (n−|S|−1)! / n! · (v(S ∪ {i}) − v(S))``.

    Raises:
        ConfigError: more than :data:`MAX_EXACT_PLAYERS` players (``2^n`` evaluations).
    """
    n = len(players)
    if n > MAX_EXACT_PLAYERS:
        raise ConfigError(
            f"exact Shapley over {n} players needs 2^{n} = {2**n:,} model evaluations per "
            f"round; it is offered up to {MAX_EXACT_PLAYERS} players. Use contribution.method = "
            '"gtg-shapley" or "tmc-shapley" (sampled, with a standard error) or '
            '"leave-one-out" (n + 1 evaluations)'
        )
    game = _game(v)
    masks = np.arange(1 << n)
    utility = np.array([
        game(frozenset(p for j, p in enumerate(players) if m >> j & 1)) for m in masks
    ])
    sizes = np.array([bin(int(m)).count("1") for m in masks])
    fact = [math.factorial(k) for k in range(n + 1)]
    weight = np.array([fact[s] * fact[n - s - 1] / fact[n] if s < n else 0.0 for s in sizes])
    values: dict[Hashable, float] = {}
    for j, p in enumerate(players):
        without = masks[(masks >> j & 1) == 0]
        values[p] = float(np.sum(weight[without] * (utility[without | (1 << j)] - utility[without])))
    return Estimate(values, dict.fromkeys(players, 0.0), game.evaluations)


def leave_one_out(players: Sequence[Hashable], v: Utility | CountingGame) -> Estimate:
    """``v(N) − v(N ∖ {i})`` for each player (n + 1 evaluations; not a Shapley value: two
    sites that duplicate each other both score ~0, since each is replaceable by the other)."""
    game = _game(v)
    everyone = frozenset(players)
    full = game(everyone)
    values = {p: full - game(everyone - {p}) for p in players}
    return Estimate(values, dict.fromkeys(players, 0.0), game.evaluations)


def _permutation_marginals(
    order: Sequence[Hashable], game: CountingGame, *, full: float, empty: float, truncation: float,
) -> dict[Hashable, float]:
    """Marginal contributions along one permutation, 0 once the prefix is within
    ``truncation`` of ``v(N)`` (Ghorbani & Zou 2019; GTG's within-round truncation)."""
    out: dict[Hashable, float] = {}
    prefix: set[Hashable] = set()
    before = empty
    for p in order:
        prefix.add(p)
        if abs(full - before) < truncation:
            out[p] = 0.0
            continue
        after = game(frozenset(prefix))
        out[p] = after - before
        before = after
    return out


def _summarise(
    players: Sequence[Hashable], samples: list[dict[Hashable, float]], game: CountingGame,
) -> Estimate:
    m = np.array([[s[p] for p in players] for s in samples])
    k = len(samples)
    se = m.std(axis=0, ddof=1) / math.sqrt(k) if k > 1 else np.zeros(len(players))
    return Estimate(
        {p: float(x) for p, x in zip(players, m.mean(axis=0))},
        {p: float(x) for p, x in zip(players, se)}, game.evaluations, permutations=k,
    )


def tmc_shapley(
    players: Sequence[Hashable], v: Utility | CountingGame, *, permutations: int,
    truncation: float, rng: np.random.Generator,
) -> Estimate:
    """Truncated Monte Carlo Shapley (Ghorbani & Zou, ICML 2019): the mean marginal
    contribution over ``permutations`` uniformly random orders, each truncated once the
    prefix's utility is within ``truncation`` (absolute) of ``v(N)``; the standard error is
    the marginals' standard deviation over ``√permutations``."""
    game = _game(v)
    full, empty = game(frozenset(players)), game(frozenset())
    samples = [
        _permutation_marginals([players[i] for i in rng.permutation(len(players))], game,
                               full=full, empty=empty, truncation=truncation)
        for _ in range(permutations)
    ]
    return _summarise(players, samples, game)


def gtg_shapley(
    players: Sequence[Hashable], v: Utility | CountingGame, *, max_permutations: int,
    truncation: float, between: float, convergence: float, rng: np.random.Generator,
    window: int = 10,
) -> Estimate:
    """GTG-Shapley for one round (Liu et al., ACM TIST 2022, Algorithm 1).

    Between-round truncation: ``|v(N) − v(∅)| < between`` → every value 0 (the round moved
    the model too little to be worth valuing). Otherwise guided permutations (each cycle of
    ``n`` permutations gives every player the lead once, in a random order; the rest of a
    permutation uniformly shuffled), each truncated within
    the round like TMC's, until the running estimate's mean absolute change over the last
    ``window`` permutations is below ``convergence`` × its mean absolute value, checked after
    each whole cycle of ``n`` leaders (at most ``max_permutations``; set it to a multiple of
    ``n`` to keep the leads balanced when the cap is reached).
    """
    game = _game(v)
    n = len(players)
    full, empty = game(frozenset(players)), game(frozenset())
    if abs(full - empty) < between:
        zeros = dict.fromkeys(players, 0.0)
        return Estimate(zeros, dict(zeros), game.evaluations, truncated=True)
    samples: list[dict[Hashable, float]] = []
    running: list[np.ndarray] = []
    total = np.zeros(n)
    leads = rng.permutation(n)
    for k in range(max_permutations):
        if k and k % n == 0:  # a new cycle of leaders, in a fresh random order
            leads = rng.permutation(n)
        lead = int(leads[k % n])
        rest = [i for i in rng.permutation(n) if i != lead]
        marginals = _permutation_marginals(
            [players[lead]] + [players[i] for i in rest], game, full=full, empty=empty,
            truncation=truncation,
        )
        samples.append(marginals)
        total += np.array([marginals[p] for p in players])
        running.append(total / (k + 1))
        # only after whole cycles of leaders: an unbalanced count of leads biases the
        # estimate towards the over-represented players' singleton marginals
        if (k + 1) % n == 0 and k >= window:
            change = np.mean(np.abs(running[-1] - running[-1 - window]))
            if change <= convergence * max(float(np.mean(np.abs(running[-1]))), 1e-12):
                break
    return _summarise(players, samples, game)
