"""``simulation.dropout`` acts on training: sampled clients fail to return their update.

Issue 14, point 5: it did nothing unless secure aggregation was on.
"""

from __future__ import annotations

import math

import pytest
import torch

import consortium
from consortium.errors import ConfigError, RoundAborted
from consortium.messages import Result, Task
from consortium.server.heterogeneity import Dropouts
from consortium.types import Parameters, Update

CLIENTS = 20
ROUNDS = 30


def _run(dropout: float, *, seed: int = 0) -> consortium.SimulationResult:
    return consortium.simulate({
        "seed": seed, "rounds": ROUNDS,
        "data": {"dataset": "synthetic", "clients": CLIENTS,
                 "samples_per_client": 20},
        "algorithm": {"batch_size": 10, "local_steps": 1},
        "sampling": {"clients_per_round": CLIENTS},
        "evaluation": {"baselines": [], "every": ROUNDS},
        "executor": {"kind": "sequential"},
        "simulation": {"dropout": dropout},
    })


def test_dropout_without_secure_aggregation_drops_that_share_of_updates_and_records_them() -> None:
    result = _run(0.3)
    missing = 0
    for record in result.history:
        failed = record.get("failed") or {}
        assert record["clients"] + len(failed) == CLIENTS  # every sampled client accounted for
        assert all("dropped out" in why and "simulation.dropout = 0.3" in why
                   for why in failed.values()), failed
        missing += len(failed)
    n = CLIENTS * ROUNDS
    sd = math.sqrt(n * 0.3 * 0.7)  # Binomial(600, 0.3): mean 180, sd 11.2
    assert abs(missing - 0.3 * n) < 4.5 * sd, missing  # fails by chance with p < 1e-5
    # decided from (seed, round, client): the same run drops the same clients
    dropouts = Dropouts(0.3, "training")
    for record in result.history:
        expected = {f for f in _ids(result) if dropouts.drops(record["round"], f, seed=0)}
        assert set(record.get("failed") or {}) == expected


def _ids(result: consortium.SimulationResult) -> list[str]:
    from consortium.data import load_dataset

    return list(load_dataset(result.config.data, seed=result.config.seed).client_ids)


def test_dropped_updates_are_left_out_of_the_aggregate() -> None:
    """A run with dropouts ends on another model than one without (the updates are missing),
    and the bytes of a dropped client's update are not counted."""
    with_drop, without = _run(0.3), _run(0.0)
    assert not torch.equal(with_drop.params.vector, without.params.vector)
    per_update = without.history[0]["bytes_up"] / CLIENTS
    for record in with_drop.history:
        assert record["bytes_up"] == pytest.approx(per_update * record["clients"])
        assert record["bytes_down"] == without.history[0]["bytes_down"]  # every task was sent


class _Echo:
    """An executor that answers every task with a unit update."""

    name = "echo"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def fit(self, tasks, clients):  # type: ignore[no-untyped-def]
        for t in tasks:
            self.asked.append(t.client_id)
            yield Result(t.round, t.client_id, Update(t.client_id, torch.ones(1), 1.0))


def _tasks(n: int, rnd: int = 1) -> list[Task]:
    params = Parameters.from_module(torch.nn.Linear(1, 1, bias=False))
    return [Task(round=rnd, client_id=f"c{i}", parameters=params, seed=i) for i in range(n)]


def test_a_dropped_client_is_not_trained_and_zero_changes_nothing() -> None:
    tasks = _tasks(50)
    executor = _Echo()
    results = list(Dropouts(0.5, "training").fit(executor, tasks, {}, round=3, seed=1))
    dropped = [r.client_id for r in results if r.update is None]
    assert 0 < len(dropped) < 50
    assert sorted(executor.asked + dropped) == sorted(t.client_id for t in tasks)
    assert not set(executor.asked) & set(dropped)
    # rate 0, or the protocol mode: the executor's own iterator, untouched
    marker = iter(())

    class Plain:
        def fit(self, tasks, clients):  # type: ignore[no-untyped-def]
            return marker

    for dropouts in (Dropouts(0.0, "training"), Dropouts(0.5, "protocol")):
        assert dropouts.fit(Plain(), tasks, {}, round=3, seed=1) is marker


def test_a_round_whose_every_client_dropped_is_aborted_after_recording_them() -> None:
    tasks = _tasks(2)
    dropouts = Dropouts(0.999, "training")
    seen: list[Result] = []
    with pytest.raises(RoundAborted, match="all 2 sampled clients dropped out"):
        for r in dropouts.fit(_Echo(), tasks, {}, round=1, seed=0):
            seen.append(r)
    assert [r.client_id for r in seen] == ["c0", "c1"] and all(r.update is None for r in seen)


def test_under_secure_aggregation_dropout_keeps_its_protocol_meaning() -> None:
    pytest.importorskip("cryptography")
    from consortium.aggregation.base import Pipeline
    from consortium.secagg.stage import secure_aggregation

    stage, _ = secure_aggregation()
    assert Dropouts.of(0.3, Pipeline([stage])).during == "protocol"
    assert Dropouts.of(0.3, Pipeline([])).during == "training"
    with pytest.raises(ConfigError, match="simulation.dropout"):
        Dropouts(1.0)
