"""The simulated clock: hand-computed round durations, deadlines, over-selection, going offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consortium.errors import RoundAborted
from consortium.messages import Result, Task
from consortium.server.clock import Clock, time_to_target
from consortium.server.sampling import PoissonSampler, UniformSampler
from consortium.server.traces import Always, Diurnal, IntervalTrace, Profiles
from consortium.types import Layout, Parameters

IDS = ("a", "b", "c")


def params(d: int) -> Parameters:
    named = {"w": torch.zeros(d)}
    return Parameters(Layout.of(named), torch.zeros(d))


def profiles(speed, bw, latency=(0.5, 0.5, 0.5), up=None) -> Profiles:
    return Profiles(IDS, np.array(speed, float), np.array(up or bw, float), np.array(bw, float),
                    np.array(latency, float))


def tasks(d: int = 250, work=(1.0, 1.0, 1.0), ids=IDS) -> list[Task]:
    p = params(d)
    return [Task(round=1, client_id=c, parameters=p, seed=0, work=w) for c, w in zip(ids, work)]


def clock(avail=None, **kw) -> Clock:
    base = dict(profiles=profiles([50, 100, 10], [500, 1000, 250]),
                availability=avail or Always(3), train_sizes=np.array([100, 100, 40]),
                batch_size=10)
    base.update(kw)
    return Clock(**base)


def test_round_duration_by_hand() -> None:
    # a: 1000 B down / 500 + 0.5 + 100 ex / 50 + 1000 B up / 500 = 2 + 0.5 + 2 + 2 = 6.5 s
    # b: 1000/1000 + 0.5 + 100/100 + 1000/1000 = 3.5 s
    # c: 1000/250 + 0.5 + 40/10 + 1000/250 = 12.5 s
    c = clock()
    np.testing.assert_allclose(c.finish_times(tasks(), 100.0), [106.5, 103.5, 112.5])
    plan = c.plan(tasks(), round=1, t=100.0)
    assert plan.end == pytest.approx(112.5)
    assert [t.client_id for t in plan.kept] == ["a", "b", "c"] and not plan.failed


def test_examples_follow_epochs_steps_and_the_stragglers_cut() -> None:
    c = clock(epochs=2)  # 2 epochs: a processes 200 examples, 4 s at 50/s
    assert c.finish_times(tasks()[:1], 0.0)[0] == pytest.approx(0.5 + 2 + 4 + 2)
    half = clock().finish_times(tasks(work=(0.5, 1, 1)), 0.0)  # 5 of 10 steps: 50 examples
    assert half[0] == pytest.approx(0.5 + 2 + 1 + 2)
    steps = clock(steps=3).finish_times(tasks(), 0.0)  # 3 steps of 10: 30 examples
    assert steps[2] == pytest.approx(0.5 + 4 + 3 + 4)


def test_deadline_drops_the_late_and_the_round_ends_at_the_deadline() -> None:
    plan = clock(deadline=10.0).plan(tasks(), round=4, t=0.0)
    assert [t.client_id for t in plan.kept] == ["a", "b"]
    assert "deadline" in plan.failed["c"]
    assert plan.end == 10.0


def test_over_selection_keeps_the_first_to_finish() -> None:
    plan = clock(over_select=0.5).plan(tasks(), round=1, t=0.0)  # keep ceil(3 / 1.5) = 2
    assert [t.client_id for t in plan.kept] == ["a", "b"]
    assert plan.failed["c"].startswith("over-selected")
    assert plan.end == pytest.approx(6.5)  # the second to finish, not the slowest


def test_a_client_offline_before_its_finish_fails() -> None:
    # a online [0, 5) (needs 6.5 s), b and c online throughout
    trace = IntervalTrace(3, np.array([0, 1, 2]), np.array([0.0, 0, 0]),
                          np.array([5.0, 100, 100]), 100.0)
    plan = clock(trace).plan(tasks(), round=1, t=0.0)
    assert [t.client_id for t in plan.kept] == ["b", "c"]
    assert "went offline at 5.0 s" in plan.failed["a"]
    assert plan.end == pytest.approx(12.5)


def test_too_few_in_time_aborts_without_training() -> None:
    plan = clock(deadline=4.0, min_results=2).plan(tasks(), round=2, t=0.0)
    assert plan.aborted is not None and plan.kept == []
    trained: list[str] = []

    def fit(chosen):
        trained.extend(t.client_id for t in chosen)
        return iter([])

    seen: list[Result] = []
    with pytest.raises(RoundAborted, match="server.min_results"):
        for r in plan.run(fit):
            seen.append(r)
    assert trained == [] and sorted(r.client_id for r in seen) == ["a", "b", "c"]
    assert all(r.update is None for r in seen)


def test_offline_clients_are_not_sampled_and_a_count_is_kept() -> None:
    diurnal = Diurnal(100.0, np.array([0.0, 0.6, 0.0]), np.full(3, 0.5))  # b offline at t=0
    c = clock(diurnal)
    assert c.online(list(IDS), 0.0) == ["a", "c"]
    assert c.sample(UniformSampler(count=2), 1, list(IDS), seed=0, t=0.0) == ["a", "c"]
    assert c.sample(UniformSampler(count=3), 1, list(IDS), seed=0, t=0.0) == ["a", "c"]
    assert set(c.sample(PoissonSampler(1.0), 1, list(IDS), seed=0, t=0.0)) == {"a", "c"}
    # b is online from t = 40 to 90; a and c from 0 to 50, then from 100
    assert c.online(list(IDS), 55.0) == ["b"]
    np.testing.assert_allclose(diurnal.until(55.0), [-np.inf, 90.0, -np.inf])
    assert diurnal.next_online(95.0) == pytest.approx(100.0)


def test_every_client_online_samples_exactly_as_the_sampler() -> None:
    ids = [f"c{i}" for i in range(20)]
    c = Clock(Profiles(tuple(ids), *(np.ones(20) for _ in range(4))), Always(20),
              train_sizes=np.full(20, 10), batch_size=5)
    s = UniformSampler(count=5)
    assert c.sample(s, 3, ids, seed=7, t=0.0) == s.sample(3, ids, seed=7)
    assert c.trivial


def test_an_empty_cohort_waits_for_the_next_client() -> None:
    diurnal = Diurnal(100.0, np.array([0.7, 0.8, 0.9]), np.full(3, 0.1))
    plan = clock(diurnal).plan([], round=1, t=0.0)
    assert plan.end == pytest.approx(10.0)  # c: (t/100 + 0.9) mod 1 reaches 0 at t = 10


def test_time_to_target_counts_the_updates_of_rounds_not_aborted() -> None:
    history = [
        {"round": 1, "clients": 3, "accuracy": 0.5, "sim_time_s": 10.0},
        {"round": 2, "clients": 2, "accuracy": 0.6, "sim_time_s": 20.0, "aborted": "x"},
        {"round": 3, "clients": 4, "accuracy": 0.8, "sim_time_s": 35.0},
    ]
    assert time_to_target(history, 0.75) == {
        "target_accuracy": 0.75, "time_to_target_s": 35.0, "updates_to_target": 7,
        "round_to_target": 3}
    assert time_to_target(history, 0.9)["time_to_target_s"] is None
