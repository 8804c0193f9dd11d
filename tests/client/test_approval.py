"""The experiment manifest a site approves: what is in it, what changes its hash, the CLI."""

from __future__ import annotations

import json

import pytest

from consortium.cli import main
from consortium.client.approval import experiment_manifest, manifest_hash, review_experiment
from consortium.config import ExperimentConfig
from consortium.errors import ConfigError
from consortium.privacy.policy import SitePolicy, load_policies


def _cfg(**sections) -> ExperimentConfig:
    return ExperimentConfig.from_dict(sections)


def test_what_a_site_sends_changes_the_hash_and_what_only_the_server_uses_does_not() -> None:
    base = manifest_hash(_cfg())
    assert manifest_hash(_cfg(rounds=11)) != base
    assert manifest_hash(_cfg(model={"name": "mlp"})) != base
    assert manifest_hash(_cfg(privacy={"mode": "local", "noise_multiplier": 1.0})) != base
    assert manifest_hash(_cfg(secure_aggregation={"enabled": True})) != base
    assert manifest_hash(_cfg(secure_aggregation={"threshold": 0.9})) != base
    # the server's optimiser, executor and baselines, and the noise source it must use anyway
    assert manifest_hash(_cfg(server={"optimizer": "adam"}, executor={"kind": "sequential"},
                              evaluation={"baselines": []},
                              privacy={"noise_source": "os"})) == base


def test_the_manifest_says_what_leaves_the_site() -> None:
    local = experiment_manifest(_cfg(privacy={"mode": "local", "noise_multiplier": 1.3},
                                     secure_aggregation={"enabled": True}))
    text = " ".join(local["leaves_site"])
    assert "DP-SGD with the site's own noise" in text and "1.3" in text
    assert "masked by secure aggregation" in text
    plain = " ".join(experiment_manifest(_cfg())["leaves_site"])
    assert "in the clear" in plain and "masked" not in plain


def test_a_config_round_trip_through_toml_keeps_the_hash() -> None:
    """The site hashes the TOML the server sends; the operator hashed the experiment file."""
    import tomllib

    cfg = _cfg(model={"name": "mlp", "hidden": [8, 4]}, privacy={"mode": "central",
               "noise_multiplier": 1.0}, sampling={"fraction": 0.5})
    again = ExperimentConfig.from_dict(tomllib.loads(cfg.to_toml()))
    assert manifest_hash(again) == manifest_hash(cfg)


def test_approval_by_hash_or_by_matching_rules() -> None:
    cfg = _cfg()
    digest = manifest_hash(cfg)
    assert "has not approved" in review_experiment(cfg, None)
    assert review_experiment(cfg, None, approved=[digest]) is None
    assert review_experiment(cfg, SitePolicy(approve=(digest,))) is None
    assert review_experiment(cfg, SitePolicy(approve="matching")) is None
    assert "requires secure aggregation" in review_experiment(
        cfg, SitePolicy(approve="matching", require_secure_aggregation=True))
    foreign = _cfg(model={"name": "somepkg.models:net"})
    assert "--allow-model somepkg.models:net" in review_experiment(foreign, None, approved=[manifest_hash(foreign)])
    assert review_experiment(foreign, None, approved=[manifest_hash(foreign)],
                             allow_models=["somepkg.models:net"]) is None


def test_policy_files_take_the_experiment_rules(tmp_path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[default]\napprove = "matching"\nmodels = ["a.b:c"]\nsend_metrics = ["train_loss"]\n'
                    '[sites.x]\nrequire_dp = true\n')
    got = load_policies(path)
    assert got["x"].require_dp and got["x"].models == ("a.b:c",) and got["*"].approve == "matching"
    path.write_text('[default]\napprove = "anything"\n')
    with pytest.raises(ConfigError, match="matching"):
        load_policies(path)


def test_consortium_manifest_prints_the_hash_a_site_approves(capsys) -> None:
    assert main(["manifest", "--set", "rounds=7", "--hash"]) == 0
    printed = capsys.readouterr().out.strip()
    from consortium.config import load_config

    assert printed == manifest_hash(load_config(None, ["rounds=7"]))
    assert printed != manifest_hash(load_config(None, []))
    assert main(["manifest", "--set", "rounds=7", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sha256"] == printed and data["manifest"]["rounds"] == 7


def test_a_site_that_refuses_contribution_scoring_refuses_the_whole_experiment() -> None:
    """A one-site coalition model is that site's update, evaluated by the other sites: a site
    with ``contribution = false`` must not train at all in such a run, or its updates reach
    them; without ``[contribution]`` the same policy joins."""
    scored = _cfg(contribution={"method": "leave-one-out"})
    no = SitePolicy(approve="matching", contribution=False)
    why = review_experiment(scored, no)
    assert why is not None and "contribution = false" in why and "leave-one-out" in why
    assert review_experiment(_cfg(), no) is None
    assert review_experiment(scored, SitePolicy(approve="matching")) is None
