"""The composition root: the server's client stages are the ones every deployed site builds."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from consortium.algorithms import build_algorithm
from consortium.config import ExperimentConfig
from consortium.federation import (
    BUILDERS,
    Federation,
    Given,
    assemble,
    local_training,
    site_pipeline,
)
from consortium.privacy.central import CentralDP
from consortium.privacy.distributed import DistributedDP
from consortium.secagg.stage import SecureAggregation
from tests.conftest import make_toy

# Fields only the server's half reads: central DP's noise and clip adaptation run at the
# server (a site's client half reads the clip norm from the task's payload).
SERVER_ONLY: dict[type, set[str]] = {
    CentralDP: {"noise_multiplier", "adaptive", "target_quantile", "clip_lr", "count_stddev",
                "noise_source"},
}

FEDADAM = {"optimizer": "adam", "lr": 0.05}  # FedAdam (Reddi et al. 2021)
CONFIGS: dict[str, dict[str, Any]] = {
    "distributed+secagg+fedadam+bound": {
        "privacy": {"mode": "distributed", "noise_multiplier": 0.5, "clip": 0.5},
        "secure_aggregation": {"enabled": True, "authenticate": True},
        "aggregation": {"update_bound": 3.0}, "server": FEDADAM,
    },
    "central+secagg+fedadam": {
        "privacy": {"mode": "central", "noise_multiplier": 0.7, "clip": 0.05, "adaptive": True},
        "secure_aggregation": {"enabled": True, "authenticate": True}, "server": FEDADAM,
    },
    "median+fedadam": {"aggregation": {"rule": "median"}, "server": FEDADAM},
    "local+secagg": {
        "privacy": {"mode": "local", "noise_multiplier": 0.5, "clip": 1.0},
        "secure_aggregation": {"enabled": True},
    },
}
EXPECTED_TYPES = {
    "distributed+secagg+fedadam+bound": [DistributedDP, SecureAggregation],
    "central+secagg+fedadam": [CentralDP, SecureAggregation],
    "median+fedadam": [],
    "local+secagg": [SecureAggregation],
}


def _config(extra: dict[str, Any]) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "rounds": 2, "seed": 3, "evaluation": {"baselines": []},
        "sampling": {"clients_per_round": 5}, **extra,
    })


def _client_fields(stage: Any) -> dict[str, Any]:
    """A stage's fields that its client half reads (all compared fields but SERVER_ONLY)."""
    skip = SERVER_ONLY.get(type(stage), set())
    return {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)
            if f.compare and f.name not in skip}


def _server(cfg: ExperimentConfig) -> Federation:
    return assemble(cfg, Given(dataset=make_toy(num_clients=6)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_server_and_a_site_build_the_same_client_stages(name: str) -> None:
    cfg = _config(CONFIGS[name])
    server = _server(cfg)
    algorithm = build_algorithm(cfg.algorithm.name, mu=cfg.algorithm.mu)
    site = site_pipeline(cfg, algorithm, local_training(cfg))

    assert [type(s) for s in server.pipeline.stages] == EXPECTED_TYPES[name]
    assert [type(s) for s in site.stages] == EXPECTED_TYPES[name]
    for ours, theirs in zip(server.pipeline.stages, site.stages, strict=True):
        assert _client_fields(ours) == _client_fields(theirs)
    assert server.pipeline.optimizer.name == ("adam" if "fedadam" in name else "sgd")


def test_only_the_server_signs_with_a_simulated_authority() -> None:
    """The one place the two lists differ: a deployed site signs with its own certificate."""
    cfg = _config(CONFIGS["central+secagg+fedadam"])
    (_, ours), (_, theirs) = (
        _server(cfg).pipeline.stages,
        site_pipeline(cfg, build_algorithm("fedavg"), local_training(cfg)).stages,
    )
    assert ours.simulated is not None
    assert theirs.simulated is None


def test_central_dp_noise_is_the_servers_own() -> None:
    """The site's central-DP stage does not carry the server's calibrated noise settings."""
    cfg = _config(CONFIGS["central+secagg+fedadam"])
    ours = _server(cfg).pipeline.stages[0]
    theirs = site_pipeline(cfg, build_algorithm("fedavg"), local_training(cfg)).stages[0]
    assert (ours.adaptive, theirs.adaptive) == (True, False)
    assert ours.clip == theirs.clip == 0.05


def test_every_builder_sets_the_parts_it_names() -> None:
    """Every Federation field is set once the builders have run (none is forgotten)."""
    fed = _server(_config(CONFIGS["distributed+secagg+fedadam+bound"]))
    missing = [f.name for f in dataclasses.fields(Federation) if not hasattr(fed, f.name)]
    assert missing == []
    assert len(set(BUILDERS)) == len(BUILDERS)
    assert fed.ledger is not None and fed.central is None and fed.distributed is not None
