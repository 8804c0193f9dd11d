"""Shamir sharing: any t shares reconstruct, t - 1 reveal nothing, bad shares are rejected."""

from __future__ import annotations

import itertools
import os

import pytest

from consortium.secagg.shamir import (
    PRIME,
    Share,
    _evaluate,
    _interpolate_at_zero,
    combine_shares,
    split_secret,
)


def test_any_t_shares_reconstruct() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=3, num_shares=6)
    assert [s.index for s in shares] == [1, 2, 3, 4, 5, 6]
    for subset in itertools.combinations(shares, 3):
        assert combine_shares(list(subset), threshold=3) == secret
    assert combine_shares(shares, threshold=3) == secret  # more than t also works
    assert combine_shares(list(reversed(shares[2:])), threshold=3) == secret


@pytest.mark.parametrize(("t", "n"), [(1, 1), (1, 4), (4, 4), (7, 10)])
def test_edge_thresholds(t: int, n: int) -> None:
    secret = b"\x00" * 31 + b"\x01"  # leading zeros survive the round trip
    shares = split_secret(secret, threshold=t, num_shares=n)
    assert combine_shares(shares[-t:], threshold=t) == secret


def test_hand_computed_interpolation() -> None:
    # f(x) = 5 + 3x over p = 11: f(1) = 8, f(2) = 0; interpolation at 0 gives 5.
    assert _evaluate([5, 3], 1, 11) == 8 and _evaluate([5, 3], 2, 11) == 0
    assert _interpolate_at_zero([(1, 8), (2, 0)], 11) == 5


def test_t_minus_one_shares_do_not_reveal_the_secret() -> None:
    for _ in range(200):
        secret = os.urandom(32)
        shares = split_secret(secret, threshold=4, num_shares=6)
        guess = _interpolate_at_zero([(s.index, s.value) for s in shares[:3]], PRIME)
        assert guess != int.from_bytes(secret, "big")
        assert guess >= 2**256  # so combine_shares would refuse it, not return a wrong secret


def test_t_minus_one_shares_are_independent_of_the_secret_exhaustively() -> None:
    # Over GF(7) with t = 3, shares at x = 1, 2: for every secret, the 49 coefficient choices
    # give each of the 49 possible share pairs exactly once, so the pair says nothing.
    p = 7
    for secret in range(p):
        seen = {
            (_evaluate([secret, a, b], 1, p), _evaluate([secret, a, b], 2, p))
            for a in range(p)
            for b in range(p)
        }
        assert len(seen) == p * p


def test_invalid_shares_rejected() -> None:
    shares = split_secret(os.urandom(32), threshold=2, num_shares=3)
    with pytest.raises(ValueError, match="twice"):
        combine_shares([shares[0], shares[0]], threshold=2)
    with pytest.raises(ValueError, match="indices in"):
        combine_shares([Share(0, 5), shares[1]], threshold=2)
    with pytest.raises(ValueError, match="indices in"):
        combine_shares([Share(-1, 5), shares[1]], threshold=2)
    with pytest.raises(ValueError, match="values in"):
        combine_shares([Share(1, PRIME), shares[1]], threshold=2)
    with pytest.raises(ValueError, match="at least 2 shares"):
        combine_shares(shares[:1], threshold=2)
    garbled = Share(shares[0].index, int.from_bytes(os.urandom(65), "big") % PRIME)
    with pytest.raises(ValueError, match="do not reconstruct"):
        combine_shares([garbled, shares[1]], threshold=2)


def test_small_corruption_is_not_detected_by_the_size_check() -> None:
    # The size check catches garbage, not a targeted change: that is AES-GCM's job on the share.
    secret = bytes(32)
    shares = split_secret(secret, threshold=2, num_shares=3)
    nudged = Share(shares[0].index, (shares[0].value + 1) % PRIME)
    assert combine_shares([nudged, shares[1]], threshold=2) != secret


def test_invalid_parameters_rejected() -> None:
    with pytest.raises(ValueError, match="threshold <= num_shares"):
        split_secret(os.urandom(32), threshold=4, num_shares=3)
    with pytest.raises(ValueError, match="threshold as an int >= 1"):
        split_secret(os.urandom(32), threshold=0, num_shares=3)
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        split_secret(os.urandom(16), threshold=2, num_shares=3)


def test_share_bytes_round_trip() -> None:
    shares = split_secret(os.urandom(32), threshold=2, num_shares=3)
    encoded = [s.to_bytes() for s in shares]
    assert {len(e) for e in encoded} == {70}
    assert [Share.from_bytes(e) for e in encoded] == shares
    with pytest.raises(ValueError, match="70 bytes"):
        Share.from_bytes(encoded[0][:-1])


def test_sharings_are_randomised() -> None:
    secret = os.urandom(32)
    a = split_secret(secret, threshold=2, num_shares=2)
    b = split_secret(secret, threshold=2, num_shares=2)
    assert a != b
