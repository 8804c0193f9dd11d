"""Golomb–Rice coding of a sorted index set's gaps: top-k's indices in ~``b + 2`` bits each.

Golomb, "Run-length encodings", IEEE Trans. Inf. Theory 12(3), 1966; Rice, "Some practical
universal noiseless coding techniques", JPL 79-22, 1979. The gaps ``gᵢ = iᵢ − iᵢ₋₁ ≥ 1`` (with
``i₋₁ = −1``) of ``k`` of ``d`` coordinates are close to geometric with ``p = k/d``, for which
the best Golomb modulus is ``m ≈ ln 2 / p`` (Gallager & van Voorhis 1975); Rice codes restrict
``m`` to ``2^b``, so ``b = max(0, round(log2(d/k · ln 2)))`` (:func:`rice_parameter`). Each
``gᵢ − 1`` is split into a quotient ``qᵢ = (gᵢ − 1) >> b``, sent in unary (``qᵢ`` zero bits then a
one), and a remainder of ``b`` bits. The stream is two parts, each bit-packed least significant
bit first: the ``k`` remainders (``ceil(k·b / 8)`` bytes, padding bits zero) and then the unary
quotients (padding bits zero, so the ``k`` ones are exactly the quotients' ends). Both sides are
whole-array numpy (``np.packbits``, ``np.flatnonzero``, ``np.cumsum``): no per-index Python.

A hostile stream costs bounded work: ``Σ qᵢ ≤ (d − k) >> b`` for any valid index set, so the
unary part may hold at most ``ceil((k + ((d − k) >> b)) / 8)`` bytes (:func:`max_unary_bytes`),
checked before a single bit is unpacked.

Written here, not taken from a library: the maintained entropy coders on PyPI (zstandard,
brotli, constriction's ANS/range coders) are byte- or symbol-stream coders whose decoders do
not let us bound the work and check each field as the server must for a hostile stream, and we found no maintained package that codes
Golomb–Rice gaps over whole numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "RiceError",
    "decode_gaps",
    "encode_gaps",
    "max_rice_parameter",
    "max_unary_bytes",
    "remainder_bytes",
    "rice_parameter",
]


class RiceError(ValueError):
    """A Golomb–Rice stream no honest encoder produces (the message says which check failed)."""


def rice_parameter(d: int, k: int) -> int:
    """The Rice parameter ``b = max(0, round(log2(d/k · ln 2)))`` for ``k`` of ``d`` indices,
    at most :func:`max_rice_parameter`."""
    if not 1 <= k <= d:
        raise ValueError(f"k = {k} must be in [1, d = {d}]")
    b = max(0, round(math.log2(d / k * math.log(2))))
    return min(b, max_rice_parameter(d))


def max_rice_parameter(d: int) -> int:
    """The largest ``b`` worth using for ``d`` coordinates: a gap minus one is below ``d``, so
    ``d.bit_length()`` bits hold any remainder."""
    return max(0, int(d).bit_length())


def remainder_bytes(k: int, b: int) -> int:
    """Bytes of the ``k`` bit-packed ``b``-bit remainders."""
    return (k * b + 7) // 8


def max_unary_bytes(d: int, k: int, b: int) -> int:
    """The most bytes the unary quotients of ``k`` increasing indices below ``d`` can take."""
    return (k + ((d - k) >> b) + 7) // 8


def encode_gaps(indices: np.ndarray, b: int) -> np.ndarray:
    """The uint8 stream (remainders, then unary quotients) of strictly increasing, non-negative
    ``indices`` with Rice parameter ``b``."""
    idx = np.asarray(indices, dtype=np.int64)
    gaps = np.diff(idx, prepend=np.int64(-1)) - 1  # gᵢ − 1 ≥ 0
    if gaps.size and int(gaps.min()) < 0:
        raise ValueError("indices must be strictly increasing and non-negative")
    quotients = gaps >> b
    remainders = gaps & ((1 << b) - 1)
    rem = _pack(remainders, b)
    ends = np.cumsum(quotients + 1) - 1  # the position of each quotient's closing one
    n_bits = int(ends[-1]) + 1 if ends.size else 0
    bits = np.zeros((n_bits + 7) // 8 * 8, dtype=np.uint8)
    bits[ends] = 1
    return np.concatenate([rem, np.packbits(bits, bitorder="little")])


def decode_gaps(stream: np.ndarray, *, d: int, k: int, b: int) -> np.ndarray:
    """The ``k`` strictly increasing int64 indices in ``[0, d)`` that ``stream`` codes.

    Raises:
        RiceError: ``b`` or the stream's length out of bounds, non-zero padding bits, a unary
            part that does not end in its last byte or holds other than ``k`` quotients, a
            gap beyond ``d``, or an index ``≥ d``.
    """
    if not 1 <= k <= d:
        raise RiceError(f"k = {k} outside [1, {d}]")
    if not 0 <= b <= max_rice_parameter(d):
        raise RiceError(f"Rice parameter b = {b} outside [0, {max_rice_parameter(d)}]")
    n_rem = remainder_bytes(k, b)
    n_unary = stream.size - n_rem
    cap = max_unary_bytes(d, k, b)
    if not (k + 7) // 8 <= n_unary <= cap:
        raise RiceError(
            f"the stream has {stream.size} bytes; {k} indices below {d} with b = {b} take "
            f"{n_rem} bytes of remainders and {(k + 7) // 8} to {cap} of unary quotients")
    spare = n_rem * 8 - k * b
    if spare and int(stream[n_rem - 1]) >> (8 - spare):
        raise RiceError("the padding bits after the remainders are not zero")
    remainders = _unpack(stream[:n_rem], k, b)
    ends = np.flatnonzero(np.unpackbits(stream[n_rem:], bitorder="little"))
    if ends.size != k:
        raise RiceError(f"the unary part holds {ends.size} quotients, expected k = {k}")
    if int(ends[-1]) // 8 != n_unary - 1:
        raise RiceError("the unary part has trailing bytes after its last quotient")
    quotients = np.diff(ends, prepend=np.int64(-1)) - 1
    # each gap minus one is below d before anything is summed, so nothing overflows int64
    if int(quotients.max()) > (d - 1) >> b:
        raise RiceError(f"a gap exceeds the model's {d} coordinates")
    gaps = (quotients << b) + remainders + 1
    indices = np.cumsum(gaps) - 1
    if int(indices[-1]) >= d:
        raise RiceError(f"an index {int(indices[-1])} is not below d = {d}")
    return indices


def _pack(values: np.ndarray, width: int) -> np.ndarray:
    if width == 0:
        return np.zeros(0, dtype=np.uint8)
    bits = ((values[:, None] >> np.arange(width, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def _unpack(packed: np.ndarray, n: int, width: int) -> np.ndarray:
    if width == 0:
        return np.zeros(n, dtype=np.int64)
    bits = np.unpackbits(packed, count=n * width, bitorder="little")
    return bits.reshape(n, width).astype(np.int64) @ (np.int64(1) << np.arange(width,
                                                                               dtype=np.int64))
