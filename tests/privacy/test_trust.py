"""Every reported epsilon states its trust: amplification by sampling only for a secret sample."""

from __future__ import annotations

import json
import types

import dp_accounting
import pytest

import consortium
from consortium.config import ExperimentConfig
from consortium.errors import ConfigError
from consortium.privacy.accountant import RoundMechanism, epsilon, epsilon_without_sampling
from consortium.privacy.ledger import LocalPrivacyLedger, PrivacyLedger, SampleTrust
from consortium.privacy.plan import plan_sampler, sample_trust
from consortium.server.checkpoint import load_checkpoint_extras
from consortium.server.sampling import PoissonSampler, SecretSampler, new_sampling_secret
from tests.conftest import make_toy

DP = {
    "rounds": 4,
    "seed": 2,
    "sampling": {"fraction": 0.5},
    "privacy": {"mode": "central", "noise_multiplier": 0.8, "clip": 0.5},
    "algorithm": {"lr": 0.1},
}
FIELDS = {"epsilon", "delta", "accountant", "sample_secret", "epsilon_without_sampling",
          "epsilon_given_participants", "most_rounds_taken", "trust"}


def _direct(event, count: int, delta: float = 1e-5) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(event, count)
    return float(acc.get_epsilon(delta))


def test_the_reviews_numbers_against_dp_accounting_directly() -> None:
    """z = 1.1, q = 0.01, 1,000 rounds, δ = 1e-5: 1.71 with a secret sample; 550.7 for anyone
    who knows who took part (a site could have been in every round); 16.86 over the 10 rounds
    a site takes part in on average (q × rounds)."""
    mech = RoundMechanism(1.1, "poisson", rate=0.01)
    gaussian = dp_accounting.GaussianDpEvent(1.1)
    amplified = epsilon(mech, 1000, 1e-5)
    assert amplified == pytest.approx(
        _direct(dp_accounting.PoissonSampledDpEvent(0.01, gaussian), 1000), rel=1e-12
    )
    assert amplified == pytest.approx(1.7118, abs=1e-4)
    every_round = epsilon_without_sampling(mech, 1000, 1e-5)
    assert every_round == pytest.approx(_direct(gaussian, 1000), rel=1e-12)
    assert every_round == pytest.approx(550.729, abs=1e-3)
    typical = epsilon_without_sampling(mech, 10, 1e-5)
    assert typical == pytest.approx(_direct(gaussian, 10), rel=1e-12)
    assert typical == pytest.approx(16.857, abs=1e-3)
    assert epsilon_without_sampling(mech, 0, 1e-5) == 0.0


def test_the_pld_figure_without_sampling_matches_dp_accountings_default_grid() -> None:
    """The coarser grid (for speed) still gives dp-accounting's own number."""
    mech = RoundMechanism(1.1, "poisson", rate=0.01)
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.1), 10)
    fine = float(acc.get_epsilon(1e-5))
    assert epsilon_without_sampling(mech, 10, 1e-5, "pld") == pytest.approx(fine, rel=1e-5)
    assert epsilon_without_sampling(mech, 10, 1e-5, "pld") >= fine  # still an upper bound


def test_fixed_size_sampling_drops_to_the_gaussian_under_its_own_relation() -> None:
    mech = RoundMechanism(1.1, "fixed", population=100, sample_size=1)
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    acc.compose(dp_accounting.GaussianDpEvent(1.1), 50)
    assert epsilon_without_sampling(mech, 50, 1e-5) == pytest.approx(float(acc.get_epsilon(1e-5)))
    assert epsilon(mech, 50, 1e-5) < epsilon_without_sampling(mech, 50, 1e-5)


def test_a_simulation_keeps_its_amplified_epsilon_and_says_why(tmp_path) -> None:
    result = consortium.simulate(DP, dataset=make_toy(8), out=tmp_path / "run", report=False)
    mech = RoundMechanism(0.8, "poisson", rate=0.5)
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    for privacy in (result.summary["privacy"], ledger):
        assert FIELDS <= set(privacy)
        assert privacy["sample_secret"] is True
        assert privacy["epsilon"] == pytest.approx(epsilon(mech, 4, 1e-5))
        assert privacy["epsilon_without_sampling"] == pytest.approx(
            epsilon_without_sampling(mech, 4, 1e-5)
        )
        assert "epsilon_if_sample_secret" not in privacy
        assert any(t.startswith("simulation: the sample is modelled") for t in privacy["trust"])
        assert any(t.startswith("nothing against the server") for t in privacy["trust"])
        assert any("privacy.json lists" in t for t in privacy["trust"])
    taken: dict[str, int] = {}
    for entry in ledger["releases"]:
        for site in entry["sites"]:
            taken[site] = taken.get(site, 0) + 1
    assert ledger["most_rounds_taken"] == max(taken.values())
    assert ledger["epsilon_given_participants"] == pytest.approx(
        epsilon_without_sampling(mech, max(taken.values()), 1e-5)
    )
    assert ledger["epsilon"] < ledger["epsilon_given_participants"]


def test_a_run_whose_sample_the_sites_can_derive_reports_no_amplification(tmp_path) -> None:
    """Real noise (a deployment's setting) with the sample drawn from the run seed: the sites
    have that seed, so the headline drops amplification and the amplified figure is labelled."""
    cfg = {**DP, "privacy": {**DP["privacy"], "noise_source": "os"}}
    result = consortium.simulate(cfg, dataset=make_toy(8), out=tmp_path / "run", report=False)
    mech = RoundMechanism(0.8, "poisson", rate=0.5)
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    for privacy in (result.summary["privacy"], ledger):
        assert FIELDS <= set(privacy)
        assert privacy["sample_secret"] is False
        assert privacy["epsilon"] == privacy["epsilon_without_sampling"]
        assert privacy["epsilon"] == pytest.approx(epsilon_without_sampling(mech, 4, 1e-5))
        assert privacy["epsilon_if_sample_secret"] == pytest.approx(epsilon(mech, 4, 1e-5))
        assert any("run seed, which every site receives" in t for t in privacy["trust"])
    assert [r["epsilon"] for r in result.history] == pytest.approx(
        [epsilon_without_sampling(mech, r, 1e-5) for r in (1, 2, 3, 4)]
    )


def test_the_servers_secret_sample_keeps_amplification(tmp_path) -> None:
    cfg = {**DP, "privacy": {**DP["privacy"], "noise_source": "os"}}
    sampler = SecretSampler(PoissonSampler(0.5), new_sampling_secret())
    result = consortium.simulate(
        cfg, dataset=make_toy(8), sampler=sampler, out=tmp_path / "run", report=False
    )
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy["sample_secret"] is True and result.summary["privacy"]["sample_secret"] is True
    assert privacy["epsilon"] == pytest.approx(epsilon(RoundMechanism(0.8, "poisson", rate=0.5), 4, 1e-5))
    assert any("server's own 256-bit secret" in t for t in privacy["trust"])


def test_secure_aggregation_reveals_the_cohort_to_the_participants() -> None:
    cfg = ExperimentConfig.from_dict({**DP, "secure_aggregation": {"enabled": True}})
    trust = sample_trust(cfg, SecretSampler(PoissonSampler(0.5), new_sampling_secret()))
    assert trust.secret is False and "secure aggregation" in trust.why
    plain = ExperimentConfig.from_dict(DP)
    assert sample_trust(plain, PoissonSampler(0.5)).secret is True


def _deployment_cfg() -> ExperimentConfig:
    return ExperimentConfig.from_dict({**DP, "sampling": {"fraction": 0.2},
                                       "privacy": {**DP["privacy"], "noise_source": "os"}})


def test_the_deployed_sample_does_not_follow_the_run_seed_and_resumes_from_the_checkpoint(
    tmp_path,
) -> None:
    pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
    from consortium.deploy.server import SAMPLING_SECRET, _sampling_secret, participation_sampler

    cfg = _deployment_cfg()
    ids = [f"site{i:02d}" for i in range(50)]
    secret = _sampling_secret({}, resumed=False)
    assert secret is not None and secret != _sampling_secret({}, resumed=False)
    deployed = participation_sampler(cfg, len(ids), secret)
    assert isinstance(deployed, SecretSampler) and secret not in repr(deployed)
    public = plan_sampler(cfg, len(ids))
    rounds = range(1, 21)
    drawn = [deployed.sample(r, ids, seed=cfg.seed) for r in rounds]
    assert any(d != public.sample(r, ids, seed=cfg.seed) for r, d in zip(rounds, drawn))
    assert secret not in cfg.to_toml()  # what the sites receive

    # the secret travels only in the server's checkpoint (as serve() saves it, through
    # simulate's checkpoint_extras); two resumptions from it draw the same cohorts
    consortium.simulate(dict(DP, rounds=1), dataset=make_toy(2), out=tmp_path / "run",
                        report=False, checkpoint_extras=lambda: {SAMPLING_SECRET: secret})
    saved = load_checkpoint_extras(tmp_path / "run" / "checkpoint")
    for _ in range(2):  # two resumptions from the same checkpoint
        again = participation_sampler(cfg, len(ids), _sampling_secret(saved, resumed=True))
        assert again is not None
        assert [again.sample(r, ids, seed=cfg.seed) for r in rounds] == drawn


def test_a_run_checkpointed_before_the_secret_keeps_sampling_from_the_run_seed() -> None:
    pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
    from consortium.deploy.server import _sampling_secret, participation_sampler

    secret = _sampling_secret({"registry": {}}, resumed=True)
    assert secret is None and participation_sampler(_deployment_cfg(), 50, secret) is None


def test_a_secret_too_short_to_hide_the_sample_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 32 hex digits"):
        SecretSampler(PoissonSampler(0.5), "00ff")
    with pytest.raises(ConfigError, match="non-hex"):
        SecretSampler(PoissonSampler(0.5), "z" * 64)


def test_the_ledger_without_a_secret_sample_never_reports_the_amplified_figure() -> None:
    mech = RoundMechanism(1.1, "poisson", rate=0.01)
    ledger = PrivacyLedger(mech, delta=1e-5, accountant="rdp", sample=SampleTrust(False, "test"))
    record = {"round": 1000}
    ledger.before_record(record, types.SimpleNamespace(participants=["a"]))
    assert record["epsilon"] == pytest.approx(550.729, abs=1e-3)
    summary = ledger.summary()
    assert summary["epsilon"] == summary["epsilon_without_sampling"] == record["epsilon"]
    assert summary["epsilon_if_sample_secret"] == pytest.approx(1.7118, abs=1e-4)
    assert summary["epsilon_given_participants"] == pytest.approx(4.2396, abs=1e-4)  # one round


def test_local_dp_states_its_trust_and_its_figure_without_sampling() -> None:
    ledger = LocalPrivacyLedger({"a": 100, "b": 50}, batch_size=10, noise_multiplier=1.1,
                                delta=1e-5, accountant="rdp")
    ledger.before_record({"round": 1}, types.SimpleNamespace(participant_steps={"a": 20, "b": 5}))
    summary = ledger.summary()
    assert summary["sample_secret"] is True
    assert summary["epsilon_without_sampling"] == pytest.approx(
        _direct(dp_accounting.GaussianDpEvent(1.1), 20)
    )
    assert summary["epsilon"] < summary["epsilon_without_sampling"]
    assert any("each site adds its own noise" in t for t in summary["trust"])
    assert any("draws them itself" in t for t in summary["trust"])


def test_target_epsilon_under_secure_aggregation_is_met_by_the_reported_figure() -> None:
    """Secure aggregation names the cohort to every participant, so the run reports epsilon
    without amplification: calibration must aim at that figure, not at the amplified one."""
    import consortium

    cfg = {"rounds": 3, "evaluation": {"baselines": []},
           "data": {"dataset": "breast-cancer", "partition": "iid", "clients": 20},
           "sampling": {"fraction": 0.5},
           "privacy": {"mode": "central", "target_epsilon": 20.0, "clip": 1.0},
           "secure_aggregation": {"enabled": True}}
    result = consortium.simulate(cfg)
    privacy = result.summary["privacy"]
    assert privacy["sample_secret"] is False
    assert privacy["epsilon"] == pytest.approx(20.0, rel=0.01)
    assert privacy["epsilon"] == privacy["epsilon_without_sampling"]
