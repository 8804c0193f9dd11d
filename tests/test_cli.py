"""The `consortium` command: run directory contract, clear one-line errors, listing commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from consortium.cli import main
from consortium.reporting.callbacks import read_metrics

FAST = ["--set", "rounds=3", "--no-progress"]


def test_run_writes_the_run_directory_contract(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *FAST]) == 0
    for name in ("config.toml", "metrics.jsonl", "summary.json", "model.safetensors", "report.html"):
        assert (out / name).is_file(), name
    assert any((out / "plots").glob("*.png"))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3]
    for key in ("round", "clients", "train_loss", "accuracy", "loss", "auc", "bytes_up",
                "bytes_down", "epsilon", "wall_s"):
        assert key in records[-1], key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3
    assert set(summary["privacy"]) == {"epsilon", "delta", "accountant"}
    assert set(summary["baselines"]) == {"local", "pooled"}
    assert 0 <= summary["final"]["accuracy"] <= 1
    assert summary["duration_s"] > 0
    text = capsys.readouterr().out
    assert "federated" in text and "pooled" in text and "local only" in text


def test_config_toml_reruns_the_same_experiment(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--out", str(a), *FAST, "--set", "evaluation.baselines=[]"]) == 0
    assert main(["run", str(a / "config.toml"), "--out", str(b), "--no-progress"]) == 0
    fa = json.loads((a / "summary.json").read_text())["final"]
    fb = json.loads((b / "summary.json").read_text())["final"]
    assert fa == fb


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "data.dataset=mnist"], "data.dataset"),
        (["--set", "model.name=cnn"], "image data"),
        (["--set", "algorithm.lr=abc"], "algorithm.lr"),
        (["--set", "sampling.clients_per_round=9"], "only 4 clients"),
        (["missing.toml"], "does not exist"),
        (["--set", "algorithm.name=fednova", "--set", "algorithm.optimizer=adam"], "needs local optimizer 'sgd'"),
        (["--set", "data.partition=iid"], "four real hospitals"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, fragment) -> None:
    assert main(["run", *args, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("consortium: error:") and fragment in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_resume_refuses_other_options(tmp_path, capsys) -> None:
    assert main(["run", "--resume", str(tmp_path), "--set", "rounds=2"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_listing_commands(capsys) -> None:
    assert main(["datasets"]) == 0
    text = capsys.readouterr().out
    assert "heart-disease" in text and "dirichlet" in text
    assert main(["algorithms"]) == 0
    text = capsys.readouterr().out
    for name in ("fedavg", "fedprox", "scaffold", "fednova", "yogi", "cnn"):
        assert name in text


def test_console_script_entry_point_exit_code(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "consortium.cli", "run", "--set", "rounds=0", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "rounds = 0" in proc.stderr


def test_resume_from_the_command_line(tmp_path, capsys) -> None:
    from consortium import simulate

    class StopAfterTwo:
        def on_round_end(self, record, state) -> None:
            if record["round"] == 2:
                raise KeyboardInterrupt

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["run", "--out", str(whole), *FAST, "--set", "evaluation.baselines=[]"]) == 0
    with pytest.raises(KeyboardInterrupt):
        simulate(None, overrides=["rounds=3", "evaluation.baselines=[]"], out=cut,
                 callbacks=[StopAfterTwo()], report=False)
    assert not (cut / "summary.json").exists()
    assert main(["run", "--resume", str(cut), "--no-progress"]) == 0
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert b["rounds"] == 3 and a["final"] == b["final"]
    assert (cut / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_run_with_central_dp_reports_epsilon(tmp_path, capsys) -> None:
    out = tmp_path / "dp"
    args = ["run", "--out", str(out), *FAST, "--set", "privacy.mode=central",
            "--set", "privacy.noise_multiplier=1.0", "--set", "evaluation.baselines=[]"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "privacy: (ε =" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] > 0 and (out / "privacy.json").is_file()
    assert all(r["epsilon"] is not None for r in read_metrics(out / "metrics.jsonl"))
