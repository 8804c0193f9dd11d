"""``consortium robustness`` keeps every finished cell, resumes, and draws readable labels."""

from __future__ import annotations

import json

import pytest

import consortium.simulation as simulation
from consortium.cli import main
from consortium.robustness import cell_label, heat_map_figure, label_colour

FAST = ["--rules", "mean,median", "--attacks", "none,sign-flip:scale=4", "--fraction", "0.25",
        "--set", "rounds=1", "--set", "evaluation.baselines=[]"]


class _Counting:
    """The real ``simulate``, counted; raises KeyboardInterrupt at call ``stop`` (1-based)."""

    def __init__(self, stop: int = 0) -> None:
        self.real, self.calls, self.stop = simulation.simulate, 0, stop

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_interrupted_matrix_keeps_its_cells_and_resumes(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "rob"
    cut = _Counting(stop=3)
    monkeypatch.setattr(simulation, "simulate", cut)
    assert main(["robustness", *FAST, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"continue with: consortium robustness --resume {out}" in err and "RUN_DIR" not in err
    saved = _lines(out / "cells.jsonl")
    assert [(c["rule"], c["attack"]) for c in saved] == [("mean", "none"), ("mean", "sign-flip:scale=4")]

    again = _Counting()
    monkeypatch.setattr(simulation, "simulate", again)
    assert main(["robustness", "--resume", str(out)]) == 0
    assert again.calls == 2  # only median's two cells ran
    table = json.loads((out / "robustness.json").read_text())
    assert {r: set(row) for r, row in table.items()} == {
        "mean": {"none", "sign-flip:scale=4"}, "median": {"none", "sign-flip:scale=4"}}
    for c in saved:
        assert table[c["rule"]][c["attack"]] == c["cell"]
    assert "(saved earlier)" in capsys.readouterr().err
    assert "cells taken from an earlier run (cells.jsonl): 2" in (out / "robustness.md").read_text()

    same = _Counting()  # the same command with the same --out: nothing to run
    monkeypatch.setattr(simulation, "simulate", same)
    assert main(["robustness", *FAST, "--out", str(out)]) == 0 and same.calls == 0
    changed = _Counting()  # another experiment (rounds = 2): every cell runs
    monkeypatch.setattr(simulation, "simulate", changed)
    assert main(["robustness", *FAST, "--set", "rounds=2", "--out", str(out)]) == 0
    assert changed.calls == 4


def test_resume_refuses_other_arguments_and_folders_that_are_not_reports(tmp_path, capsys) -> None:
    assert main(["robustness", "--resume", str(tmp_path), "--fraction", "0.3"]) == 2
    assert "drop --fraction" in capsys.readouterr().err
    assert main(["robustness", "--resume", str(tmp_path)]) == 2
    assert "not a robustness report to continue" in capsys.readouterr().err
    assert main(["robustness", *FAST]) == 2
    assert "give --out DIR" in capsys.readouterr().err


def test_out_onto_a_users_folder_or_a_file_is_refused(tmp_path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep")
    assert main(["robustness", *FAST, "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a robustness report: it holds notes.md" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md"]
    assert main(["robustness", *FAST, "--out", str(mine / "notes.md")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def _contrast(a, b) -> float:
    def lum(rgb) -> float:
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_label_colour_by_hand() -> None:
    assert label_colour((0.0, 0.0, 0.0, 1.0)) == "white"
    assert label_colour((1.0, 1.0, 1.0, 1.0)) == "black"
    assert label_colour((1.0, 1.0, 0.0)) == "black"  # yellow: luminance 0.93
    assert label_colour((0.0, 0.0, 1.0)) == "white"  # blue: luminance 0.07
    assert cell_label(0.8666) == "0.87" and cell_label(0.05) == "0.05"


@pytest.mark.parametrize("value", [0.02, 0.3, 0.5, 0.7, 0.98])
def test_every_heat_map_label_is_readable_on_its_cell(value) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    table = {
        "mean": {"backdoor": {"accuracy": value, "backdoor_success": value},
                 "none": {"accuracy": 1 - value, "backdoor_success": None}},
        "krum": {"backdoor": {"accuracy": None, "backdoor_success": None, "error": "too few"},
                 "none": {"accuracy": value, "backdoor_success": None}},
    }
    fig = heat_map_figure(table)
    try:
        panels = [ax for ax in fig.axes if ax.images]
        assert [ax.get_title() for ax in panels] == [
            "final accuracy", "backdoor success (lower is better)"]
        for ax in panels:
            im = ax.images[0]
            labels = [t for t in ax.texts if t.get_text() != "error"]
            assert labels
            for text in labels:
                cell = im.cmap(im.norm(float(text.get_text())))
                # a WCAG "large text" floor; the old rule (white below 0.5) gave 1.0-2.8 on magma_r
                assert _contrast(to_rgb(text.get_color()), cell) >= 3.0, (ax.get_title(), value)
        assert any(t.get_text() == "error" for t in panels[0].texts)
    finally:
        plt.close(fig)
