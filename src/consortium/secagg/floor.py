"""A site's own minimums for secure aggregation, which the server's configuration can raise but never lower.

The server proposes each round's :class:`~consortium.secagg.protocol.SecAggConfig` (Shamir
threshold, neighbour count). Against a malicious server (Bonawitz et al. 2017, §6; Bell et
al. 2020) those numbers are the attack surface: a threshold of 1 lets any one colluding
neighbour unmask a site, and a cohort of one other site makes "the sum" that site's input.
A :class:`SecAggFloor` is what a site checks every config against before it reveals anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from consortium.errors import ConfigError

__all__ = ["SecAggFloor"]


@dataclass(frozen=True)
class SecAggFloor:
    """The least a site accepts in a SecAgg+ round (checked by ``SecAggClient``).

    Attributes:
        min_threshold: the Shamir threshold must be at least ``ceil(min_threshold · k)`` for
            ``k`` neighbours. Default 2/3, the bound of Bonawitz et al. 2017's active-adversary
            analysis: to learn a site's input the server needs ``t`` of its neighbours to reveal
            shares of its self-mask seed ``b`` and ``t`` to reveal shares of its mask key ``s``.
            An honest neighbour reveals one of the two for any one client and refuses the
            other, so two disjoint groups of honest neighbours, each joined by the ``c``
            colluding ones, must reach ``t``: the attack needs ``2t <= k + c`` (and one more
            neighbour with the consistency round, since the victim signs only survivor sets
            that hold it). With ``t >= 2k/3`` it needs ``c >= k/3`` colluders among the
            neighbours: Bonawitz et al.'s ``t > 2n/3`` against fewer than ``n/3`` corrupt
            clients, with ``n`` replaced by the neighbourhood of SecAgg+ (Bell et al. 2020).
            1/2 (the simulation default) protects against an honest-but-curious server only:
            at ``t = k/2`` two dropout stories told to two halves of the neighbours unmask a
            client when nothing else stops them (``tests/secagg/test_malicious.py``).
        min_neighbours: the neighbour count must be at least ``min(min_neighbours, n - 1)``
            for ``n`` participants, so below ``min_neighbours + 1`` participants the graph is
            complete (the original SecAgg). Default 128: Bell et al. 2020 size the neighbourhood
            so that a random one holds too many colluders only with probability ``2^-σ``
            (σ = 40 bits of statistical security); with a tenth of the sites colluding and the
            2/3 threshold above (``2t - k`` colluders break it), the binomial tail
            ``P[Bin(k, 0.1) >= 2t - k]`` is below ``2^-40`` for every ``k >= 127``. The margin
            matters because the server chooses the graph seed and can try many. Consortia of up
            to 129 sites therefore use the complete graph unless a site lowers this.
        min_cohort: when > 0, the site sends its masked input only if at least
            ``min_cohort - 1`` other participants proved themselves with valid signed keys
            (counted from signatures its trust anchor verified, never from what the server
            says), and helps unmask only a sum over at least ``min_cohort`` survivors. Needs
            signatures (a ``TrustAnchor``).
        require_signatures: refuse to take part without authenticated keys (an identity to
            sign with and a trust anchor to check the neighbours).

    Raises:
        ConfigError: a value out of range.
    """

    min_threshold: float = 2 / 3
    min_neighbours: int = 128
    min_cohort: int = 0
    require_signatures: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.min_threshold <= 1:
            raise ConfigError(
                f"expected SecAggFloor.min_threshold as a fraction in [0, 1], found "
                f"{self.min_threshold!r}"
            )
        for name in ("min_neighbours", "min_cohort"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"expected SecAggFloor.{name} as an int >= 0, found {value!r}")

    def least_threshold(self, neighbours: int) -> int:
        """The smallest Shamir threshold this site accepts among ``neighbours`` neighbours."""
        return max(1, math.ceil(self.min_threshold * neighbours))

    def refusal(self, *, threshold: int, neighbours: int, participants: int) -> str | None:
        """Why a round with these parameters is below this floor, or ``None`` if it is not.

        Args:
            threshold: the Shamir threshold the server asks for.
            neighbours: the number of neighbours each client has.
            participants: the number of clients in the round (``n``).
        """
        least = self.least_threshold(neighbours)
        if threshold < least:
            return (
                f"the threshold {threshold} is below this site's floor of at least {least} of "
                f"{neighbours} neighbours (min_threshold {self.min_threshold:.3g}); the server "
                "must ask for a higher threshold"
            )
        fewest = min(self.min_neighbours, participants - 1)
        if neighbours < fewest:
            return (
                f"{neighbours} neighbours among {participants} participants is below this "
                f"site's floor of {fewest} (min_neighbours {self.min_neighbours}); the server "
                "must use more neighbours (0: every other client)"
            )
        return None
