"""Site policies: a site refuses what would take it past its budget, and the round goes on."""

from __future__ import annotations

import dp_accounting
import pytest

import consortium
from consortium.errors import ConfigError
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.privacy.policy import SitePolicy, load_policies, site_epsilon
from tests.conftest import make_toy


def test_site_epsilon_is_plain_gaussian_composition() -> None:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(2.0), 3)
    assert site_epsilon(2.0, 3, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert site_epsilon(2.0, 0, 1e-5) == 0.0


def write(tmp_path, text: str):
    path = tmp_path / "policies.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("executor", [SequentialExecutor, VectorizedExecutor])
def test_a_site_stops_at_its_budget_and_the_others_go_on(tmp_path, executor) -> None:
    z = 2.0
    budget = (site_epsilon(z, 2, 1e-5) + site_epsilon(z, 3, 1e-5)) / 2  # room for two releases
    policies = write(tmp_path, f"[sites.c1]\nmax_epsilon = {budget}\n")
    cfg = {
        "rounds": 4, "algorithm": {"lr": 0.1},
        "privacy": {"mode": "central", "noise_multiplier": z, "clip": 1.0,
                    "site_policies": policies, "sampling": "fixed"},
    }
    result = consortium.simulate(cfg, dataset=make_toy(4), executor=executor())
    took_part = [r["round"] for r in result.history if "c1" not in r.get("failed", {})]
    assert took_part == [1, 2]
    for record in result.history[2:]:
        assert record["clients"] == 3
        assert "past its budget" in record["failed"]["c1"]


def test_min_sites_and_releases_without_dp(tmp_path) -> None:
    policies = write(tmp_path, "[default]\nmin_sites = 5\n")
    cfg = {"rounds": 1, "privacy": {"site_policies": policies}}
    result = consortium.simulate(cfg, dataset=make_toy(4))
    record = result.history[0]
    assert record["clients"] == 0 and len(record["failed"]) == 4
    assert "at least 5" in record["failed"]["c0"]

    policies = write(tmp_path, "[default]\nmax_epsilon = 10\n")
    result = consortium.simulate({"rounds": 1, "privacy": {"site_policies": policies}},
                                 dataset=make_toy(4))
    assert "without differential privacy" in result.history[0]["failed"]["c2"]


def test_policy_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_policies(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match="unknown key 'budget'"):
        load_policies(write(tmp_path, "[sites.a]\nbudget = 1\n"))
    with pytest.raises(ConfigError, match="max_epsilon"):
        load_policies(write(tmp_path, "[default]\nmax_epsilon = -1\n"))
    got = load_policies(write(tmp_path, "[default]\ndelta = 1e-6\n[sites.a]\nmax_epsilon = 3\n"))
    assert got["a"] == SitePolicy(max_epsilon=3.0, delta=1e-6) and got["*"].delta == 1e-6
