"""Settings that used to be accepted and ignored (issue 20 item 4) are refused with the fix,
or, where the value came from the embedded default rather than the user, adapted with a notice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consortium.cli import main
from consortium.config import defaulted_keys, fit_default_cohort, load_config
from consortium.errors import ConfigError
from consortium.privacy.reading import check_delta, epsilon_reading
from consortium.simulation import simulate

QUICK = {"rounds": 1, "evaluation": {"baselines": []}}


@pytest.mark.parametrize("key", ["noise_multiplier=1.0", "clip=0.5", "target_epsilon=8.0"])
def test_dp_settings_without_a_dp_mode_are_an_error_with_the_fix(key: str) -> None:
    with pytest.raises(ConfigError, match=r'privacy\.mode = "none".*set privacy\.mode = "central"'):
        load_config(None, [f"privacy.{key}"])
    load_config(None, ["privacy.mode=central", f"privacy.{key}"] if key != "clip=0.5"
                else ["privacy.mode=central", "privacy.noise_multiplier=1.0", f"privacy.{key}"])


def test_delta_at_least_one_over_n_is_an_error() -> None:
    check_delta("central", 0.2, sites=4, records=[])  # below 1/4
    with pytest.raises(ConfigError, match=r"privacy\.delta = 0\.5 is at least 1/n = 1/4.*1e-05"):
        check_delta("central", 0.5, sites=4, records=[])
    with pytest.raises(ConfigError, match=r"1/n = 1/300.*largest site"):
        check_delta("local", 0.01, sites=3, records=[10, 300, 20])
    check_delta("none", 0.5, sites=4, records=[])  # no DP: nothing to check
    with pytest.raises(ConfigError, match="1e-06"):  # the suggestion fits n
        check_delta("local", 0.5, sites=1, records=[50_000])


def test_delta_of_one_half_is_refused_before_round_one() -> None:
    cfg = {**QUICK, "privacy": {"mode": "central", "noise_multiplier": 1.0, "delta": 0.5}}
    with pytest.raises(ConfigError, match=r"privacy\.delta = 0\.5 .*4 sites"):
        simulate(cfg)


def test_a_weak_epsilon_is_read_as_weak_in_the_summary_and_on_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert epsilon_reading(None) is None
    assert "strong" in (epsilon_reading(0.5) or "") and "moderate" in (epsilon_reading(8) or "")
    assert "weak" in (epsilon_reading(40.0) or "")
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--no-progress", "--no-report", "--set", "rounds=1",
                 "--set", "evaluation.baselines=[]", "--set", "privacy.mode=central",
                 "--set", "privacy.noise_multiplier=0.3", "--set", "privacy.clip=0.5"]) == 0
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert privacy["epsilon"] > 10 and "weak" in privacy["reading"]
    assert "privacy.noise_multiplier" in privacy["reading"]  # the fix
    assert "WARNING" in capsys.readouterr().out


def test_clients_for_naturally_partitioned_data_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.clients = 10 does not apply.*four hospitals"):
        load_config(None, ["data.clients=10"])
    with pytest.raises(ConfigError, match="your files"):
        load_config(None, ["data.dataset=csv", "data.path=x.csv", "data.target=y",
                           "data.clients=3"])
    load_config(None, ["data.dataset=synthetic", "data.clients=10"])  # where it applies


def test_the_default_run_name_follows_the_data(tmp_path: Path) -> None:
    assert load_config().name == "heart-disease"  # the demo keeps its name
    assert load_config(None, ["data.dataset=synthetic"]).name == "synthetic"
    assert load_config(None, ["data.dataset=csv", "data.path=hosp/*.csv", "data.target=y"]
                       ).name == "hosp"
    assert load_config(None, ["data.dataset=synthetic", "name=mine"]).name == "mine"
    file = tmp_path / "exp.toml"
    file.write_text('[data]\ndataset = "digits"\npartition = "iid"\n')
    assert load_config(file).name == "digits"
    file.write_text('name = "study"\n[data]\ndataset = "digits"\npartition = "iid"\n')
    assert load_config(file).name == "study"


def _three_sites(folder: Path) -> Path:
    folder.mkdir()
    for s, site in enumerate(("a", "b", "c")):
        rows = [f"{(i * 7 + s) % 50},{(i * 3) % 11},{(i + s) % 2}" for i in range(24)]
        (folder / f"{site}.csv").write_text("x1,x2,y\n" + "\n".join(rows) + "\n")
    return folder


def test_the_demos_clients_per_round_gives_way_on_a_smaller_federation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _three_sites(tmp_path / "sites")
    data = ["--set", "data.dataset=csv", "--set", f"data.path={folder}", "--set", "data.target=y"]
    cfg = load_config(None, [s for s in data if s != "--set"])
    assert "sampling.clients_per_round" in defaulted_keys(cfg)
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--no-progress", "--no-report", "--set", "rounds=1",
                 "--set", "evaluation.baselines=[]", *data]) == 0
    err = capsys.readouterr().err
    assert "clients_per_round = 4" in err and "every client takes part" in err
    assert json.loads((out / "summary.json").read_text())["name"] == "sites"
    assert "clients_per_round = 0" in (out / "config.toml").read_text()  # resumable as it ran
    # set by the user, the same count stays an error
    assert main(["run", "--out", str(tmp_path / "r2"), "--no-progress", "--set", "rounds=1",
                 "--set", "sampling.clients_per_round=4", *data]) == 2
    assert "only 3 clients" in capsys.readouterr().err


def test_only_a_default_count_is_adapted() -> None:
    demo = load_config()
    assert fit_default_cohort(demo, 4) is demo  # the demo itself: 4 of 4, unchanged
    assert fit_default_cohort(demo, 3).sampling.clients_per_round == 0
    mine = load_config(None, ["sampling.clients_per_round=4"])
    assert "sampling.clients_per_round" not in defaulted_keys(mine)
    assert fit_default_cohort(mine, 3) is mine
    assert defaulted_keys(demo.replace(rounds=3)) == frozenset()  # a copy counts as the user's
