"""``consortium run --seeds``: seed parsing, the t interval over seeds, and the multi-seed driver."""

from __future__ import annotations

import json
import math

import pytest
import tomllib
from scipy import stats

from consortium.cli import main
from consortium.errors import ConfigError
from consortium.intervals import t_interval
from consortium.seed_runs import is_multi_seed_dir, parse_seeds, seed_rows, summarise_seeds


@pytest.mark.parametrize(("text", "seeds"), [
    ("0-4", [0, 1, 2, 3, 4]), ("0,3,7", [0, 3, 7]), ("0-2,9", [0, 1, 2, 9]), ("5", [5]),
    (" 1 - 2 ", [1, 2]),
])
def test_parse_seeds(text, seeds) -> None:
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(("text", "fragment"), [
    ("a", "not a seed"), ("3-1", "FIRST <= LAST"), ("1,1", "more than once"),
    ("0-2,2", "more than once"), ("-1", "non-negative"), ("", "not a seed"), ("1.5", "not a seed"),
])
def test_parse_seeds_rejects(text, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_seeds(text)


def test_t_interval_on_hand_values() -> None:
    # 1, 2, 3: mean 2, s = 1, t(0.975, 2) = 4.3027 (any t table) → 2 ± 4.3027 / √3 = 2 ± 2.4841
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert low == pytest.approx(2 - 2.48414, abs=1e-4)
    assert high == pytest.approx(2 + 2.48414, abs=1e-4)
    # 0.80, 0.84, 0.82, 0.86, 0.78: mean 0.82, s = 0.031623, t(0.975, 4) = 2.7764 → ± 0.039265
    mean, low, high = t_interval([0.80, 0.84, 0.82, 0.86, 0.78])
    assert mean == pytest.approx(0.82)
    assert (low, high) == pytest.approx((0.82 - 0.039265, 0.82 + 0.039265), abs=1e-5)


def test_t_interval_matches_scipy_and_edge_cases() -> None:
    values = [0.3, 0.9, 0.5, 0.55]
    _, low, high = t_interval(values, confidence=0.9)
    ref = stats.t.interval(0.9, len(values) - 1, loc=sum(values) / 4, scale=stats.sem(values))
    assert (low, high) == pytest.approx(ref)
    assert t_interval([0.7]) == (0.7, None, None)
    assert t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="finite"):
        t_interval([0.5, math.nan])
    with pytest.raises(ConfigError, match="confidence"):
        t_interval([0.5, 0.6], confidence=95)


def test_summarise_seeds_keeps_metrics_every_run_has() -> None:
    runs = {
        0: {"final": {"accuracy": 0.8, "auc": 0.9}, "baselines": {"local": {"accuracy": 0.7}},
            "personalized": {"accuracy": 0.85}},
        1: {"final": {"accuracy": 0.6, "auc": None},
            "baselines": {"local": {"accuracy": 0.5}, "pooled": {"accuracy": 0.9}}},
    }
    results = summarise_seeds(runs)
    assert set(results) == {"final", "baselines"}  # personalized: not in every run
    assert set(results["final"]) == {"accuracy"}  # auc is null in one run
    assert set(results["baselines"]) == {"local"}
    entry = results["final"]["accuracy"]
    assert entry["values"] == [0.8, 0.6]
    assert entry["mean"] == pytest.approx(0.7)
    # n = 2: s = 0.141421, t(0.975, 1) = 12.7062 → half width 1.27062
    assert entry["ci"] == pytest.approx([0.7 - 1.27062, 0.7 + 1.27062], abs=1e-4)
    rows = seed_rows(results)
    assert [(model, metric) for model, metric, _ in rows] == [
        ("federated", "accuracy"), ("local only", "accuracy"),
    ]


def test_run_seeds_writes_one_run_per_seed_and_seeds_json(tmp_path, capsys) -> None:
    out = tmp_path / "multi"
    fast = ["--set", "rounds=2", "--set", "evaluation.baselines=[\"local\"]", "--no-progress",
            "--no-report"]
    assert main(["run", "--seeds", "0-2", "--out", str(out), *fast]) == 0
    printed = capsys.readouterr().out
    assert "95% Student t interval" in printed and "local only" in printed
    report = json.loads((out / "seeds.json").read_text())
    assert report["seeds"] == [0, 1, 2]
    accuracies = []
    for seed in (0, 1, 2):
        run = out / f"seed-{seed}"
        for name in ("config.toml", "metrics.jsonl", "summary.json", "model.safetensors"):
            assert (run / name).is_file(), (seed, name)
        assert tomllib.loads((run / "config.toml").read_text())["seed"] == seed
        accuracies.append(json.loads((run / "summary.json").read_text())["final"]["accuracy"])
    final = report["results"]["final"]["accuracy"]
    assert final["values"] == accuracies
    assert len(set(accuracies)) > 1  # the seeds differ
    mean, low, high = t_interval(accuracies)
    assert final["mean"] == pytest.approx(mean) and final["ci"] == pytest.approx([low, high])
    assert "local" in report["results"]["baselines"]
    # seed 1 of the sweep is the run `--set seed=1` makes on its own
    single = tmp_path / "single"
    assert main(["run", "--set", "seed=1", "--out", str(single), *fast]) == 0
    alone = json.loads((single / "summary.json").read_text())["final"]["accuracy"]
    assert alone == accuracies[1]
    # the multi-seed directory is not resumable, and is not written over
    assert is_multi_seed_dir(out) and not is_multi_seed_dir(out / "seed-0")
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--no-progress"]) == 2
    assert "multi-seed" in capsys.readouterr().err
    assert main(["run", "--seeds", "0-1", "--out", str(out), *fast]) == 2
    assert "already holds" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "fragment"), [
    (["--seeds", "0-2", "--resume", "somewhere"], "--resume does not combine with --seeds"),
    (["--seeds", "0-2", "--set", "seed=3"], "--seeds only"),
    (["--seeds", "2-0"], "FIRST <= LAST"),
])
def test_run_seeds_bad_input_is_exit_2(tmp_path, capsys, args, fragment) -> None:
    assert main(["run", *args, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
