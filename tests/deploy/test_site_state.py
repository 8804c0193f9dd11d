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


def _site() -> _Site:
    return _Site(SimpleNamespace(policy=None, state=ClientStateStore()), ((3,), 2, 10, 5))


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
