"""Sampling and straggler assignment: sizes, seeding, coverage."""

from __future__ import annotations

import pytest

from consortium.errors import ConfigError
from consortium.server.heterogeneity import Stragglers
from consortium.server.sampling import UniformSampler

IDS = [f"c{i}" for i in range(20)]


def test_count_without_replacement_and_order_kept() -> None:
    chosen = UniformSampler(count=5).sample(1, IDS, seed=0)
    assert len(chosen) == len(set(chosen)) == 5
    assert chosen == sorted(chosen, key=IDS.index)


def test_fraction_rounds_up_and_everyone_by_default() -> None:
    assert len(UniformSampler(fraction=0.12).sample(1, IDS, seed=0)) == 3  # ceil(2.4)
    assert UniformSampler().sample(1, IDS, seed=0) == IDS


def test_seeded_per_round() -> None:
    s = UniformSampler(count=5)
    assert s.sample(3, IDS, seed=7) == s.sample(3, IDS, seed=7)
    draws = {tuple(s.sample(r, IDS, seed=7)) for r in range(1, 20)}
    assert len(draws) > 10  # rounds differ


def test_uniform_over_many_rounds() -> None:
    s = UniformSampler(count=5)
    counts = dict.fromkeys(IDS, 0)
    for r in range(1, 2001):
        for c in s.sample(r, IDS, seed=1):
            counts[c] += 1
    # each client expected 500 times; binomial sd ≈ 19
    assert all(400 < v < 600 for v in counts.values()), counts


def test_more_clients_than_available_is_explained() -> None:
    with pytest.raises(ConfigError, match="only 20 clients"):
        UniformSampler(count=21).sample(1, IDS, seed=0)


def test_stragglers_fraction_and_range() -> None:
    work = Stragglers(0.5).work(1, IDS, seed=0)
    slow = [w for w in work.values() if w < 1.0]
    assert len(slow) == 10
    assert all(0.0 < w <= 1.0 for w in work.values())
    assert Stragglers(0.5).work(1, IDS, seed=0) == work
    assert Stragglers(0.0).work(1, IDS, seed=0) == dict.fromkeys(IDS, 1.0)
