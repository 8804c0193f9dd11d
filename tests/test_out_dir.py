"""``--out`` never writes over a user's files; an interrupted run names its real directory."""

from __future__ import annotations

import json

import pytest

import consortium.simulation as simulation
from consortium import simulate
from consortium.cli import main
from consortium.errors import ConfigError
from tests.conftest import make_toy

CFG = {"name": "out-test", "rounds": 2, "seed": 1, "evaluation": {"baselines": []}}
FAST = ["--set", "rounds=2", "--set", "evaluation.baselines=[]", "--no-progress", "--no-report"]


def test_a_folder_with_a_users_files_is_refused_and_left_as_it_was(tmp_path, capsys) -> None:
    folder = tmp_path / "mine"
    (folder / "plots").mkdir(parents=True)
    (folder / "summary.json").write_text('{"mine": true}')
    (folder / "plots" / "figure.png").write_bytes(b"png")
    assert main(["run", "--out", str(folder), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "is a folder that is not a run" in err and "plots, summary.json" in err
    assert "give a new or empty folder" in err
    assert (folder / "summary.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in folder.rglob("*")) == ["figure.png", "plots", "summary.json"]


def test_a_users_own_config_toml_is_not_taken_for_a_run(tmp_path) -> None:
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "config.toml").write_text('rounds = 2\n')
    with pytest.raises(ConfigError, match="not a run: it holds config.toml"):
        simulate(CFG, dataset=make_toy(), out=folder, report=False)
    assert (folder / "config.toml").read_text() == 'rounds = 2\n'


def test_out_onto_a_file_is_one_line(tmp_path, capsys) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert main(["run", "--out", str(target), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err
    assert target.read_text() == "keep me"


def test_empty_folder_and_a_run_stopped_before_round_one_are_fine(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    simulate(CFG, dataset=make_toy(), out=empty, report=False)
    assert (empty / "metrics.jsonl").exists()
    early = tmp_path / "early"  # what a run writes before its first round ends
    early.mkdir()
    (early / "config.toml").write_text((empty / "config.toml").read_text())
    simulate(CFG, dataset=make_toy(), out=early, report=False)
    assert json.loads((early / "summary.json").read_text())["rounds"] == 2


def test_a_run_is_still_refused_and_resumed(tmp_path) -> None:
    run = tmp_path / "run"
    simulate(CFG, dataset=make_toy(), out=run, report=False)
    with pytest.raises(ConfigError, match="already holds a run; resume it with --resume"):
        simulate(CFG, dataset=make_toy(), out=run, report=False)
    again = simulate(resume=run, dataset=make_toy(), report=False)
    assert again.summary["rounds"] == 2


class _StopAfter:
    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def on_round_end(self, record, state) -> None:
        if record["round"] == self.rounds:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop_at", [1, 0])
def test_interrupt_names_the_real_run_directory(tmp_path, capsys, monkeypatch, stop_at) -> None:
    real = simulation.simulate

    def interrupted(*args, **kwargs):
        if not stop_at:
            raise KeyboardInterrupt
        return real(*args, callbacks=[_StopAfter(stop_at)], **kwargs)

    monkeypatch.setattr(simulation, "simulate", interrupted)
    out = tmp_path / "my run"
    assert main(["run", "--out", str(out), "--set", "rounds=3", *FAST[2:]]) == 130
    err = capsys.readouterr().err
    assert "RUN_DIR" not in err and str(out) in err
    if stop_at:
        assert f"consortium run --resume '{out}'" in err
        monkeypatch.setattr(simulation, "simulate", real)
        assert main(["run", "--resume", str(out), "--no-progress", "--no-report"]) == 0
        assert json.loads((out / "summary.json").read_text())["rounds"] == 3
    else:
        assert "before the first round finished" in err
