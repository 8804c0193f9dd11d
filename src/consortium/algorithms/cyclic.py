"""Cyclic weight transfer: the model travels from client to client, one client per round.

Chang et al. (2018), "Distributed deep learning networks among institutions for medical
imaging" (JAMIA 25(8)), train one model at each institution in turn; FLamby (Ogier du Terrail
et al., NeurIPS 2022 Datasets and Benchmarks) reports it as "Cyclic", reshuffling the order
of the clients at the start of every cycle. In our seams it is not a new local algorithm but
a sampler: FedAvg's local training at the one client the cycle names, and the server's SGD
step with ``lr = 1`` makes that client's trained model the next round's global model
(``sampling.cycle = "shuffled"`` or ``"fixed"``; see :func:`cyclic_sampler`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from consortium.errors import ConfigError
from consortium.seeds import derive_seed

__all__ = ["CyclicSampler", "cyclic_sampler"]


@dataclass(frozen=True)
class CyclicSampler:
    """Round ``r`` (from 1) trains client ``order_c[(r − 1) mod n]`` of cycle
    ``c = (r − 1) div n``; ``shuffle``: each cycle's order is a seeded permutation (drawn from
    the run seed and the cycle), else the data set's order."""

    shuffle: bool = True

    def size(self, population: int) -> int:
        return 1

    def expected_size(self, population: int) -> float:
        return 1.0

    def order(self, cycle: int, population: int, *, seed: int) -> list[int]:
        """The clients' positions in cycle ``cycle`` (from 0)."""
        if not self.shuffle:
            return list(range(population))
        rng = np.random.default_rng(derive_seed(seed, "cycle", cycle))
        return [int(i) for i in rng.permutation(population)]

    def sample(self, round: int, client_ids: Sequence[str], *, seed: int) -> list[str]:
        n = len(client_ids)
        if n == 0:
            return []
        cycle, position = divmod(max(round, 1) - 1, n)
        return [client_ids[self.order(cycle, n, seed=seed)[position]]]


def cyclic_sampler(cycle: str, *, server_optimizer: str, server_lr: float,
                   clients_per_round: int, fraction: float,
                   dp_sampler: bool = False) -> CyclicSampler:
    """The sampler for ``sampling.cycle``, after checking that the rest of the experiment
    makes it cyclic weight transfer.

    Raises:
        ConfigError: ``cycle`` is unknown, a round size is also set, DP chooses the
            sampler (``dp_sampler``: its accountant assumes its own sampling), or the server
            step is not plain SGD with ``lr = 1`` (the model would not pass on unchanged).
    """
    if dp_sampler:
        raise ConfigError(
            "sampling.cycle cannot be combined with central or distributed DP, whose accountant "
            "assumes its own client sampling; set sampling.cycle = \"\" or turn privacy off"
        )
    if cycle not in ("shuffled", "fixed"):
        raise ConfigError(f"sampling.cycle = {cycle!r}; expected \"shuffled\", \"fixed\" or \"\"")
    if clients_per_round not in (0, 1) or fraction:
        raise ConfigError(
            "sampling.cycle trains one client per round; remove sampling.clients_per_round "
            "and sampling.fraction (or set clients_per_round = 1)"
        )
    if server_optimizer != "sgd" or server_lr not in (0.0, 1.0):
        raise ConfigError(
            f"sampling.cycle passes each client's model on unchanged, which needs server.optimizer"
            f" = \"sgd\" with server.lr = 1; found {server_optimizer!r} with lr = {server_lr}"
        )
    return CyclicSampler(shuffle=cycle == "shuffled")
