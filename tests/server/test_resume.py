"""Checkpoint after every round; a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json

import pytest
import torch

from consortium import simulate
from consortium.errors import CheckpointError, ConfigError
from tests.conftest import make_toy

CFG = {
    "name": "resume-test",
    "rounds": 4,
    "seed": 3,
    "algorithm": {"name": "scaffold", "lr": 0.1, "batch_size": 16},
    "server": {"optimizer": "adam", "lr": 0.05},
    "sampling": {"clients_per_round": 2},
    "simulation": {"stragglers": 0.5},
}


class StopAfter:
    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def on_round_end(self, record, state) -> None:
        if record["round"] == self.rounds:
            raise KeyboardInterrupt


def test_resume_equals_uninterrupted(tmp_path) -> None:
    toy = make_toy()
    whole = simulate(CFG, dataset=toy, out=tmp_path / "whole", report=False)
    with pytest.raises(KeyboardInterrupt):
        simulate(CFG, dataset=toy, out=tmp_path / "cut", callbacks=[StopAfter(2)], report=False)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["round"] == 2
    resumed = simulate(resume=tmp_path / "cut", dataset=toy, report=False)
    assert torch.equal(resumed.params.vector, whole.params.vector)
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]
    assert strip(resumed.history) == strip(whole.history)
    assert resumed.summary["final"] == whole.summary["final"]


def test_metrics_written_after_the_last_checkpoint_are_dropped(tmp_path) -> None:
    toy = make_toy()
    with pytest.raises(KeyboardInterrupt):
        simulate(CFG, dataset=toy, out=tmp_path / "cut", callbacks=[StopAfter(2)], report=False)
    log = tmp_path / "cut" / "metrics.jsonl"
    log.write_text(log.read_text() + json.dumps({"round": 3, "clients": 2}) + "\n")
    resumed = simulate(resume=tmp_path / "cut", dataset=toy, report=False)
    rounds = [json.loads(line)["round"] for line in log.read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]
    assert resumed.summary["rounds"] == 4


def test_existing_run_directory_is_not_overwritten(tmp_path) -> None:
    toy = make_toy()
    simulate({**CFG, "rounds": 1}, dataset=toy, out=tmp_path / "r", report=False)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        simulate({**CFG, "rounds": 1}, dataset=toy, out=tmp_path / "r", report=False)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_resume_of_a_non_run_directory_is_explained(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a run directory"):
        simulate(resume=tmp_path)
    (tmp_path / "config.toml").write_text('name = "x"\n')
    with pytest.raises(CheckpointError, match="no checkpoint"):
        simulate(resume=tmp_path, dataset=make_toy())
