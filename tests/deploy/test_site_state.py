"""A deployed site's own state: its policy, and its privacy spend kept on disk across restarts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.client.state import ClientStateStore
from consortium.deploy.client import SiteRunner, _Site, _site_policy
from consortium.errors import ConfigError


class _Client:
    """Trains by adding 1 to its algorithm state and counting a release, as SCAFFOLD's c_i and
    a policy's ledger would change."""

    client_id = "east"

    def __init__(self) -> None:
        self.policy = None
        self.state = ClientStateStore()

    def fit(self, task: object) -> str:
        mine = self.state.get(self.client_id)
        mine["c_i"] = mine.get("c_i", torch.zeros(2)) + 1
        mine["privacy.releases"] = mine.get("privacy.releases", torch.zeros(1)) + 1
        return "result"


def _site() -> _Site:
    return _Site(_Client(), ((3,), 2, 10, 5))


def _task(rnd: int) -> SimpleNamespace:
    return SimpleNamespace(round=rnd)


def test_a_round_done_again_after_a_server_restart_rolls_the_algorithm_state_back(
    tmp_path: Path,
) -> None:
    """The server resumed from its checkpoint of round 2 and lost our round-3 result: round 3
    again starts from the state before round 3 (c_i), but the spend stays (the update left)."""
    file = tmp_path / "run-1.safetensors"
    site = _site()
    site.attach(None, file)
    for rnd in (1, 2, 3):
        site.fit(_task(rnd))
        site.save_state()
    restarted = _site()  # a new process reading the file (or a reconnection: same result)
    restarted.attach(None, file)
    restarted.fit(_task(3))
    mine = restarted.client.state.get("east")
    assert mine["c_i"].tolist() == [3.0, 3.0]  # 2 rounds before + round 3 once
    assert float(mine["privacy.releases"][0]) == 4.0  # every release counted
    restarted.fit(_task(4))
    assert restarted.client.state.get("east")["c_i"].tolist() == [4.0, 4.0]


def test_a_reconnection_keeps_the_state_in_memory_without_a_state_dir() -> None:
    first = _site()
    first.attach(None, None)
    first.fit(_task(1))
    again = _site()
    again.attach(None, None, kept=first)
    assert again.client.state.get("east")["c_i"].tolist() == [1.0, 1.0]
    again.fit(_task(1))  # the same round re-issued
    assert again.client.state.get("east")["c_i"].tolist() == [1.0, 1.0]


def test_the_spend_survives_a_restart(tmp_path: Path) -> None:
    file = tmp_path / "state" / "run-1.safetensors"
    first = _site()
    first.attach(None, file)
    first.client.state.get("east")["privacy.dp_steps"] = torch.tensor([12.0])
    first.save_state()
    restarted = _site()
    restarted.attach("the policy", file)
    assert restarted.client.policy == "the policy"
    assert float(restarted.client.state.get("east")["privacy.dp_steps"][0]) == 12.0
    assert not file.with_name(file.name + ".tmp").exists()


def test_an_unreadable_state_file_is_an_error_not_a_fresh_budget(tmp_path: Path) -> None:
    file = tmp_path / "run-1.safetensors"
    file.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="unreadable.*privacy spend"):
        _site().attach(None, file)
    assert file.read_bytes() == b"not safetensors"  # left for the operator


def test_a_policy_file_must_cover_the_site(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("[sites.west]\nmax_epsilon = 2.0\n")
    with pytest.raises(ConfigError, match=r"no rule for site 'east'.*\[sites.east\]"):
        _site_policy(policy, "east")
    assert _site_policy(policy, "west").max_epsilon == 2.0
    policy.write_text("[default]\nmax_epsilon = 3.0\n")
    assert _site_policy(policy, "east").max_epsilon == 3.0


def test_a_policy_without_a_place_to_keep_the_spend_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "east.csv"
    data.write_text("a,label\n1,0\n")
    policy = tmp_path / "p.toml"
    policy.write_text("[default]\nmax_epsilon = 3.0\n")
    with pytest.raises(ConfigError, match="--state DIR"):
        SiteRunner("127.0.0.1:1", site="east", data=data, certs=None, policy=policy)
    runner = SiteRunner("127.0.0.1:1", site="east", data=data, certs=None, policy=policy,
                        state_dir=tmp_path / "s")
    assert runner._state_file("run/../x") == tmp_path / "s" / "run_.._x.safetensors"
