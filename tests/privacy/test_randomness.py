"""Site-private randomness: a private, non-repeating stream; exact-in-law discrete Gaussian;
snapped Gaussian releases that sit on the grid and keep the sensitivity the accountant assumes."""

from __future__ import annotations

import math
import os
import pickle
import sys
import threading

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from consortium.privacy import randomness as rnd
from consortium.privacy.randomness import (
    Randomness,
    SeededRandomness,
    SystemRandomness,
    snap_grid,
)

KEY = bytes(range(32))


def fixed() -> SystemRandomness:
    return SystemRandomness.from_key(KEY)


# --- the stream -------------------------------------------------------------------------------


def test_uniform_is_open_unit_interval_with_uniform_moments() -> None:
    u = fixed().uniform(100_000)
    assert u.dtype == torch.float64 and u.shape == (100_000,)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    # sd of the mean is 0.0009 and of the variance 0.00024: these are ~5 sd wide
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(u.var()) == pytest.approx(1 / 12, abs=0.0015)


def test_uniform_values_are_exact_cell_midpoints() -> None:
    # (2k + 1) * 2**-53: an odd integer once scaled, so nothing rounded to 0, 1 or a neighbour
    scaled = fixed().uniform(10_000).numpy() * 2.0**53
    assert np.array_equal(scaled, np.round(scaled))
    assert (scaled.astype(np.int64) % 2 == 1).all()


def test_system_instances_draw_different_streams() -> None:
    a, b = SystemRandomness(), SystemRandomness()
    assert not torch.equal(a.uniform(16), b.uniform(16))


def test_from_key_and_seed_reproduce_and_differ() -> None:
    assert torch.equal(fixed().uniform(64), fixed().uniform(64))
    assert not torch.equal(fixed().uniform(64), SystemRandomness.from_key(bytes(32)).uniform(64))
    assert torch.equal(SeededRandomness(7).discrete_gaussian(50, 3.0),
                       SeededRandomness(7).discrete_gaussian(50, 3.0))
    assert not torch.equal(SeededRandomness(7).uniform(8), SeededRandomness(8).uniform(8))
    with pytest.raises(ValueError, match="32 bytes"):
        SystemRandomness.from_key(b"short")


def test_successive_draws_continue_the_stream() -> None:
    r = fixed()
    first, second = r.uniform(10), r.uniform(10)
    assert not torch.equal(first, second)
    assert torch.equal(torch.cat([first, second]), fixed().uniform(20))


def test_keystream_is_chacha20_with_a_32_bit_block_counter_first() -> None:
    # The nonce management assumes OpenSSL's IV layout: 4-byte block counter, 12-byte nonce.
    # If it were otherwise, a counter of 1 would not give the stream's second block.
    stream = fixed()._keystream(128)
    second_block = Cipher(algorithms.ChaCha20(KEY, (1).to_bytes(4, "little") + bytes(12)),
                          mode=None).encryptor().update(bytes(64))
    assert stream[64:] == second_block


def test_a_spent_segment_moves_to_a_fresh_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rnd, "_SEGMENT_BYTES", 64)
    stream = fixed()._keystream(200)
    expected = b"".join(
        Cipher(algorithms.ChaCha20(KEY, bytes(4) + s.to_bytes(12, "little")), mode=None)
        .encryptor().update(bytes(64))
        for s in range(4)
    )
    assert stream == expected[:200]
    assert len({stream[i : i + 64] for i in range(0, 192, 64)}) == 3


def test_threads_share_one_stream_without_repeating_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Short segments and a tiny switch interval make unguarded draws interleave.
    monkeypatch.setattr(rnd, "_SEGMENT_BYTES", 128)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    r, chunks = fixed(), []

    def draw() -> None:
        for _ in range(300):
            chunks.append(r._keystream(96))

    threads = [threading.Thread(target=draw) for _ in range(4)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    whole = fixed()._keystream(96 * 1200)
    assert sorted(chunks) == sorted(whole[i : i + 96] for i in range(0, len(whole), 96))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_repeat_the_parent() -> None:
    def child_draw(r: SystemRandomness) -> int:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os.write(write, r.seed63().to_bytes(8, "little"))
            os._exit(0)
        os.close(write)
        value = int.from_bytes(os.read(read, 8), "little")
        os.close(read)
        os.waitpid(pid, 0)
        return value

    system = SystemRandomness()
    assert child_draw(system) != system.seed63()
    seeded = SeededRandomness(3)  # reproducible by design, fork included
    assert child_draw(seeded) == seeded.seed63()


def test_cannot_be_pickled() -> None:
    with pytest.raises(TypeError, match="repeat its draws"):
        pickle.dumps(SystemRandomness())


def test_both_classes_are_randomness() -> None:
    assert isinstance(SystemRandomness(), Randomness)
    assert isinstance(SeededRandomness(0), Randomness)


def test_seed63_is_63_bits_and_seeds_a_generator() -> None:
    r = fixed()
    seeds = [r.seed63() for _ in range(200)]
    assert all(0 <= s < 2**63 for s in seeds) and len(set(seeds)) == 200
    assert max(seeds) >= 2**61  # all 63 bits in use, not 32 or 53
    torch.Generator().manual_seed(seeds[0])


def test_bernoulli_rate() -> None:
    r = fixed()
    x = r.bernoulli(100_000, 0.3)
    assert x.dtype == torch.bool
    assert float(x.double().mean()) == pytest.approx(0.3, abs=0.007)  # ~5 sd
    assert not r.bernoulli(1000, 0.0).any() and r.bernoulli(1000, 1.0).all()
    with pytest.raises(ValueError, match="probability"):
        r.bernoulli(3, 1.5)


# --- discrete Gaussian ------------------------------------------------------------------------


def dgauss_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    half = int(math.ceil(15 * sigma)) + 5
    x = np.arange(-half, half + 1)
    w = np.exp(-(x.astype(np.float64) ** 2) / (2 * sigma**2))
    return x, w / w.sum()


def chi_square_p(samples: np.ndarray, sigma: float) -> float:
    """Goodness of fit against the exact pmf, tail bins pooled until each expects >= 5."""
    x, p = dgauss_pmf(sigma)
    observed = np.bincount(np.clip(samples, x[0], x[-1]) - x[0], minlength=len(x)).astype(float)
    expected = p * len(samples)
    big = np.flatnonzero(expected >= 5)
    lo, hi = big[0], big[-1]
    obs = np.concatenate([[observed[: lo + 1].sum()], observed[lo + 1 : hi], [observed[hi:].sum()]])
    exp = np.concatenate([[expected[: lo + 1].sum()], expected[lo + 1 : hi], [expected[hi:].sum()]])
    return float(stats.chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("sigma", [0.7, 3.0, 50.0])
def test_discrete_gaussian_fits_the_exact_pmf(sigma: float) -> None:
    r = fixed()
    draws = r.discrete_gaussian(40_000, sigma)
    assert draws.dtype == torch.int64
    assert chi_square_p(draws.numpy(), sigma) > 1e-4
    # the test has the power to see a 10 % wrong scale
    assert chi_square_p(r.discrete_gaussian(40_000, 1.1 * sigma).numpy(), sigma) < 1e-6


@pytest.mark.parametrize("sigma", [0.7, 3.0, 50.0])
def test_discrete_gaussian_variance_is_the_pmf_variance(sigma: float) -> None:
    x, p = dgauss_pmf(sigma)
    exact = float((p * x.astype(np.float64) ** 2).sum())  # 0.417 for sigma 0.7, not 0.49
    draws = SeededRandomness(1).discrete_gaussian(40_000, sigma).double()
    assert float(draws.var()) == pytest.approx(exact, rel=0.03)  # sd ~0.7 %
    assert abs(float(draws.mean())) < 5 * math.sqrt(exact / 40_000)


def test_discrete_gaussian_extreme_scales() -> None:
    r = fixed()
    wide = r.discrete_gaussian(20_000, 1e7).double()
    assert float(wide.std()) == pytest.approx(1e7, rel=0.03)
    assert torch.equal(r.discrete_gaussian(1000, 1e-3), torch.zeros(1000, dtype=torch.int64))
    assert r.discrete_gaussian(0, 2.0).shape == (0,)


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.inf, math.nan, 2e9])
def test_discrete_gaussian_rejects_bad_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma"):
        fixed().discrete_gaussian(10, sigma)


# --- snapped Gaussian -------------------------------------------------------------------------


def test_snap_grid_formula() -> None:
    assert snap_grid(2.0, 400) == pytest.approx(2.0 / (1024 * 20))
    with pytest.raises(ValueError):
        snap_grid(0.0, 10)


def test_snapped_release_is_on_the_grid_with_the_stated_noise() -> None:
    d, sensitivity, z = 20_000, 0.5, 1.3
    values = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = fixed().snapped_gaussian(values, sensitivity=sensitivity, noise_multiplier=z)
    assert out.dtype == torch.float64 and out.shape == values.shape
    steps = out.numpy() / snap_grid(sensitivity, d)
    assert np.all(np.abs(steps - np.round(steps)) <= 1e-9 * np.maximum(1.0, np.abs(steps)))
    noise = out - values
    assert float(noise.std()) == pytest.approx(z * sensitivity * (1 + 1 / 1024), rel=0.02)
    assert abs(float(noise.mean())) < 5 * z * sensitivity / math.sqrt(d)


def test_snapped_noise_is_the_rounded_gaussian_with_sigma_z_1025_sqrt_d_steps() -> None:
    # sigma / (sensitivity / g + sqrt(d)) must be z exactly, a 0.1 % change no statistic sees;
    # the noise is floor(sigma Z + 1/2) for the stream's standard normals Z (post-processing of
    # the Gaussian mechanism on the grid point)
    d, sensitivity, z = 900, 3.0, 0.8
    out = SeededRandomness(4).snapped_gaussian(
        torch.zeros(d, dtype=torch.float64), sensitivity=sensitivity, noise_multiplier=z
    )
    steps = torch.round(out / snap_grid(sensitivity, d)).to(torch.int64)
    expected = torch.floor(SeededRandomness(4).gaussian(d) * (z * 1025 * 30) + 0.5).to(torch.int64)
    assert torch.equal(steps, expected)


def test_the_gaussian_is_standard_normal() -> None:
    from scipy import stats

    draws = SeededRandomness(11).gaussian(50_001).numpy()
    assert draws.shape == (50_001,) and np.abs(draws).max() < 8.6
    assert stats.kstest(draws, "norm").pvalue > 1e-3
    assert abs(draws.mean()) < 0.02 and draws.std() == pytest.approx(1.0, rel=0.02)


def rounded_difference(x: torch.Tensor, y: torch.Tensor, sensitivity: float) -> float:
    """||round(x/g) - round(y/g)||_2 as the release sees it: same seed, so the noise cancels."""
    kw = {"sensitivity": sensitivity, "noise_multiplier": 1.0}
    a = SeededRandomness(5).snapped_gaussian(x, **kw)
    b = SeededRandomness(5).snapped_gaussian(y, **kw)
    return float(torch.linalg.vector_norm(torch.round((a - b) / snap_grid(sensitivity, x.numel()))))


def test_neighbours_stay_within_1025_sqrt_d_grid_steps() -> None:
    d, sensitivity = 4096, 2.0
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(d, dtype=torch.float64, generator=gen)
    delta = torch.randn(d, dtype=torch.float64, generator=gen)
    delta *= sensitivity / torch.linalg.vector_norm(delta)
    assert rounded_difference(x, x + delta, sensitivity) <= 1025 * math.sqrt(d)


def test_the_bound_is_reached_by_worst_case_rounding() -> None:
    # Every coordinate of x just below a half step (rounds down), of x' just above one
    # (rounds up): the rounded vectors differ by 1025 steps a coordinate, the accounting's
    # sensitivity / g + sqrt(d), while ||x - x'|| exceeds the sensitivity by only 2e-6 steps.
    d, sensitivity = 1024, 1.0
    g = snap_grid(sensitivity, d)
    j = torch.arange(d, dtype=torch.float64) - d / 2
    x = (j + 0.5 - 1e-6) * g
    y = (j + 1024.5 + 1e-6) * g
    assert float(torch.linalg.vector_norm(y - x)) == pytest.approx(sensitivity, rel=1e-8)
    assert rounded_difference(x, y, sensitivity) == pytest.approx(1025 * math.sqrt(d), rel=1e-12)


def test_release_depends_only_on_the_grid_point() -> None:
    # Mironov's attack reads the input from the low bits of a float sum; here inputs that
    # round to the same grid point give bit-identical releases.
    d, sensitivity = 1000, 1.0
    g = snap_grid(sensitivity, d)
    x = torch.arange(d, dtype=torch.float64) * g
    kw = {"sensitivity": sensitivity, "noise_multiplier": 1.0}
    a = SeededRandomness(9).snapped_gaussian(x, **kw)
    b = SeededRandomness(9).snapped_gaussian(x + 0.3 * g, **kw)
    assert torch.equal(a, b)


def test_snapped_keeps_shape_and_widens_float32() -> None:
    values = torch.zeros(3, 4, dtype=torch.float32)
    out = fixed().snapped_gaussian(values, sensitivity=1.0, noise_multiplier=1.0)
    assert out.shape == (3, 4) and out.dtype == torch.float64
    empty = fixed().snapped_gaussian(torch.zeros(0), sensitivity=1.0, noise_multiplier=1.0)
    assert empty.shape == (0,)


def test_snapped_rejects_what_it_cannot_release_exactly() -> None:
    r = fixed()
    with pytest.raises(ValueError, match="2\\*\\*52"):
        r.snapped_gaussian(torch.tensor([1e10], dtype=torch.float64),
                           sensitivity=1e-3, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="finite"):
        r.snapped_gaussian(torch.tensor([math.nan]), sensitivity=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        r.snapped_gaussian(torch.zeros(3), sensitivity=1.0, noise_multiplier=0.0)
    with pytest.raises(ValueError, match="sensitivity"):
        r.snapped_gaussian(torch.zeros(3), sensitivity=-1.0, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="floating-point"):
        r.snapped_gaussian(torch.zeros(3, dtype=torch.int64), sensitivity=1.0, noise_multiplier=1.0)
