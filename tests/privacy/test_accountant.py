"""Accounting delegates to dp-accounting exactly; calibration inverts it."""

from __future__ import annotations

import dp_accounting
import pytest

from consortium.errors import ConfigError
from consortium.privacy.accountant import RoundMechanism, calibrate_noise, epsilon


def reference(event, rounds: int, delta: float, accountant: str, relation) -> float:
    acc = (
        dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
        if accountant == "rdp"
        else dp_accounting.pld.PLDAccountant(neighboring_relation=relation)
    )
    # RDP: one release at a time, as a run releases them; PLD: all at once (per-release
    # composition of PLDs costs ~0.3 s each here)
    if accountant == "rdp":
        for _ in range(rounds):
            acc.compose(event)
    else:
        acc.compose(event, rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize(("z", "q", "rounds"), [(1.1, 0.01, 60), (0.8, 0.1, 30), (2.0, 1.0, 5)])
def test_poisson_epsilon_equals_dp_accounting(accountant: str, z: float, q: float, rounds: int) -> None:
    ours = epsilon(RoundMechanism(z, "poisson", rate=q), rounds, 1e-5, accountant)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    theirs = reference(event, rounds, 1e-5, accountant,
                       dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_fixed_size_sampling_is_sampling_without_replacement() -> None:
    ours = epsilon(RoundMechanism(1.0, "fixed", population=100, sample_size=10), 8, 1e-5)
    event = dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(1.0))
    theirs = reference(event, 8, 1e-5, "rdp", dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_fixed_size_with_pld_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="Poisson sampling only"):
        epsilon(RoundMechanism(1.0, "fixed", population=100, sample_size=10), 5, 1e-5, "pld")


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    m = RoundMechanism(1.0, "poisson", rate=0.1)
    assert epsilon(m, 0, 1e-5) == 0.0
    assert epsilon(m, 10, 1e-5) < epsilon(m, 20, 1e-5)
    assert epsilon(RoundMechanism(2.0, "poisson", rate=0.1), 20, 1e-5) < epsilon(m, 20, 1e-5)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibration_reaches_the_target_from_below(accountant: str) -> None:
    z = calibrate_noise(2.0, 1e-5, 100, rate=0.05, accountant=accountant)
    reached = epsilon(RoundMechanism(z, "poisson", rate=0.05), 100, 1e-5, accountant)
    assert reached <= 2.0 and reached == pytest.approx(2.0, rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "rate": 1.5}, "sampling rate"),
        ({"noise_multiplier": 1.0, "sampling": "fixed", "population": 5, "sample_size": 9}, "clients per round"),
    ],
)
def test_bad_mechanisms(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        RoundMechanism(**kwargs)
