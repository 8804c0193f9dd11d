"""Asynchronous aggregation (FedBuff, FedAsync): a hand-computed buffer step, the staleness
functions, determinism, refusals, and resume equal to an uninterrupted run."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import consortium
from consortium.aggregation.base import Pipeline
from consortium.aggregation.staleness import Staleness
from consortium.algorithms import build_algorithm
from consortium.errors import ConfigError, ConsortiumError
from consortium.messages import Result, Task
from consortium.server.asynchronous import ASYNC_SAMPLE, AsyncServer
from consortium.server.clock import Clock
from consortium.server.traces import Always, Profiles
from consortium.types import Layout, Parameters, Update

# -- staleness functions (Xie et al. 2019, §5.2) ---------------------------------------------


def test_staleness_functions_by_hand() -> None:
    poly = Staleness("polynomial", a=0.5)
    assert poly(0) == 1.0
    assert poly(3) == pytest.approx(0.5)  # (1 + 3)^-0.5
    assert Staleness("polynomial", a=1.0)(4) == pytest.approx(0.2)
    assert Staleness("constant")(17) == 1.0
    hinge = Staleness("hinge", a=2.0, b=4.0)
    assert [hinge(t) for t in (0, 4)] == [1.0, 1.0]
    assert hinge(5) == pytest.approx(1 / 3)  # 1 / (2·(5 − 4) + 1)
    assert hinge(7) == pytest.approx(1 / 7)
    with pytest.raises(ConfigError, match="not a staleness function"):
        Staleness("exponential")


@pytest.mark.parametrize("kind", ["polynomial", "hinge"])
def test_staleness_is_non_increasing_and_at_most_one(kind: str) -> None:
    s = Staleness(kind, a=0.7, b=2.0)
    values = [s(t) for t in range(50)]
    assert all(0 < v <= 1 for v in values)
    assert all(x >= y for x, y in zip(values, values[1:]))


# -- a hand-computed FedBuff step ------------------------------------------------------------

IDS = ("a", "b", "c")
TARGET = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0]),
          "c": torch.tensor([4.0, 4.0])}
WEIGHT = {"a": 1.0, "b": 2.0, "c": 3.0}


class TargetExecutor:
    """Each client's update moves the model it received to its target: Δ = target − x_sent,
    so an update trained from an old version shows it."""

    name = "fake"

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int]]] = []

    def fit(self, tasks: Sequence[Task], clients: Mapping[str, Any]) -> Iterator[Result]:
        self.batches.append([(t.client_id, t.round) for t in tasks])
        for t in tasks:
            delta = TARGET[t.client_id] - t.parameters.vector
            yield Result(t.round, t.client_id, Update(t.client_id, delta, WEIGHT[t.client_id],
                                                      {"train_loss": 1.0}))

    def evaluate(self, tasks: Any, clients: Any) -> Iterator[Any]:
        return iter(())

    def close(self) -> None:
        pass


class NoEvaluation:
    def evaluate(self, rnd: int, params: Any, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {}


def fedbuff(speeds: Sequence[float], **kw: Any) -> tuple[AsyncServer, TargetExecutor]:
    n = len(IDS)
    clock = Clock(Profiles(IDS, np.array(speeds, float), np.full(n, 1e15), np.full(n, 1e15),
                           np.zeros(n)),
                  Always(n), train_sizes=np.full(n, 10), batch_size=10)
    executor = TargetExecutor()
    args: dict[str, Any] = dict(mode="fedbuff", concurrency=3, buffer_size=2, max_staleness=0,
                                staleness=Staleness("polynomial", a=0.5))
    args.update(kw)
    server = AsyncServer(
        clients=dict.fromkeys(IDS), algorithm=build_algorithm("fedavg"), pipeline=Pipeline(),
        sampler=None, executor=executor, evaluator=NoEvaluation(), seed=0,  # type: ignore[arg-type]
        eval_every=1000, clock=clock, **args)
    return server, executor


def start() -> Parameters:
    return Parameters(Layout.of({"w": torch.zeros(2)}), torch.zeros(2))


def test_a_fedbuff_step_by_hand() -> None:
    # 10 examples at 10, 5 and 10/3.5 examples/s: a, b, c finish 1, 2 and 3.5 s after dispatch
    server, executor = fedbuff([10.0, 5.0, 10 / 3.5])
    state = server.init_state(start())
    x0 = state.params.vector.clone()
    # step 1: a (1 s) and b (2 s) fill the buffer of 2, both sent version 0 (τ = 0)
    state, rec = server.run_round(state)
    x1 = x0 + (1 * (TARGET["a"] - x0) + 2 * (TARGET["b"] - x0)) / 3
    assert torch.allclose(state.params.vector, x1)
    assert (rec["round"], rec["clients"]) == (1, 2) and rec["sim_time_s"] == pytest.approx(2.0)
    assert rec["staleness_max"] == 0 and rec["in_flight"] == 1  # c still trains
    # step 2: a and b are sent version 1 at 2 s (a back at 3 s, b at 4 s); c, sent version 0,
    # arrives at 3.5 s with τ = 1 and weight s(1) = 1/√2: the buffer is a (τ = 0) and c
    state, rec = server.run_round(state)
    s1 = 1 / math.sqrt(2)
    x2 = x1 + (1 * (TARGET["a"] - x1) + 3 * s1 * (TARGET["c"] - x0)) / (1 + 3)
    assert torch.allclose(state.params.vector, x2, atol=1e-6)
    assert rec["sim_time_s"] == pytest.approx(3.5)
    assert rec["staleness_mean"] == 0.5 and rec["staleness_max"] == 1
    # each buffer's clients trained as one batch, c from version 0 at its arrival; a, back
    # at 1 s, was not sent again while its update waited in the buffer (one update per
    # client per buffer: central DP's sensitivity)
    assert [sorted(b) for b in executor.batches] == [[("a", 1), ("b", 1)], [("a", 2), ("c", 2)]]


def test_a_stale_update_is_dropped_and_recorded() -> None:
    # c needs 9 s: a and b step the server at 2, 4, 6 and 8 s; c, sent version 0, arrives
    # during step 5 with τ = 4 > max_staleness = 1 and is dropped (not trained)
    server, executor = fedbuff([10.0, 5.0, 10 / 9.0], max_staleness=1)
    state = server.init_state(start())
    records = []
    for _ in range(5):
        state, rec = server.run_round(state)
        records.append(rec)
    assert [r["stale"] for r in records] == [0, 0, 0, 0, 1]
    assert "τ = 4 > server.max_staleness = 1" in records[-1]["failed"]["c"]
    assert all(cid != "c" for batch in executor.batches for cid, _ in batch)
    assert records[-1]["clients"] == 2  # a and b: the buffer still fills


def test_fedasync_mixes_the_client_model_by_hand() -> None:
    server, _ = fedbuff([10.0, 5.0, 10 / 3.5], mode="fedasync", mixing=0.5,
                        staleness=Staleness("constant"))
    state = server.init_state(start())
    x0 = state.params.vector.clone()
    state, rec = server.run_round(state)  # a at 1 s: x ← (1 − 0.5) x + 0.5 x_a
    x1 = 0.5 * x0 + 0.5 * TARGET["a"]
    assert torch.allclose(state.params.vector, x1) and rec["clients"] == 1
    state, rec = server.run_round(state)  # b at 2 s (sent version 0)
    x2 = 0.5 * x1 + 0.5 * TARGET["b"]
    assert torch.allclose(state.params.vector, x2)


# -- whole runs ------------------------------------------------------------------------------


def config(mode: str = "fedbuff", rounds: int = 8, **server: Any) -> dict[str, Any]:
    return {
        "seed": 3, "rounds": rounds,
        "data": {"dataset": "synthetic", "clients": 40, "alpha": 1.0, "beta": 1.0},
        "model": {"name": "logistic"},
        "algorithm": {"lr": 0.01, "batch_size": 10, "local_epochs": 1},
        "sampling": {"clients_per_round": 8},
        "simulation": {"availability": "diurnal", "duty": 0.5, "period_s": 600.0,
                       "slow_fraction": 0.3},
        "server": {"mode": mode, "buffer_size": 3, "max_staleness": 6, **server},
        "evaluation": {"baselines": [], "include_offline": True},
        "executor": {"kind": "vectorized"},
    }


@pytest.mark.parametrize("mode", ["fedbuff", "fedasync"])
def test_a_seed_gives_the_same_run(mode: str) -> None:
    one = consortium.simulate(config(mode), report=False)
    two = consortium.simulate(config(mode), report=False)
    assert torch.equal(one.params.vector, two.params.vector)
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in one.history]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in two.history]
    assert [r["round"] for r in one.history] == list(range(1, 9))
    times = [r["sim_time_s"] for r in one.history]
    assert times == sorted(times)
    assert all(r["clients"] == (1 if mode == "fedasync" else 3) for r in one.history)


def test_the_sequential_executor_gives_the_same_model() -> None:
    vec = consortium.simulate(config(rounds=4), report=False)
    cfg = config(rounds=4)
    cfg["executor"] = {"kind": "sequential"}
    seq = consortium.simulate(cfg, report=False)
    assert torch.allclose(vec.params.vector, seq.params.vector, atol=1e-5)


class _Stop(Exception):
    pass


class StopAt:
    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def on_round_end(self, record: dict[str, Any], state: Any) -> None:
        if record["round"] == self.rnd:
            raise _Stop


@pytest.mark.parametrize("mode", ["fedbuff", "fedasync"])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, mode: str) -> None:
    cfg = config(mode)
    cfg["compression"] = {"uplink": "topk", "fraction": 0.5}  # error feedback: client state
    whole = consortium.simulate(cfg, out=tmp_path / "whole", report=False)
    with pytest.raises(_Stop):
        consortium.simulate(cfg, out=tmp_path / "cut", report=False, callbacks=[StopAt(4)])
    resumed = consortium.simulate(resume=tmp_path / "cut", report=False)
    assert torch.equal(whole.params.vector, resumed.params.vector)
    assert [r["sim_time_s"] for r in whole.history] == [
        r["sim_time_s"] for r in resumed.history]


def test_central_dp_counts_each_buffer_as_a_release_without_amplification() -> None:
    cfg = config(rounds=3)
    cfg["privacy"] = {"mode": "central", "noise_multiplier": 1.0, "clip": 1.0,
                      "sampling": "fixed"}
    run = consortium.simulate(cfg, report=False)
    eps = run.summary["privacy"]["epsilon"]
    assert eps is not None and eps > 0
    assert "asynchronous" in ASYNC_SAMPLE.why


@pytest.mark.parametrize(("change", "match"), [
    ({"secure_aggregation": {"enabled": True}, "server": {"mode": "fedasync"}},
     "no sum of several clients"),
    ({"secure_aggregation": {"enabled": True}}, "cannot\n?.*weight one update"),
    ({"privacy": {"mode": "distributed", "noise_multiplier": 1.0}}, "distributed"),
    ({"algorithm": {"name": "scaffold"}}, "control variate"),
    ({"algorithm": {"name": "fednova"}}, "fedavg or fedprox"),
    ({"compression": {"downlink": "topk", "fraction": 0.1}}, "EF21-P"),
    ({"server": {"deadline_s": 5.0}}, "synchronous policies"),
])
def test_what_does_not_compose_is_refused(change: dict[str, Any], match: str) -> None:
    cfg = config(rounds=1)
    for section, values in change.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    with pytest.raises(ConfigError, match=match):
        consortium.simulate(cfg, report=False)


def test_a_robust_rule_is_checked_against_the_buffer() -> None:
    cfg = config(rounds=2, buffer_size=5)
    cfg["aggregation"] = {"rule": "trimmed-mean", "f": 1}
    run = consortium.simulate(cfg, report=False)
    assert len(run.history) == 2 and torch.isfinite(run.params.vector).all()
    cfg["server"]["buffer_size"] = 2  # trimming 1 from each end needs 3 updates a step
    with pytest.raises(ConsortiumError, match="trimmed"):
        consortium.simulate(cfg, report=False)


def test_stragglers_act_on_each_dispatch() -> None:
    cfg = config(rounds=6, buffer_size=4)
    cfg["simulation"]["stragglers"] = 1.0  # every dispatch does a share of its local steps
    seen: list[tuple[list[float], dict[str, Any]]] = []

    class Watch:
        def on_round_end(self, record: dict[str, Any], state: Any) -> None:
            seen.append(([f["work"] for f in state.asynchronous["flights"]], record))

    consortium.simulate(cfg, report=False, callbacks=[Watch()])
    works = [w for ws, _ in seen for w in ws]
    assert works and all(0 < w < 1 for w in works)


def test_dispatch_draws_uniformly_among_idle_online_clients() -> None:
    from consortium.server.traces import Diurnal

    n = 40
    ids = tuple(f"c{i}" for i in range(n))
    phase = np.random.default_rng(0).random(n)
    av = Diurnal(100.0, phase, np.full(n, 0.5))
    clock = Clock(Profiles(ids, np.ones(n), np.ones(n), np.ones(n), np.zeros(n)), av,
                  train_sizes=np.full(n, 10), batch_size=10)
    server = AsyncServer(
        clients=dict.fromkeys(ids), algorithm=build_algorithm("fedavg"), pipeline=Pipeline(),
        sampler=None, executor=TargetExecutor(), evaluator=NoEvaluation(), seed=0,  # type: ignore[arg-type]
        clock=clock, mode="fedbuff", concurrency=5, buffer_size=2, max_staleness=0,
        staleness=Staleness())
    server._rows()
    t = 37.0
    online = av.until(t) > t
    busy = np.zeros(n, dtype=bool)
    busy[np.flatnonzero(online)[:4]] = True  # four online clients are training
    eligible = set(np.flatnonzero(online & ~busy).tolist())
    for size in (1, 3, 30):  # rejection (1, 3) and the full list (30: more than eligible)
        counts = np.zeros(n)
        for k in range(600):
            rows, until = server._draw(size, t, busy, np.random.default_rng(k))
            assert len(set(rows.tolist())) == rows.size == min(size, len(eligible))
            assert set(rows.tolist()) <= eligible and (until > t).all()
            counts[rows] += 1
        expected = 600 * min(size, len(eligible)) / len(eligible)
        assert np.abs(counts[sorted(eligible)] - expected).max() < 0.45 * expected + 1e-9


def test_fedbuff_with_secure_aggregation_runs_each_buffer_as_one_secagg_round() -> None:
    cfg = config(rounds=3, buffer_size=6, staleness="constant")
    plain = consortium.simulate(cfg, report=False)
    cfg["secure_aggregation"] = {"enabled": True, "bits": 24, "clip": 100.0}
    secure = consortium.simulate(cfg, report=False)
    # the same buffers, summed under masks (quantised: equal up to the rounding)
    assert [r["clients"] for r in secure.history] == [r["clients"] for r in plain.history]
    assert torch.allclose(secure.params.vector, plain.params.vector, atol=1e-3)
    assert all(r["bytes_up"] > p["bytes_up"] for r, p in zip(secure.history, plain.history))


@pytest.mark.parametrize("change", [
    {"privacy": {"mode": "local", "noise_multiplier": 1.0, "clip": 1.0}},
    {"attack": {"kind": "sign_flip", "fraction": 0.2}, "aggregation": {"rule": "median"}},
    {"aggregation": {"update_bound": 5.0}},
    {"compression": {"uplink": "qsgd", "bits": 4}},
])
def test_client_stages_and_robust_rules_compose(change: dict[str, Any]) -> None:
    cfg = config(rounds=3, buffer_size=4)
    cfg.update(change)
    run = consortium.simulate(cfg, report=False)
    assert [r["clients"] for r in run.history] == [4, 4, 4]
    assert torch.isfinite(run.params.vector).all()
    if "privacy" in change:
        assert run.summary["privacy"]["epsilon"] is not None
