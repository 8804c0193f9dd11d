"""The clock inside whole simulations: sim_time_s, availability, policies, resume, report."""

from __future__ import annotations

import json

import pytest
import torch

from consortium import simulate
from consortium.config import ExperimentConfig
from consortium.errors import ConfigError
from consortium.federation import Given, assemble, simulated_clock
from tests.conftest import make_toy

BASE = {"rounds": 3, "seed": 1, "evaluation": {"baselines": []},
        "algorithm": {"batch_size": 10}, "sampling": {"clients_per_round": 4}}
BUSY = {**BASE, "rounds": 6, "data": {"dataset": "synthetic", "clients": 30},
        "sampling": {"clients_per_round": 10},
        "simulation": {"availability": "diurnal", "period_s": 4.0, "duty": 0.5,
                       "speeds": "fedscale", "slow_fraction": 0.3, "speed": 200.0},
        "server": {"deadline_s": 1.0}, "evaluation": {"baselines": [], "target_accuracy": 0.3}}


def strip(history):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in history]


def test_the_trivial_clock_only_adds_sim_time() -> None:
    toy = make_toy()
    run = simulate(BASE, dataset=toy, report=False)
    # logistic on 5 features: 12 float32 = 48 bytes each way; 60 examples at 1000/s
    per_round = 0.05 + 48 / 1.25e6 + 60 / 1000 + 48 / 1.25e6
    assert [r["sim_time_s"] for r in run.history] == pytest.approx(
        [per_round, 2 * per_round, 3 * per_round])
    assert run.summary["sim_time_s"] == pytest.approx(3 * per_round)
    assert "clock" not in run.summary
    fed = assemble(ExperimentConfig.from_dict(BASE), Given(dataset=toy))
    fed.server.clock = None  # the loop without a clock (a deployment's)
    state = fed.server.run(fed.server.init_state(fed.init), rounds=3)
    assert torch.equal(state.params.vector, run.params.vector)


class Evaluated:
    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_round_end(self, record, state) -> None:
        self.counts.append(len(state.per_client))


def test_an_intermittent_run_is_deterministic_and_records_its_failures() -> None:
    seen = Evaluated()
    a = simulate(BUSY, report=False, callbacks=[seen])
    b = simulate(BUSY, report=False)
    assert strip(a.history) == strip(b.history)
    times = [r["sim_time_s"] for r in a.history]
    assert all(t2 > t1 for t1, t2 in zip(times, times[1:]))
    reasons = [why for r in a.history for why in r.get("failed", {}).values()]
    assert any("deadline" in w for w in reasons)
    assert all(r["clients"] <= 10 for r in a.history)
    # a round waits at most for its deadline when somebody is late
    for prev, rec in zip([0.0] + times, a.history):
        assert rec["sim_time_s"] - prev <= 1.0 + 1e-9 or not rec.get("failed")
    # evaluation reaches only the clients online at the round's end (the last round: all)
    clock = assemble(ExperimentConfig.from_dict(BUSY)).server.clock
    ids = [f"client-{i}" for i in range(30)]
    assert seen.counts[:-1] == [len(clock.online(ids, t)) for t in times[:-1]]
    assert max(seen.counts[:-1]) < 30 and seen.counts[-1] == 30
    assert all(5 <= r["online"] <= 25 for r in a.history)
    assert a.summary["clock"]["deadline_s"] == 1.0
    assert a.summary["target_accuracy"] == 0.3
    assert a.summary["time_to_target_s"] in times


def test_over_selection_closes_rounds_earlier_than_waiting_for_all() -> None:
    cfg = {**BUSY, "server": {}, "simulation": {**BUSY["simulation"], "availability": "always"}}
    waiting = simulate(cfg, report=False)
    over = simulate({**cfg, "sampling": {"clients_per_round": 10, "over_select": 1.0}},
                    report=False)
    assert all(r["clients"] == 5 for r in over.history)
    assert over.history[-1]["sim_time_s"] < waiting.history[-1]["sim_time_s"]


class StopAfter:
    def on_round_end(self, record, state) -> None:
        if record["round"] == 3:
            raise KeyboardInterrupt


def test_resume_continues_the_clock(tmp_path) -> None:
    whole = simulate(BUSY, out=tmp_path / "whole", report=False)
    with pytest.raises(KeyboardInterrupt):
        simulate(BUSY, out=tmp_path / "cut", callbacks=[StopAfter()], report=False)
    resumed = simulate(resume=tmp_path / "cut", report=False)
    assert strip(resumed.history) == strip(whole.history)
    assert torch.equal(resumed.params.vector, whole.params.vector)


def test_the_report_plots_accuracy_against_simulated_time(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    simulate({**BUSY, "rounds": 3}, out=tmp_path / "run")
    assert (tmp_path / "run" / "plots" / "accuracy_time.png").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "time_to_target_s" in summary and "updates_to_target" in summary
    assert "accuracy_time.png" in (tmp_path / "run" / "report.html").read_text()


def test_secure_aggregation_runs_with_the_clients_that_finish() -> None:
    cfg = {**BUSY, "rounds": 2, "secure_aggregation": {"enabled": True}}
    run = simulate(cfg, report=False)
    assert any(r.get("failed") for r in run.history)
    assert all(r.get("aborted") is None for r in run.history if r["clients"] >= 3)


def test_clock_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="over_select"):
        ExperimentConfig.from_dict({"sampling": {"over_select": 0.3}, "privacy": {
            "mode": "central", "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="server.deadline_s"):
        ExperimentConfig.from_dict({"server": {"deadline_s": -1}})
    cfg = ExperimentConfig.from_dict({"simulation": {"availability": "diurnal"}})
    fed = assemble(ExperimentConfig.from_dict(BASE), Given(dataset=make_toy()))
    with pytest.raises(ConfigError, match="for simulation only"):
        simulated_clock(cfg, fed.dataset, fed.settings, remote=True)
    assert simulated_clock(ExperimentConfig(), fed.dataset, fed.settings, remote=True) is None


def test_uplink_compression_shortens_the_upload_by_its_bytes() -> None:
    toy = make_toy()
    dense = simulate({**BASE, "rounds": 1}, dataset=toy, report=False).history[0]
    top = simulate({**BASE, "rounds": 1, "compression": {"uplink": "topk", "fraction": 0.25}},
                   dataset=toy, report=False).history[0]
    per_client_up = top["bytes_up"] / top["clients"]  # the encoding's exact bytes
    assert per_client_up < dense["bytes_up"] / dense["clients"]
    saved = (dense["bytes_up"] / dense["clients"] - per_client_up) / 1.25e6
    assert dense["sim_time_s"] - top["sim_time_s"] == pytest.approx(saved)


def test_a_trace_file_and_a_round_when_nobody_is_online(tmp_path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start,end\n" + "".join(
        f"c{i},5,{100 + 100 * i}\n" for i in range(4)))
    cfg = {**BASE, "simulation": {"availability": str(trace)}}
    run = simulate(cfg, dataset=make_toy(), report=False)
    first, second = run.history[0], run.history[1]
    assert first["clients"] == 0 and first["online"] == 0 and first["sim_time_s"] == 5.0
    assert second["clients"] == 4 and second["sim_time_s"] > 5.0


def test_include_offline_evaluates_every_client_each_round() -> None:
    seen = Evaluated()
    cfg = {**BUSY, "rounds": 3, "evaluation": {"baselines": [], "include_offline": True}}
    simulate(cfg, report=False, callbacks=[seen])
    assert seen.counts == [30, 30, 30]
