"""DP-FedAvg: clipping bound, noise of the stated size, adaptive clipping to the quantile."""

from __future__ import annotations

import math

import pytest
import torch

from consortium.aggregation.base import Aggregate, ClientContext, RoundContext
from consortium.errors import ConfigError
from consortium.privacy.central import central_dp, update_noise_multiplier
from consortium.types import Layout, TensorSpec, Update

D = 20_000
LAYOUT = Layout((TensorSpec("w", (D,), torch.float32),))


def ctx(round: int = 1, expected: float = 10.0) -> RoundContext:
    return RoundContext(round, round * 7919, 100, int(expected), LAYOUT, expected_clients=expected)


def client_updates(stage, n: int, *, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    payload = stage.broadcast(stage.init(LAYOUT))
    out = []
    for i in range(n):
        u = Update(f"c{i}", scale * torch.randn(D, generator=g) / math.sqrt(D) * (i + 1), 50.0)
        out.append(stage.client(u, payload, ClientContext(1, f"c{i}", i)))
    return out


def test_every_clipped_update_is_within_the_bound_and_weighted_one() -> None:
    stage = central_dp(1.0, 2.0)
    for u in client_updates(stage, 8):
        assert float(torch.linalg.vector_norm(u.delta)) <= 2.0 + 1e-5
        assert u.weight == 1.0
        assert float(u.extras["dp.unclipped"][0]) in (-0.5, 0.5)  # the centred bit


def test_noise_has_the_stated_standard_deviation() -> None:
    z, clip, expected = 1.3, 0.7, 10.0
    stage = central_dp(z, clip)
    zero = Aggregate(torch.zeros(D), weight=10.0, count=10, extras={"dp.unclipped": torch.tensor([5.0])})
    out, _ = stage.server(zero, stage.init(LAYOUT), ctx(expected=expected))
    stated = z * clip / expected  # noise on the sum, divided by the expected count
    measured = float(out.delta.double().std())
    # the sample std of 20,000 normal draws is within 2 % of sigma with overwhelming probability
    assert measured == pytest.approx(stated, rel=0.03)
    assert float(out.delta.double().mean()) == pytest.approx(0.0, abs=4 * stated / math.sqrt(D))
    assert out.info["dp_noise_stddev"] == pytest.approx(stated)


def test_server_divides_the_noisy_sum_by_the_expected_count() -> None:
    stage = central_dp(1e-9, 1.0)  # negligible noise: the arithmetic shows
    updates = [torch.full((D,), 0.001), torch.full((D,), 0.003)]
    agg = Aggregate(sum(updates) / 2, weight=2.0, count=2, extras={"dp.unclipped": torch.tensor([2.0])})
    out, _ = stage.server(agg, stage.init(LAYOUT), ctx(expected=4.0))
    assert torch.allclose(out.delta, torch.full((D,), 0.001), atol=1e-7)  # (0.001+0.003)/4


def test_noise_is_repeatable_per_round() -> None:
    stage = central_dp(1.0, 1.0)
    agg = lambda: Aggregate(torch.zeros(D), 3.0, 3, {"dp.unclipped": torch.tensor([1.0])})
    a, _ = stage.server(agg(), stage.init(LAYOUT), ctx(1))
    b, _ = stage.server(agg(), stage.init(LAYOUT), ctx(1))
    c, _ = stage.server(agg(), stage.init(LAYOUT), ctx(2))
    assert torch.equal(a.delta, b.delta) and not torch.equal(a.delta, c.delta)


def test_update_noise_multiplier_formula() -> None:
    # Andrew et al. 2021: z_Δ = (z^-2 − (2σ_b)^-2)^(-1/2); z = 1, σ_b = 1 → (1 − 1/4)^(-1/2)
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    with pytest.raises(ConfigError, match="too small"):
        update_noise_multiplier(1.0, 0.4)


def test_adaptive_clipping_converges_to_the_target_quantile() -> None:
    """A stream of update norms; the clip norm must settle at their target quantile."""
    gamma = 0.8
    stage = central_dp(1.0, 0.01, adaptive=True, target_quantile=gamma, clip_lr=0.2,
                       count_stddev=1.0)
    state = stage.init(LAYOUT)
    g = torch.Generator().manual_seed(0)
    small = Layout((TensorSpec("w", (4,), torch.float32),))
    n = 100
    for r in range(1, 400):
        norms = torch.distributions.LogNormal(0.0, 0.5).sample((n,))  # true 0.8-quantile: e^{0.5·0.8416}
        centred = float((norms <= state["clip"]).sum()) - n / 2  # Σ (b_i − ½)
        agg = Aggregate(torch.zeros(4), float(n), n, {"dp.unclipped": torch.tensor([centred])})
        rc = RoundContext(r, int(torch.randint(0, 2**30, (), generator=g)), 1000, n, small,
                          expected_clients=float(n))
        _, state = stage.server(agg, state, rc)
    target = math.exp(0.5 * 0.8416)
    assert state["clip"] == pytest.approx(target, rel=0.1)


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="clip"):
        central_dp(1.0, 0.0)
    with pytest.raises(ConfigError, match="target_quantile"):
        central_dp(1.0, 1.0, target_quantile=1.0)


def test_update_and_count_noise_together_cost_one_gaussian_of_multiplier_z() -> None:
    """The accounting of adaptive clipping, the count query included: the update released with
    z_Δ (sensitivity C) and the centred count with σ_b (sensitivity ½) compose to exactly the
    Gaussian mechanism with multiplier z that the accountant charges."""
    import dp_accounting

    z, sigma_b = 1.1, 2.0
    z_update = update_noise_multiplier(z, sigma_b)
    for make in (dp_accounting.rdp.RdpAccountant, dp_accounting.pld.PLDAccountant):
        both = make().compose(dp_accounting.ComposedDpEvent([
            dp_accounting.GaussianDpEvent(z_update),
            dp_accounting.GaussianDpEvent(2 * sigma_b),  # σ_b / sensitivity ½
        ]), 20)
        one = make().compose(dp_accounting.GaussianDpEvent(z), 20)
        assert both.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-3)


def test_default_count_noise_keeps_small_federations_valid() -> None:
    stage = central_dp(0.6, 1.0, adaptive=True)  # 4 clients: m/20 = 0.2 < z/2 would be invalid
    assert stage.count_noise(4.0) == pytest.approx(0.6)
    assert update_noise_multiplier(0.6, stage.count_noise(4.0)) == pytest.approx(0.6 / 0.75**0.5)
    assert central_dp(0.6, 1.0, adaptive=True).count_noise(400.0) == pytest.approx(20.0)


def test_central_dp_is_refused_before_an_aggregator_that_is_not_a_sum() -> None:
    """The noise is calibrated to a sum of clipped updates (sensitivity = the clip norm); a
    median or Krum can move further with one client, so the stated epsilon would not hold."""
    from consortium.aggregation.base import Pipeline
    from consortium.aggregation.mean import weighted_mean
    from consortium.aggregation.robust import make_rule
    from consortium.errors import PipelineError

    dp = central_dp(1.0, 1.0)
    for rule in ("median", "krum", "trimmed-mean", "geometric-median"):
        with pytest.raises(PipelineError, match=r"not such a sum.*local DP"):
            Pipeline([dp], aggregator=make_rule(rule))
    with pytest.raises(PipelineError, match="'norm-bound' is not such a sum"):
        Pipeline([dp], aggregator=make_rule("norm-bound"))  # the median norm depends on all
    Pipeline([dp], aggregator=make_rule("norm-bound", bound=0.5))  # a sum of clipped updates
    Pipeline([dp], aggregator=weighted_mean())
    Pipeline([], aggregator=make_rule("median"))  # without central DP, any rule


def test_a_run_asking_for_central_dp_and_a_robust_rule_fails_before_round_1() -> None:
    import consortium
    from consortium.errors import ConsortiumError

    cfg = {"rounds": 1, "privacy": {"mode": "central", "noise_multiplier": 1.0},
           "aggregation": {"rule": "median"}, "evaluation": {"baselines": []}}
    with pytest.raises(ConsortiumError, match="central_dp.*'median' is not such a sum"):
        consortium.simulate(cfg)


def test_os_noise_is_the_snapped_gaussian_nobody_can_repeat() -> None:
    """``noise_source = "os"`` (what ``consortium server`` uses): the stated standard
    deviation, on the snapping grid, different every time for the same round and seed, and
    the adaptive clip still follows the (snapped) noisy count."""
    from consortium.privacy.randomness import snap_grid

    z, clip, expected = 1.3, 0.7, 10.0
    stage = central_dp(z, clip, noise_source="os", adaptive=True, count_stddev=2.0)
    zero = lambda: Aggregate(torch.zeros(D), weight=10.0, count=10,
                             extras={"dp.unclipped": torch.tensor([5.0])})
    a, state_a = stage.server(zero(), stage.init(LAYOUT), ctx(expected=expected))
    b, _ = stage.server(zero(), stage.init(LAYOUT), ctx(expected=expected))
    assert not torch.equal(a.delta, b.delta)
    zu = update_noise_multiplier(z, 2.0)
    measured = float(a.delta.double().std())
    assert measured == pytest.approx(zu * clip / expected, rel=0.03)
    steps = (a.delta.double() * expected / snap_grid(clip, D)).numpy()
    assert abs(steps - steps.round()).max() < 0.1  # float32 of grid points (~5e5 steps), back
    assert state_a["clip"] != clip and math.isfinite(state_a["clip"])
