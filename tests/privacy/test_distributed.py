"""Distributed DP (Kairouz et al. 2021): each site's discrete Gaussian noise, summed by SecAgg."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import consortium
from consortium.aggregation.base import ClientContext, RoundContext
from consortium.errors import ConfigError
from consortium.privacy.distributed import (
    INTEGER_SUM,
    DistributedLedger,
    distributed_dp,
    distributed_epsilon,
    grid,
    rho,
    sensitivity,
    site_sigma,
)
from consortium.privacy.randomness import SeededRandomness
from consortium.secagg.stage import secure_aggregation
from consortium.types import Layout, TensorSpec, Update

DEMO = [
    "privacy.mode=distributed", "secure_aggregation.enabled=true",
    "secure_aggregation.threshold=0.67", "sampling.clients_per_round=4",
]


class Sites:
    """The sites' side in this process: distributed DP, then secure aggregation's client half
    and its ``respond`` for every protocol phase."""

    def __init__(self, ddp, quantise, round: int = 1) -> None:
        self.ddp, self.quantise, self.round = ddp, quantise, round
        self.sessions: dict[str, dict] = {}
        self.sent: dict[str, torch.Tensor] = {}  # what each site's DP stage produced

    def send(self, update: Update, seed: int) -> Update:
        ctx = ClientContext(self.round, update.client_id, seed,
                            self.sessions.setdefault(update.client_id, {}))
        noised = self.ddp.client(update, {}, ctx)
        self.sent[update.client_id] = noised.delta.clone()
        return self.quantise.client(noised, {}, ctx)

    def exchange(self, stage_name: str, phase: str, messages):
        for cid, message in messages.items():
            ctx = ClientContext(self.round, cid, 0, self.sessions[cid])
            yield cid, self.quantise.respond(phase, message, ctx)


def one_round(ddp, updates: list[Update], *, round: int = 1, seed: int = 0):
    """One round through the distributed-DP stage and SecureSum (integer mode), in process."""
    quantise, summer = secure_aggregation(threshold=0.67, integer=True)
    d = updates[0].delta.numel()
    layout = Layout((TensorSpec("w", (d,), torch.float32),))
    sites = Sites(ddp, quantise, round)
    sent = [sites.send(u, seed * 1000 + i) for i, u in enumerate(updates)]
    ctx = RoundContext(round, seed, len(updates), len(updates), layout, exchange=sites.exchange)
    aggregate = summer.aggregate(sent, ctx=ctx)
    out, _ = ddp.server(aggregate, {}, ctx)
    return aggregate, out, sites


def discrete_gaussian_pmf(sigma: float, support: int) -> np.ndarray:
    k = np.arange(-support, support + 1, dtype=np.float64)
    p = np.exp(-k * k / (2 * sigma * sigma))
    return p / p.sum()


def test_the_unmasked_noise_is_the_sum_of_the_sites_discrete_gaussians() -> None:
    from scipy import stats

    n, d, sigma = 5, 4000, 0.5
    # z chosen so that each site's scale is exactly sigma grid units
    ddp = distributed_dp(1.0, expected_sites=n, noise_multiplier=sigma * math.sqrt(n) / sensitivity(d))
    assert ddp.sigma(d) == pytest.approx(sigma, rel=1e-12)
    zeros = [Update(f"s{i}", torch.zeros(d), 1.0) for i in range(n)]
    noise = torch.cat([one_round(ddp, zeros, round=r, seed=r)[0].extras[INTEGER_SUM]
                       for r in (1, 2, 3)]).numpy()
    assert noise.size >= 10_000

    support = 40
    pmf = discrete_gaussian_pmf(sigma, support)
    values = np.arange(-support, support + 1)
    variance = float((pmf * values**2).sum())
    assert abs(variance - sigma**2) > 0.01  # at sigma = 0.5 the exact variance is not sigma²
    assert noise.var() == pytest.approx(n * variance, rel=0.04)
    assert abs(noise.mean()) < 4 * math.sqrt(n * variance / noise.size)

    total = pmf
    for _ in range(n - 1):
        total = np.convolve(total, pmf)
    lo = -(len(total) // 2)
    observed = np.bincount(noise - lo, minlength=len(total)).astype(np.float64)
    expected = total * noise.size
    keep = expected >= 5  # merge the tails into one bin each side
    first, last = np.flatnonzero(keep)[[0, -1]]
    obs = np.concatenate([[observed[:first].sum()], observed[first:last + 1],
                          [observed[last + 1:].sum()]])
    exp = np.concatenate([[expected[:first].sum()], expected[first:last + 1],
                          [expected[last + 1:].sum()]])
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    # the same check rejects a sum of continuous Gaussians rounded to integers
    rounded = np.round(np.random.default_rng(0).normal(0, sigma, (noise.size, n))).sum(1)
    rounded_obs = np.bincount(rounded.astype(np.int64) - lo, minlength=len(total)).astype(float)
    wrong = np.concatenate([[rounded_obs[:first].sum()], rounded_obs[first:last + 1],
                            [rounded_obs[last + 1:].sum()]])
    assert stats.chisquare(wrong, exp).pvalue < 1e-3


def test_rho_of_a_small_case_by_hand() -> None:
    # sigma = 0.3, n = 2 sites, d = 1, sensitivity 1:
    # tau = 10·exp(-2π²·0.09·½) = 10·exp(-0.888264...) = 4.11374...
    t = 10 * math.exp(-2 * math.pi**2 * 0.09 * 0.5)
    assert t == pytest.approx(4.113691, abs=1e-5)
    # first bound: 1/(2·2·0.09) + τ = 2.777... + 4.1137 = 6.8915; second: ½(1/(√2·0.3) + τ)² = 20.93
    assert rho(0.3, 2, 1, l2_sensitivity=1.0) == pytest.approx(2.7777778 + 4.113691, abs=1e-5)
    # a large sigma: tau vanishes and rho is the Gaussian's Δ²/(2nσ²)
    assert rho(2.0, 3, 4) == pytest.approx((1025 * 2) ** 2 / (2 * 3 * 4.0), rel=1e-12)
    # the second bound wins when tau < 2 and d is large: sigma = 0.5, n = 2, d = 100
    t = 10 * math.exp(-2 * math.pi**2 * 0.25 * 0.5)  # 0.8480
    first = 1.0 / (2 * 2 * 0.25) + t * 100  # 85.8
    second = 0.5 * (1.0 / (math.sqrt(2) * 0.5) + t * 10) ** 2  # 49.2
    assert second < first
    assert rho(0.5, 2, 100, l2_sensitivity=1.0) == pytest.approx(second, rel=1e-12)


def _ledger(records: list[int], tmp_path=None) -> DistributedLedger:
    stage = distributed_dp(1.0, expected_sites=4, noise_multiplier=1.0)
    ledger = DistributedLedger(stage, 66, delta=1e-5,
                               path=tmp_path / "privacy.json" if tmp_path else None)
    for r, count in enumerate(records, 1):
        ledger.before_record({"round": r, "secagg_clients": count}, None)
    return ledger


def test_the_ledger_composes_gaussian_events_of_the_rounds_rho(tmp_path) -> None:
    import dp_accounting

    ledger = _ledger([4, 4, 4], tmp_path)
    r = rho(site_sigma(1.0, 4, 66), 4, 66)
    assert r == pytest.approx(0.5, rel=1e-9)  # z = 1 over the expected 4 sites: ½ z⁻²
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * r)), 3)
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    written = json.loads((tmp_path / "privacy.json").read_text())
    assert written["epsilon"] == pytest.approx(ledger.epsilon())
    assert [e["contributors"] for e in written["releases"]] == [4, 4, 4]
    assert any("withholds its noise" in line for line in written["trust"])
    assert distributed_epsilon([r, r, r], 1e-5) == pytest.approx(ledger.epsilon())


def test_fewer_contributors_cost_more_epsilon() -> None:
    full, short = _ledger([4, 4, 4]), _ledger([4, 3, 4])
    assert short.epsilon() > full.epsilon()
    assert short.entries[1]["rho"] == pytest.approx(0.5 * 4 / 3, rel=1e-9)


def test_without_noise_the_decoded_sum_is_exact(monkeypatch) -> None:
    monkeypatch.setattr(SeededRandomness, "discrete_gaussian",
                        lambda self, n, sigma: torch.zeros(n, dtype=torch.int64))
    clip, d = 1.0, 3
    ddp = distributed_dp(clip, expected_sites=4, noise_multiplier=1.0)
    raw = [torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.5, 0.0, -0.1]),
           torch.tensor([-0.3, 0.2, 0.2]), torch.tensor([3.0, 4.0, 0.0])]  # the last is clipped
    updates = [Update(f"s{i}", x, 10.0 * (i + 1)) for i, x in enumerate(raw)]
    aggregate, out, sites = one_round(ddp, updates)
    gamma = clip / (1024 * math.sqrt(d))
    assert grid(clip, d) == gamma
    by_hand = [[round(float(v) / gamma) for v in x.double()] for x in raw[:3]]
    by_hand.append([round(0.6 / gamma), round(0.8 / gamma), 0])  # (3, 4, 0) clipped to norm 1
    assert [sites.sent[f"s{i}"].tolist() for i in range(4)] == by_hand
    summed = [sum(col) for col in zip(*by_hand)]
    assert aggregate.extras[INTEGER_SUM].tolist() == summed
    assert aggregate.weight == 4.0 and aggregate.count == 4  # weight 1 each
    step = torch.tensor([s * gamma / 4 for s in summed], dtype=torch.float64).to(torch.float32)
    assert torch.equal(out.delta, step)
    assert INTEGER_SUM not in out.extras


def test_the_float_path_is_unchanged_by_the_integer_mode() -> None:
    plain = secure_aggregation(clip=1.0, bits=16, weight_bound=100.0)
    assert plain[0].integer is False and plain[1].integer is False


def test_a_demo_run_learns_more_at_the_larger_epsilon() -> None:
    quiet = consortium.simulate(overrides=[*DEMO, "privacy.noise_multiplier=0.5", "rounds=10"])
    loud = consortium.simulate(overrides=[*DEMO, "privacy.noise_multiplier=5.0", "rounds=10"])
    assert quiet.summary["privacy"]["epsilon"] > loud.summary["privacy"]["epsilon"]
    assert quiet.summary["final"]["accuracy"] > loud.summary["final"]["accuracy"] + 0.05
    assert all(r["secagg_clients"] == 4 for r in quiet.history)
    assert quiet.summary["privacy"]["sample_secret"] is False


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (["privacy.mode=distributed", "privacy.noise_multiplier=1"],
         "secure_aggregation.enabled = true"),
        ([*DEMO, "privacy.noise_multiplier=1", "privacy.adaptive=true"],
         "privacy.adaptive = false"),
        ([*DEMO, "privacy.noise_multiplier=1", "privacy.accountant=pld"],
         'privacy.accountant = "rdp"'),
        ([*DEMO[:-1], "sampling.clients_per_round=0", "privacy.noise_multiplier=1"],
         "sampling.clients_per_round"),
    ],
)
def test_impossible_configurations_are_refused_with_the_fix(overrides, fix) -> None:
    with pytest.raises(ConfigError, match="distributed") as err:
        consortium.simulate(overrides=[*overrides, "rounds=1"])
    assert fix in str(err.value)


def test_a_noise_scale_that_could_wrap_is_refused() -> None:
    with pytest.raises(ConfigError, match="wrap modulo 2\\*\\*32"):
        consortium.simulate(overrides=[*DEMO, "privacy.noise_multiplier=50000", "rounds=1"])


def test_target_epsilon_calibrates_the_sites_noise() -> None:
    run = consortium.simulate(overrides=[*DEMO, "privacy.target_epsilon=20", "rounds=5"])
    eps = run.summary["privacy"]["epsilon"]
    assert eps <= 20 and eps == pytest.approx(20, rel=1e-3)
    assert run.summary["privacy"]["noise_multiplier"] == run.history[-1]["dp_noise_multiplier"]


def test_a_resumed_run_matches_an_uninterrupted_one(tmp_path) -> None:
    class Stop:
        def on_round_end(self, record, state) -> None:
            if record["round"] == 2:
                raise KeyboardInterrupt

    settings = [*DEMO, "privacy.noise_multiplier=1.0", "rounds=4", "evaluation.baselines=[]"]
    whole = consortium.simulate(overrides=settings, out=tmp_path / "a", report=False)
    with pytest.raises(KeyboardInterrupt):
        consortium.simulate(overrides=settings, out=tmp_path / "b", report=False,
                            callbacks=[Stop()])
    resumed = consortium.simulate(resume=tmp_path / "b", report=False)
    assert torch.equal(whole.params.vector, resumed.params.vector)
    a = json.loads((tmp_path / "a" / "privacy.json").read_text())
    b = json.loads((tmp_path / "b" / "privacy.json").read_text())
    assert a == b and len(a["releases"]) == 4


def test_a_sites_budget_counts_its_own_noise_under_distributed_dp(tmp_path) -> None:
    """A site with max_epsilon takes part under distributed DP, counting only the noise it adds
    itself (z / sqrt(expected sites), a plain Gaussian per release), and refuses once that
    would pass its budget."""
    import consortium
    from consortium.privacy.policy import site_epsilon

    z, sites = 2.0, 4
    own = z / sites**0.5
    budget = (site_epsilon(own, 2, 1e-5) + site_epsilon(own, 3, 1e-5)) / 2  # room for 2 rounds
    policies = tmp_path / "p.toml"
    policies.write_text(f"[default]\nmax_epsilon = {budget}\n")
    result = consortium.simulate({
        "rounds": 4, "evaluation": {"baselines": []},
        "privacy": {"mode": "distributed", "noise_multiplier": z, "clip": 1.0,
                    "site_policies": str(policies)},
        "secure_aggregation": {"enabled": True, "threshold": 0.67},
        "sampling": {"clients_per_round": sites},
    })
    takes = [r["clients"] for r in result.history]
    assert takes[:2] == [4, 4] and all(n == 0 for n in takes[2:]), takes
    assert "counting its own noise" in next(iter(result.history[-1]["failed"].values()))
