"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field p = 2^521 - 1.

Secure aggregation (Bonawitz et al. 2017, section 4; Bell et al. 2020, SecAgg+) has each client
share its self-mask seed and its mask private key with its neighbours, so that the server can
recover the masks of clients that drop out (from the private key) or remove the self mask of
clients that survive (from the seed), given any ``threshold`` honest shares.

Why our own field arithmetic and not pycryptodome: ``Crypto.Protocol.SecretSharing.Shamir`` only
shares 16-byte secrets (it works in GF(2^128)). Splitting a 32-byte secret into two halves would
double the shares, their encryption and their bookkeeping, and add a second dependency to the one
on ``cryptography`` that we need anyway. Shamir's scheme itself is a few lines of modular
arithmetic: random coefficients (from :mod:`secrets`), polynomial evaluation, and Lagrange
interpolation at zero with inverses from ``pow(a, -1, p)``. Nothing else here is home-made.

The Mersenne prime ``2^521 - 1`` exceeds every 256-bit secret, so a secret is an integer in the
field as-is. Its size also gives a cheap sanity check: interpolating from too few, mixed-up or
garbled shares yields a field element that almost never fits in 32 bytes. It is not an integrity
check: a small deliberate change to a share shifts the result by a small amount and goes through,
which is why shares travel encrypted with AES-GCM (:mod:`consortium.secagg.crypto`) and why the
server checks every secret it reconstructs against what its owner published
(:func:`recover_checked`): a share holder can shift the share it reveals.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "Share",
    "combine_shares",
    "recover_checked",
    "split_secret",
]

PRIME = 2**521 - 1
SECRET_BYTES = 32
_VALUE_BYTES = (PRIME.bit_length() + 7) // 8


@dataclass(frozen=True)
class Share:
    """One share: the point ``(index, value)`` on the sharing polynomial, ``index`` in ``[1, n]``."""

    index: int
    value: int

    def to_bytes(self) -> bytes:
        """A fixed-size encoding (4-byte index, 66-byte value), ready to be encrypted."""
        return self.index.to_bytes(4, "big") + self.value.to_bytes(_VALUE_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """The share encoded by :meth:`to_bytes`.

        Raises:
            ValueError: ``data`` is not 70 bytes.
        """
        if len(data) != 4 + _VALUE_BYTES:
            raise ValueError(
                f"expected an encoded share of {4 + _VALUE_BYTES} bytes, found {len(data)}; "
                "use Share.to_bytes() to encode"
            )
        return cls(index=int.from_bytes(data[:4], "big"), value=int.from_bytes(data[4:], "big"))


def split_secret(secret: bytes, *, threshold: int, num_shares: int) -> list[Share]:
    """Split a 32-byte secret into ``num_shares`` shares, any ``threshold`` of which recover it.

    Fewer than ``threshold`` shares are independent of the secret (Shamir 1979): the polynomial's
    other coefficients are uniform in the field and drawn from :mod:`secrets`.

    Raises:
        ValueError: a secret that is not 32 bytes, ``threshold < 1``, or ``threshold > num_shares``.
    """
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        found = (
            f"{len(secret)} bytes"
            if isinstance(secret, (bytes, bytearray))
            else type(secret).__name__
        )
        raise ValueError(
            f"expected a secret of exactly {SECRET_BYTES} bytes, found {found}; "
            "share a 32-byte seed or key"
        )
    _check_threshold(threshold, num_shares)
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [
        Share(index=x, value=_evaluate(coefficients, x, PRIME)) for x in range(1, num_shares + 1)
    ]


def combine_shares(shares: Sequence[Share], *, threshold: int) -> bytes:
    """The 32-byte secret from at least ``threshold`` shares, by Lagrange interpolation at zero.

    Raises:
        ValueError: fewer than ``threshold`` shares, a repeated index, an index or value outside
            the field, or shares whose interpolation does not fit in 32 bytes (garbled or from
            different sharings; a targeted change to a share is not detected here).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"expected threshold as an int >= 1, found {threshold!r}")
    if len(shares) < threshold:
        raise ValueError(
            f"expected at least {threshold} shares to reconstruct, found {len(shares)}; "
            "collect shares from more surviving clients"
        )
    _check_shares(shares)
    value = _interpolate_at_zero([(s.index, s.value) for s in shares], PRIME)
    if value >= 1 << (8 * SECRET_BYTES):
        raise ValueError(
            "the shares do not reconstruct a 32-byte secret: they are corrupted, come from "
            "different sharings, or the threshold is wrong"
        )
    return value.to_bytes(SECRET_BYTES, "big")


def recover_checked(
    shares: Sequence[Share], *, threshold: int, check: Callable[[bytes], bool]
) -> tuple[bytes, tuple[int, ...]]:
    """The secret that passes ``check``, and the indices of the shares off its polynomial.

    Lagrange interpolation does not detect a shifted share (see the module docstring), so the
    caller supplies what the secret must satisfy: its hash commitment, or the public key it
    must derive. All shares are combined first (the honest case: one interpolation). If that
    fails the check and there are more than ``threshold`` shares, each of the first
    ``threshold + 1`` is left out in turn: with one corrupted share among them, one subset of
    ``threshold`` honest shares gives the secret; with the corrupted share elsewhere, the first
    subset does. The shares that do not lie on the recovered polynomial are returned, so the
    caller can name their holders (the error-detection view of Shamir's scheme as a
    Reed-Solomon code: McEliece and Sarwate 1981).

    Raises:
        ValueError: no subset tried gives a secret that passes ``check`` (too few shares to
            correct, more than one corrupted share, or a check that no secret can pass), or
            malformed shares (as :func:`combine_shares`).
    """
    try:
        secret = combine_shares(shares, threshold=threshold)
    except ValueError:
        secret = None
    if secret is not None and check(secret):
        return secret, ()
    ordered = sorted(shares, key=lambda s: s.index)
    if len(ordered) > threshold:
        first = ordered[: threshold + 1]
        for left_out in range(threshold + 1):
            subset = first[:left_out] + first[left_out + 1 :]
            try:
                secret = combine_shares(subset, threshold=threshold)
            except ValueError:
                continue
            if check(secret):
                points = [(s.index, s.value) for s in subset]
                off = tuple(
                    s.index for s in ordered
                    if _interpolate_at(points, s.index, PRIME) != s.value
                )
                return secret, off
    raise ValueError(
        f"no secret passing the check combines from {len(shares)} shares with threshold "
        f"{threshold}: more than one share is corrupted, too few to correct one (needs "
        f"{threshold + 1}), or the owner's commitment does not match its own secret"
    )


def _check_threshold(threshold: int, num_shares: int) -> None:
    for name, v in (("threshold", threshold), ("num_shares", num_shares)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"expected {name} as an int >= 1, found {v!r}")
    if threshold > num_shares:
        raise ValueError(
            f"expected threshold <= num_shares, found threshold={threshold} > "
            f"num_shares={num_shares}; lower the threshold or add share holders"
        )


def _check_shares(shares: Sequence[Share]) -> None:
    seen: set[int] = set()
    for share in shares:
        if not 1 <= share.index < PRIME:
            raise ValueError(
                f"expected share indices in [1, p), found {share.index}; index 0 would be the secret"
            )
        if not 0 <= share.value < PRIME:
            raise ValueError(
                f"expected share values in [0, p) with p = 2**521 - 1, found {share.value}"
            )
        if share.index in seen:
            raise ValueError(
                f"expected distinct share indices, found index {share.index} twice; "
                "pass each client's share once"
            )
        seen.add(share.index)


def _evaluate(coefficients: Sequence[int], x: int, prime: int) -> int:
    # Horner's rule; coefficients[0] is the constant term (the secret).
    result = 0
    for c in reversed(coefficients):
        result = (result * x + c) % prime
    return result


def _interpolate_at(points: Sequence[tuple[int, int]], x: int, prime: int) -> int:
    # The polynomial through `points` at `x`: L(x) = sum_j y_j prod_{m != j} (x - x_m)/(x_j - x_m).
    total = 0
    for j, (xj, yj) in enumerate(points):
        numerator, denominator = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                numerator = numerator * (x - xm) % prime
                denominator = denominator * (xj - xm) % prime
        total = (total + yj * numerator * pow(denominator, -1, prime)) % prime
    return total


def _interpolate_at_zero(points: Sequence[tuple[int, int]], prime: int) -> int:
    # L(0) = sum_j y_j * prod_{m != j} x_m / (x_m - x_j), with one modular inverse per term.
    total = 0
    for j, (xj, yj) in enumerate(points):
        numerator, denominator = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                numerator = numerator * xm % prime
                denominator = denominator * (xm - xj) % prime
        total = (total + yj * numerator * pow(denominator, -1, prime)) % prime
    return total
