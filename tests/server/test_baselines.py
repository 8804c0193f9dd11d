"""Baselines through the run's executor: equal to the sequential reference, budgets, sampling."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from consortium.client.training import LocalTraining
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.models.zoo import model_factory, seeded_model
from consortium.reporting.callbacks import Console
from consortium.server.baselines import (
    BaselineSetup,
    local_baseline,
    local_budget,
    pooled_baseline,
    pooled_budget,
    run_baselines,
    sample_clients,
)
from consortium.simulation import simulate
from consortium.types import Parameters
from tests.conftest import make_toy


def _setup(settings: LocalTraining, *, rounds: int = 3, hidden: tuple[int, ...] = (8,)) -> BaselineSetup:
    factory = model_factory("mlp", (5,), 2, hidden=hidden)
    init = Parameters.from_module(seeded_model(factory, 7))
    return BaselineSetup(factory, init, settings, F.cross_entropy, rounds, seed=11)


SETTINGS = [
    LocalTraining(epochs=2, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-4),
    LocalTraining(steps=5, batch_size=8, lr=0.05),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["epochs-momentum", "fixed-steps"])
@pytest.mark.parametrize("executor", [VectorizedExecutor, SequentialExecutor])
def test_local_through_executor_equals_sequential_reference(settings, executor) -> None:
    # uneven sizes: the vectorised executor's shrinking prefix and short last batches
    ds = make_toy(5, sizes=[60, 23, 41, 7, 90])
    setup = _setup(settings)
    reference, ref_clients = local_baseline(ds, setup)
    out = run_baselines(["local"], ds, setup, executor(), per_round_clients=5)
    got = out.results["local"]
    assert set(out.local_per_client) == set(ref_clients) == set(ds.client_ids)
    for cid, metrics in ref_clients.items():
        for name, value in metrics.items():
            assert out.local_per_client[cid][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (cid, name)
    for name, value in reference.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    expected = {"epochs": 6} if settings.steps == 0 else {"steps": 15}
    assert {k: got["budget"][k] for k in expected} == expected
    assert "sampled" not in got
    # each site's confusion matrix, for the bootstrap intervals
    assert set(out.confusions["baselines/local"]) == set(ds.client_ids)


def test_local_baselines_train_differently_per_client() -> None:
    """The clients never average: a client's result depends on its own data only."""
    ds = make_toy(3)
    setup = _setup(SETTINGS[0])
    full = run_baselines(["local"], ds, setup, VectorizedExecutor(), per_round_clients=3)
    alone = make_toy(3)
    alone_clients = {"c1": alone.clients["c1"]}
    from consortium.data.base import FederatedDataset

    one = FederatedDataset("toy", alone_clients, 2, (5,))
    single = run_baselines(["local"], one, setup, VectorizedExecutor(), per_round_clients=1)
    assert single.local_per_client["c1"]["loss"] == pytest.approx(
        full.local_per_client["c1"]["loss"], rel=1e-6)


def test_pooled_equals_reference() -> None:
    ds = make_toy(4, sizes=[30, 50, 20, 45])
    setup = _setup(SETTINGS[0], rounds=2)
    confusions: dict = {}
    reference, _ = pooled_baseline(ds, setup, per_round_clients=2, confusions=confusions)
    out = run_baselines(["pooled"], ds, setup, VectorizedExecutor(), per_round_clients=2)
    got = out.results["pooled"]
    for name, value in reference.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    mine = out.confusions["baselines/pooled"]
    assert set(mine) == set(confusions) == set(ds.client_ids)
    for cid, table in confusions.items():
        assert (mine[cid] == table).all() and mine[cid].sum() == 20, cid
    # 145 examples, batch 16: 10 steps an epoch; 2 rounds × 2 epochs
    assert got["budget"]["epochs"] == 4 and got["budget"]["steps"] == 40


def test_budgets() -> None:
    s = LocalTraining(epochs=2, batch_size=32)
    # 30 rounds × 2 epochs = 60 passes over 1,000 examples (32 steps each)
    b = pooled_budget(s, 30, per_round_clients=10, examples=1000)
    assert b["epochs"] == 60 and b["steps"] == 60 * 32
    fixed = pooled_budget(LocalTraining(steps=5), 4, per_round_clients=3, examples=77)
    assert fixed["steps"] == 60  # 4 rounds × 5 steps × 3 clients
    assert local_budget(s, 30)["epochs"] == 60
    assert local_budget(LocalTraining(steps=5), 4)["steps"] == 20


def test_large_federation_is_sampled_and_says_so() -> None:
    ds = make_toy(12, n_train=10, n_test=4)
    setup = _setup(LocalTraining(epochs=1, batch_size=8, lr=0.1), rounds=2)
    stream = io.StringIO()
    out = run_baselines(["local", "pooled"], ds, setup, VectorizedExecutor(), per_round_clients=12,
                        max_clients=5, max_examples=50, console=Console(stream=stream, tty=False))
    local, pooled = out.results["local"], out.results["pooled"]
    assert local["sampled"] == {"clients": 5, "of": 12}
    assert len(out.local_per_client) == 5
    assert set(out.local_per_client) == set(sample_clients(ds.client_ids, 5, seed=11))
    assert pooled["sampled"] == {"examples": 50, "of": 120}
    # 2 rounds × 1 epoch over the 50 sampled examples, 7 steps each
    assert pooled["budget"]["steps"] == 14 and pooled["budget"]["examples"] == 50
    assert any("5 of 12 clients" in n for n in out.notes)
    assert any("50 of 120" in n for n in out.notes)
    log = stream.getvalue()
    assert "baselines: local" in log and "baselines: pooled" in log and "done in" in log


def test_sample_is_seeded_and_complete_below_the_limit() -> None:
    ids = [f"c{i}" for i in range(300)]
    a = sample_clients(ids, 100, seed=3)
    assert a == sample_clients(ids, 100, seed=3) and len(set(a)) == 100
    assert a != sample_clients(ids, 100, seed=4)
    assert a == [c for c in ids if c in set(a)]  # original order
    assert sample_clients(ids, 0, seed=3) == ids and sample_clients(ids[:50], 100, seed=3) == ids[:50]


def test_pooled_progress_counts_epochs() -> None:
    ds = make_toy(2, n_train=32)
    setup = _setup(LocalTraining(epochs=1, batch_size=16, lr=0.1), rounds=3)

    class Recorder(Console):
        def __init__(self) -> None:
            super().__init__(stream=io.StringIO(), tty=False)
            self.seen: list[tuple[str, int | None, int]] = []

        def _update(self, phase, status):  # type: ignore[no-untyped-def]
            self.seen.append((phase.label, phase.total, phase.completed))

    console = Recorder()
    run_baselines(["pooled"], ds, setup, VectorizedExecutor(), per_round_clients=2, console=console)
    # 64 examples, batch 16: 4 steps an epoch, 3 epochs
    assert {total for _, total, _ in console.seen} == {3}
    assert [done for _, _, done in console.seen][-1] == 3
    assert [done for _, _, done in console.seen][:4] == [0, 0, 0, 1]


def test_summary_keeps_budget_and_per_site_local_results(tmp_path) -> None:
    ds = make_toy(3)
    result = simulate(
        {"name": "toy", "rounds": 2, "model": {"name": "logistic"},
         "algorithm": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
         "sampling": {"clients_per_round": 3},
         "evaluation": {"baselines": ["local", "pooled"]}},
        dataset=ds, out=tmp_path / "run", report=False,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    local = summary["baselines"]["local"]
    assert local["budget"]["epochs"] == 2 and local["budget"]["wall_s"] >= 0
    assert summary["baselines"]["pooled"]["budget"]["steps"] == 2 * math.ceil(180 / 16)
    for cid in ds.client_ids:
        assert isinstance(summary["per_client"][cid]["local_accuracy"], float)
    assert "local" in summary["client_accuracy"]
    assert set(summary["ci"]["baselines"]) == {"local", "pooled"}
    # same numbers as the sequential reference
    setup = BaselineSetup(_factory_of(result), _init_of(result),
                          LocalTraining(epochs=1, batch_size=16, lr=0.1), F.cross_entropy, 2, 0)
    ref, _ = local_baseline(ds, setup)
    assert local["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9)


def _factory_of(result):  # type: ignore[no-untyped-def]
    return model_factory("logistic", (5,), 2)


def _init_of(result):  # type: ignore[no-untyped-def]
    from consortium.federation import derive_init_seed

    return Parameters.from_module(seeded_model(_factory_of(result), derive_init_seed(result.config)))


def test_vectorized_on_step_hook_is_cleared() -> None:
    ds = make_toy(2)
    ex = VectorizedExecutor()
    run_baselines(["pooled"], ds, _setup(SETTINGS[1]), ex, per_round_clients=2,
                  console=Console(stream=io.StringIO(), tty=False))
    assert ex.on_step is None
    assert torch.get_num_threads() >= 1


def test_pooled_fixed_steps_equals_reference() -> None:
    ds = make_toy(3, sizes=[20, 35, 12])
    setup = _setup(SETTINGS[1], rounds=2)
    reference, _ = pooled_baseline(ds, setup, per_round_clients=2)
    out = run_baselines(["pooled"], ds, setup, VectorizedExecutor(), per_round_clients=2)
    for name, value in reference.items():
        assert out.results["pooled"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert out.results["pooled"]["budget"]["steps"] == 2 * 5 * 2


def test_a_site_alone_trains_what_the_simulated_baseline_trains() -> None:
    """A deployed site draws its batch order from the OS (not reproducible), so compare with
    full-batch gradient descent, where the order does not matter."""
    from consortium.server.baselines import train_alone

    ds = make_toy(2, n_train=40)
    settings = LocalTraining(epochs=1, batch_size=64, lr=0.2, momentum=0.5)
    factory = model_factory("mlp", (5,), 2, hidden=(8,))
    init = Parameters.from_module(seeded_model(factory, 5))
    setup = BaselineSetup(factory, init, settings, F.cross_entropy, 4, seed=0)
    _, reference = local_baseline(ds, setup)
    for cid in ds.client_ids:
        got = train_alone(factory, 5, ds.clients[cid], settings, rounds=4,
                          loss_fn=F.cross_entropy, num_classes=2)
        for name, value in reference[cid].items():
            assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (cid, name)


def test_one_model_outside_the_linear_stack_trains_on_the_plain_path() -> None:
    """Pooled with a model the vectorised executor cannot hand-batch (tanh): its sequential
    path, the same result as the reference, and its progress counted in epochs."""
    from consortium.server.baselines import _one_model_runner

    def factory() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))

    ds = make_toy(2, n_train=32)
    settings = LocalTraining(epochs=1, batch_size=16, lr=0.1, momentum=0.9)
    setup = BaselineSetup(factory, Parameters.from_module(seeded_model(factory, 3)), settings,
                          F.cross_entropy, 3, seed=2)
    ex = VectorizedExecutor()
    runner = _one_model_runner(ex, setup)
    assert runner.name == "sequential" and runner is not ex._sequential  # its own
    assert _one_model_runner(ex, _setup(settings)) is ex  # an MLP: hand-batched
    reference, _ = pooled_baseline(ds, setup, per_round_clients=2)
    seen: list[tuple[int, int]] = []

    class Recorder(Console):
        def _update(self, phase, status):  # type: ignore[no-untyped-def]
            seen.append((phase.completed, phase.total))

    out = run_baselines(["pooled"], ds, setup, ex, per_round_clients=2,
                        console=Recorder(stream=io.StringIO(), tty=False))
    for name, value in reference.items():
        assert out.results["pooled"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert seen[-1] == (3, 3) and (1, 3) in seen and (2, 3) in seen  # 4 steps an epoch


def _tanh_setup() -> BaselineSetup:
    """A model the vectorised executor cannot hand-batch: pooled trains on a plain path."""
    def factory() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))

    settings = LocalTraining(epochs=2, batch_size=8, lr=0.1, momentum=0.9)
    return BaselineSetup(factory, Parameters.from_module(seeded_model(factory, 3)), settings,
                         F.cross_entropy, 4, seed=5)


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both runs at one torch thread: the same float arithmetic
    yield
    torch.set_num_threads(threads)


def test_both_baselines_together_equal_one_after_the_other(monkeypatch, one_thread) -> None:
    """Pooled training in a second thread beside local-only gives exactly what one after the
    other gives (metrics, per-client results, confusion matrices, results in the order asked),
    leaves torch's global RNG where the sequential run leaves it, restores the thread count,
    and both phases reach the console."""
    import consortium.server.baselines as baselines

    ds = make_toy(6, n_train=40)
    setup = _tanh_setup()
    outcomes, states = {}, {}
    for together in (False, True):
        monkeypatch.setattr(baselines, "_two_cores", lambda together=together: together)
        seen: list[str] = []

        class Recorder(Console):
            def _begin(self, phase):  # type: ignore[no-untyped-def]
                seen.append(phase.label)

            def _end(self, phase, *, failed):  # type: ignore[no-untyped-def]
                seen.append(f"end {phase.label}")

        torch.manual_seed(123)
        outcomes[together] = run_baselines(
            ["pooled", "local"], ds, setup, VectorizedExecutor(), per_round_clients=3,
            console=Recorder(stream=io.StringIO(), tty=False))
        states[together] = torch.random.get_rng_state()
        assert torch.get_num_threads() == 1
        assert len(seen) == 4 and sorted(x for x in seen if x.startswith("end")) == [
            "end " + x for x in sorted(x for x in seen if not x.startswith("end"))]
    apart, together = outcomes[False], outcomes[True]
    assert list(together.results) == ["pooled", "local"]
    for name in ("pooled", "local"):
        got = {k: v for k, v in together.results[name].items() if k != "budget"}
        assert got == {k: v for k, v in apart.results[name].items() if k != "budget"}, name
        assert together.results[name]["budget"].keys() == apart.results[name]["budget"].keys()
    assert together.local_per_client == apart.local_per_client
    for key, tables in apart.confusions.items():
        assert tables.keys() == together.confusions[key].keys()
        for cid, table in tables.items():
            assert (table == together.confusions[key][cid]).all()
    assert torch.equal(states[False], states[True])


def test_a_local_failure_stops_pooled_in_its_thread(monkeypatch) -> None:
    """Local-only fails (or the user presses Ctrl-C) while pooled trains in its thread: the
    pooled training stops at its next step instead of running on, and the error reaches the
    caller at once."""
    import time

    import consortium.server.baselines as baselines

    steps: list[int] = []
    real = baselines._train_pooled

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        progress = kwargs["on_progress"]

        def on_progress(done: int, total: int) -> None:
            steps.append(done)
            progress(done, total)

        return real(*args, **{**kwargs, "on_progress": on_progress})

    def failing_local(*args, **kwargs):  # type: ignore[no-untyped-def]
        while len(steps) < 3:  # pooled is under way
            time.sleep(0.001)
        raise KeyboardInterrupt

    monkeypatch.setattr(baselines, "_two_cores", lambda: True)
    monkeypatch.setattr(baselines, "_train_pooled", counting)
    monkeypatch.setattr(baselines, "local_through_executor", failing_local)
    setup = dataclasses.replace(_tanh_setup(), rounds=400)  # 400 × 2 epochs: thousands of steps
    with pytest.raises(KeyboardInterrupt):
        run_baselines(["local", "pooled"], make_toy(4, n_train=40), setup, VectorizedExecutor(),
                      per_round_clients=4)
    assert 3 <= len(steps) < 100


def test_a_model_that_draws_randomness_trains_its_baselines_one_after_the_other() -> None:
    """Dropout draws from torch's global RNG: two threads would interleave its draws."""
    from consortium.server.baselines import _draws_randomness

    def dropout() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Dropout(0.5),
                                   torch.nn.Linear(6, 2))

    ds = make_toy(2, n_train=16)
    assert _draws_randomness(dataclasses.replace(_tanh_setup(), model_factory=dropout), ds)
    assert not _draws_randomness(_tanh_setup(), ds)


def test_a_pooled_failure_in_its_thread_reaches_the_caller(monkeypatch) -> None:
    """Pooled training fails in its thread while local-only trains: the caller gets that
    error, and torch's thread count is restored."""
    import threading

    import consortium.server.baselines as baselines

    where: list[str] = []

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        where.append(threading.current_thread().name)
        raise RuntimeError("the pooled baseline failed: the local loss became nan")

    monkeypatch.setattr(baselines, "_two_cores", lambda: True)
    monkeypatch.setattr(baselines, "_train_pooled", failing)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="pooled baseline failed"):
        run_baselines(["local", "pooled"], make_toy(4, n_train=40), _tanh_setup(),
                      VectorizedExecutor(), per_round_clients=2)
    assert where == ["pooled-baseline"] and torch.get_num_threads() == threads


# -- evaluation.baseline_budget: "matched" (what the federation trained) or "full" --------------


def test_budget_hand_computed_ten_clients_three_a_round() -> None:
    """10 clients, 3 a round, 5 rounds; a client of 40 examples, batch 16: P = 2 epochs × 3
    steps = 6 planned steps a round. It takes part in 5 × 3 / 10 = 1.5 rounds on average."""
    from consortium.server.baselines import Budget

    s = LocalTraining(epochs=2, batch_size=16)
    full, matched = Budget("full", 10), Budget("matched", 10)
    assert full.client_steps(6, 5, 3) == 30  # 5 rounds × 6
    assert matched.client_steps(6, 5, 3) == 9  # 1.5 × 6
    assert local_budget(s, 5, budget=full, per_round_clients=3)["epochs"] == 10
    assert local_budget(s, 5, budget=matched, per_round_clients=3)["epochs"] == 3.0
    # pooled: 400 examples, 25 steps a pass; full 10 passes, matched 1.5 × 2 = 3 passes
    assert pooled_budget(s, 5, per_round_clients=3, examples=400, budget=full)["steps"] == 250
    got = pooled_budget(s, 5, per_round_clients=3, examples=400, budget=matched)
    assert (got["epochs"], got["steps"], got["mode"]) == (3.0, 75, "matched")
    # stragglers 0.5: k = round(1.5) = 2 of the 3 do (6 + 1) / 2 = 3.5 steps on average:
    # 5 / 10 × (1 × 6 + 2 × 3.5) = 6.5 -> 7 steps; epochs 1.5 × 2 × (1 − 2/6) = 2
    slow = Budget("matched", 10, 0.5)
    assert slow.client_steps(6, 5, 3) == 7
    assert local_budget(s, 5, budget=slow, per_round_clients=3)["epochs"] == 2.0
    assert pooled_budget(s, 5, per_round_clients=3, examples=400, budget=slow)["steps"] == 50
    # fractional: 3 rounds × 3 / 10 × 6 = 5.4 -> 6 whole steps
    assert matched.client_steps(6, 3, 3) == 6
    # fixed-steps mode, 5 local steps: alone 5 × 3 / 10 × 5 = 7.5 -> 8 (full 25); pooled the
    # federation's total, 5 × 3 × 5 = 75 either way, 5 × (1 × 5 + 2 × 3) = 55 with stragglers
    f = LocalTraining(steps=5)
    assert local_budget(f, 5, budget=matched, per_round_clients=3)["steps"] == 8
    assert local_budget(f, 5, budget=full, per_round_clients=3)["steps"] == 25
    assert pooled_budget(f, 5, per_round_clients=3, examples=400, budget=matched)["steps"] == 75
    assert pooled_budget(f, 5, per_round_clients=3, examples=400, budget=full)["steps"] == 75
    assert pooled_budget(f, 5, per_round_clients=3, examples=400, budget=slow)["steps"] == 55
    # everyone every round, no stragglers: matched is full
    everyone = Budget("matched", 4)
    assert everyone.client_steps(6, 5, 4) == full.client_steps(6, 5, 4) == 30
    for settings in (s, f):
        a = pooled_budget(settings, 5, per_round_clients=4, examples=400, budget=everyone)
        b = pooled_budget(settings, 5, per_round_clients=4, examples=400, budget=full)
        assert (a.get("epochs"), a["steps"]) == (b.get("epochs"), b["steps"])


@pytest.mark.parametrize("planned", [1, 6, 13])
def test_matched_budget_is_the_stragglers_expected_work(planned: int) -> None:
    """The expectation against the run's own straggler draws (Stragglers.work, steps_for_work)."""
    from consortium.client.training import steps_for_work
    from consortium.server.baselines import Budget
    from consortium.server.heterogeneity import Stragglers

    participants = ["a", "b", "c"]
    rounds = 6000
    done = sum(
        steps_for_work(planned, share)
        for r in range(1, rounds + 1)
        for share in Stragglers(0.5).work(r, participants, seed=9).values()
    ) / (rounds * len(participants))  # a participant's steps in a round
    # Budget over 10 rounds, everyone every round: 10 × the expected steps of a round
    expected = Budget("matched", 3, 0.5).client_steps(planned, 10 * 3 * planned * 2, 3)
    expected_per_round = expected / (10 * 3 * planned * 2)
    assert done == pytest.approx(expected_per_round, rel=0.02)


@pytest.mark.parametrize("settings", SETTINGS, ids=["epochs-momentum", "fixed-steps"])
def test_matched_local_through_executor_equals_reference(settings) -> None:
    from consortium.server.baselines import Budget

    ds = make_toy(5, sizes=[60, 23, 41, 7, 90])
    setup = dataclasses.replace(_setup(settings), budget=Budget("matched", 5, 0.5))
    reference, ref_clients = local_baseline(ds, setup, per_round_clients=2)
    full, _ = local_baseline(ds, _setup(settings))
    assert reference["loss"] != pytest.approx(full["loss"], rel=1e-4)  # it trained less
    out = run_baselines(["local", "pooled"], ds, setup, VectorizedExecutor(), per_round_clients=2)
    for cid, metrics in ref_clients.items():
        for name, value in metrics.items():
            assert out.local_per_client[cid][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (cid, name)
    pooled_ref, _ = pooled_baseline(ds, setup, per_round_clients=2)
    for name, value in pooled_ref.items():
        assert out.results["pooled"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert out.results["local"]["budget"]["mode"] == "matched"
    assert "3 × 2 / 5" in out.results["local"]["budget"]["rule"]


def test_summary_states_the_matched_budget_and_the_demo_keeps_full(tmp_path) -> None:
    ds = make_toy(6)
    common = {"name": "toy", "rounds": 3, "model": {"name": "logistic"},
              "algorithm": {"local_epochs": 2, "batch_size": 16, "lr": 0.1},
              "evaluation": {"baselines": ["local", "pooled"]}}
    part = simulate({**common, "sampling": {"clients_per_round": 2}}, dataset=ds,
                    out=tmp_path / "part", report=False).summary["baselines"]
    # 3 rounds × 2 / 6 × 2 epochs = 2 epochs (full: 6); pooled 360 examples, 23 steps a pass
    assert part["local"]["budget"]["epochs"] == 2.0 and part["local"]["budget"]["mode"] == "matched"
    assert part["pooled"]["budget"]["steps"] == 2 * 23
    every = {**common, "sampling": {"clients_per_round": 6}}
    a = simulate(every, dataset=ds, out=tmp_path / "a", report=False).summary["baselines"]
    b = simulate({**every, "evaluation": {**common["evaluation"], "baseline_budget": "full"}},
                 dataset=ds, out=tmp_path / "b", report=False).summary["baselines"]
    for name in ("local", "pooled"):
        assert a[name]["accuracy"] == b[name]["accuracy"] and a[name]["loss"] == b[name]["loss"]
        assert a[name]["budget"]["epochs"] == b[name]["budget"]["epochs"] == 6


def test_the_demo_budget_is_unchanged() -> None:
    """The heart-disease demo (4 sites, 4 a round, no stragglers): matched is full."""
    from consortium.config import ExperimentConfig, default_config_dict
    from consortium.server.baselines import Budget

    cfg = ExperimentConfig.from_dict(default_config_dict())
    assert cfg.evaluation.baseline_budget == "matched"
    assert cfg.sampling.clients_per_round == 4 and cfg.simulation.stragglers == 0
    s = LocalTraining(epochs=cfg.algorithm.local_epochs, batch_size=cfg.algorithm.batch_size)
    matched, full = Budget("matched", 4), Budget("full", 4)
    for n in (100, 123, 261):
        planned = math.ceil(n / s.batch_size) * s.epochs
        assert matched.client_steps(planned, cfg.rounds, 4) == full.client_steps(planned, cfg.rounds, 4)
    assert local_budget(s, cfg.rounds, budget=matched, per_round_clients=4)["epochs"] == \
        local_budget(s, cfg.rounds)["epochs"]
    # and run: two rounds of the demo, both budgets
    runs = {}
    for mode in ("matched", "full"):
        d = default_config_dict()
        d["rounds"], d["evaluation"] = 2, {**d["evaluation"], "baseline_budget": mode}
        runs[mode] = simulate(d, report=False).summary["baselines"]
    for name in ("local", "pooled"):
        a, b = runs["matched"][name], runs["full"][name]
        assert {k: v for k, v in a.items() if k != "budget"} == {k: v for k, v in b.items() if k != "budget"}
        assert (a["budget"]["epochs"], a["budget"].get("steps")) == (b["budget"]["epochs"], b["budget"].get("steps"))
        assert a["budget"]["epochs"] == 2 and a["budget"]["mode"] == "matched"


def test_baseline_budget_is_checked() -> None:
    from consortium.config import ExperimentConfig
    from consortium.errors import ConfigError

    with pytest.raises(ConfigError, match="baseline_budget"):
        ExperimentConfig.from_dict({"evaluation": {"baseline_budget": "half"}})
    from consortium.server.baselines import Budget

    with pytest.raises(ConfigError, match="baseline_budget"):
        Budget("half")  # type: ignore[arg-type]


def test_the_report_states_the_budget() -> None:
    from consortium.reporting.report import _results_section

    summary = {"final": {"accuracy": 0.9},
               "baselines": {"local": {"accuracy": 0.8, "budget": {
                   "mode": "matched", "epochs": 22.5, "rule": "each client alone: a < b"}},
                   "pooled": {"accuracy": 0.95, "budget": {"mode": "full", "steps": 1200}}}}
    html = _results_section(summary)
    assert "local only: matched, 22.5 epochs (each client alone: a &lt; b)" in html
    assert "pooled: full, 1,200 steps" in html
    assert "budget" not in _results_section({"final": {"accuracy": 0.9}})


def test_matched_budget_under_asynchronous_aggregation() -> None:
    """FedBuff steps on buffer_size updates: 5 server steps × 5 updates / 10 clients × 6."""
    from consortium.server.baselines import Budget

    assert Budget("matched", 10, updates=5).client_steps(6, 5, 3) == 15
    assert Budget("matched", 10, updates=1).client_steps(6, 5, 3) == 3  # FedAsync
    assert Budget("full", 10, updates=5).client_steps(6, 5, 3) == 30
