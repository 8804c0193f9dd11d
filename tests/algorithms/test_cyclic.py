"""Cyclic weight transfer as a sampler (consortium.algorithms.cyclic, issue 21)."""

from __future__ import annotations

import pytest
import torch

from consortium.algorithms.cyclic import CyclicSampler, cyclic_sampler
from consortium.errors import ConfigError
from consortium.simulation import simulate

IDS = ["a", "b", "c", "d"]


def test_fixed_cycle_visits_clients_in_order() -> None:
    sampler = CyclicSampler(shuffle=False)
    assert [sampler.sample(r, IDS, seed=0)[0] for r in range(1, 10)] == [*IDS, *IDS, "a"]


def test_shuffled_cycle_visits_every_client_once_per_cycle() -> None:
    sampler = CyclicSampler(shuffle=True)
    seen = [sampler.sample(r, IDS, seed=3)[0] for r in range(1, 41)]
    cycles = [seen[i:i + 4] for i in range(0, 40, 4)]
    assert all(sorted(c) == IDS for c in cycles)
    assert len({tuple(c) for c in cycles}) > 1  # reshuffled, not one fixed order
    assert seen == [sampler.sample(r, IDS, seed=3)[0] for r in range(1, 41)]  # seeded
    assert seen != [sampler.sample(r, IDS, seed=4)[0] for r in range(1, 41)]


def test_cycle_needs_plain_server_sgd_and_one_client() -> None:
    ok = {"server_optimizer": "sgd", "server_lr": 1.0, "clients_per_round": 0, "fraction": 0.0}
    assert cyclic_sampler("fixed", **ok) == CyclicSampler(shuffle=False)
    with pytest.raises(ConfigError, match="server.lr = 1"):
        cyclic_sampler("shuffled", **{**ok, "server_optimizer": "adam"})
    with pytest.raises(ConfigError, match="server.lr = 1"):
        cyclic_sampler("shuffled", **{**ok, "server_lr": 0.5})
    with pytest.raises(ConfigError, match="one client per round"):
        cyclic_sampler("shuffled", **{**ok, "clients_per_round": 2})
    with pytest.raises(ConfigError, match="DP"):
        cyclic_sampler("shuffled", **ok, dp_sampler=True)
    with pytest.raises(ConfigError, match="expected"):
        cyclic_sampler("random", **ok)


def _run(rounds: int) -> tuple[torch.Tensor, list[dict]]:
    result = simulate(None, overrides=[
        f"rounds={rounds}", "sampling.clients_per_round=0", "sampling.cycle=\"fixed\"",
        "evaluation.baselines=[]", "executor.kind=\"sequential\""], report=False)
    return result.params.vector.clone(), result.history


def test_the_model_travels_from_client_to_client() -> None:
    """Each round trains one hospital, starting from the model the previous one left."""
    first, history = _run(1)
    second, history2 = _run(2)
    assert [h["clients"] for h in history2] == [1, 1]
    assert not torch.equal(first, second)
    third, _ = _run(2)
    assert torch.equal(second, third)  # reproducible
    # round 1 is the first hospital alone: the same as FedAvg with only that hospital
    from consortium.data._assemble import ClientArrays, assemble
    from consortium.data.heart_disease import load_heart_disease

    full = load_heart_disease(seed=0)
    c = full.clients["cleveland"]
    one = assemble("heart-disease", [ClientArrays("cleveland", c.train.x.numpy(),
                                                  c.train.y.numpy(), c.test.x.numpy(),
                                                  c.test.y.numpy())],
                   num_classes=2, input_shape=full.input_shape)
    alone = simulate(None, overrides=["rounds=1", "sampling.clients_per_round=0",
                                      "evaluation.baselines=[]", "executor.kind=\"sequential\""],
                     dataset=one, report=False)
    assert torch.equal(first, alone.params.vector)
