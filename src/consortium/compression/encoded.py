"""The encoded update that travels instead of a float32 delta, its exact size and its strict decoder.

An :class:`Encoded` is a kind, the dense length, a few header integers and up to four typed
tensors (int32 indices, float16/bfloat16/float32 values, uint8 bit-packed codes, float32
scales). It holds nothing a wire format cannot carry as raw bytes, so the gRPC codec can send
it as it is, and :func:`decode` is the one place that turns it back into a dense vector,
refusing anything an honest client could not have produced (:class:`MalformedUpdate`).

Kinds and their fields (``d`` is ``size``):

====== ====================== =========================================================
kind   header                 tensors
====== ====================== =========================================================
fp16   ()                     values float16 [d]
bf16   ()                     values bfloat16 [d]
topk   (k,)                   indices int32 [k] strictly increasing in [0, d); values float32
                              or float16 [k]
sparse (k,)                   codes uint8: the indices' gaps Golomb–Rice coded with parameter
                              ``b = rice_parameter(d, k)`` (:mod:`~consortium.compression.rice`;
                              both sides derive it, so it does not travel); values float16 or
                              float32 [k]
randk  (k, seed)              values float32 [k]; the indices are ``random_indices(d, k, seed)``
qsgd   (bits, chunk)          codes uint8 (bits+1 bits a coordinate); scales float32 [chunks] ≥ 0
int    (bits, chunk)          codes uint8 (bits a coordinate, ≤ 2^bits − 2); scales float32 [chunks] ≥ 0
sign   ()                     codes uint8 (1 bit a coordinate: 1 for +1, 0 for −1)
lowrank (rank,)               values float32: per matrix layer P [n, r] and Q [m, r], else raw
====== ====================== =========================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from consortium.errors import ConsortiumError

__all__ = [
    "Encoded",
    "MalformedUpdate",
    "decode",
    "pack_codes",
    "random_indices",
    "unpack_codes",
]

HEADER_INT_BYTES = 8
"""Each header integer and the dense length travel as 8 bytes (a 64-bit integer)."""


class MalformedUpdate(ConsortiumError, ValueError):
    """An encoded update that no honest client produces: the server rejects it unused."""


@dataclass(frozen=True)
class Encoded:
    """A compressed update as it travels (see the module docstring for each kind's fields).

    Attributes:
        kind: the encoding (``"topk"``, ``"qsgd"`` ...).
        size: the length ``d`` of the dense vector it stands for.
        header: the kind's integers (``k``, bits, chunk length, seed ...).
        indices: int32 coordinates (top-k).
        values: the transmitted values (float16, bfloat16 or float32).
        codes: uint8 bytes holding bit-packed integer codes, least significant bit first.
        scales: float32 norms or step sizes (one per chunk).
    """

    kind: str
    size: int
    header: tuple[int, ...] = ()
    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Exact bytes of content: every tensor at its dtype, ``size`` and each header
        integer at 8 bytes, and the kind's name (UTF-8)."""
        n = len(self.kind.encode()) + HEADER_INT_BYTES * (1 + len(self.header))
        for t in (self.indices, self.values, self.codes, self.scales):
            if t is not None:
                n += t.numel() * t.element_size()
        return n


# -- bit packing --------------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integer codes of ``width`` bits (1–8) into uint8, least significant
    bit first; the last byte's unused bits are zero."""
    c = codes.to(torch.int64).numpy().astype(np.uint8)
    bits = (c[:, None] >> np.arange(width, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(bits.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """The ``n`` codes of ``width`` bits that :func:`pack_codes` packed (int64)."""
    bits = np.unpackbits(packed.numpy(), count=n * width, bitorder="little")
    weights = (1 << np.arange(width, dtype=np.int64))
    return torch.from_numpy(bits.reshape(n, width).astype(np.int64) @ weights)


def packed_length(n: int, width: int) -> int:
    return (n * width + 7) // 8


def random_indices(size: int, k: int, seed: int) -> torch.Tensor:
    """The ``k`` sorted coordinates random-k keeps, drawn from ``seed`` (the same on the
    client and the server: torch's CPU generator, so both must run the same torch)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(size, generator=gen)[:k].sort().values


# -- decoding -----------------------------------------------------------------------------------


def _need(cond: bool, enc: Encoded, what: str) -> None:
    if not cond:
        raise MalformedUpdate(f"encoded update ({enc.kind}, d={enc.size}) refused: {what}")


def _tensor(enc: Encoded, name: str, dtypes: tuple[torch.dtype, ...], length: int) -> torch.Tensor:
    t = getattr(enc, name)
    _need(t is not None, enc, f"it has no {name}")
    assert t is not None
    _need(t.dtype in dtypes, enc, f"{name} are {t.dtype}, expected {' or '.join(map(str, dtypes))}")
    _need(t.ndim == 1 and t.numel() == length, enc,
          f"{name} hold {tuple(t.shape)} values where the header says {length}")
    return t


def _absent(enc: Encoded, *names: str) -> None:
    for name in names:
        _need(getattr(enc, name) is None, enc, f"a {enc.kind} update carries no {name}")


def _header(enc: Encoded, n: int) -> tuple[int, ...]:
    _need(len(enc.header) == n, enc, f"the header has {len(enc.header)} integers, expected {n}")
    return enc.header


def _finite(enc: Encoded, name: str, t: torch.Tensor, *, nonnegative: bool = False) -> None:
    _need(bool(torch.isfinite(t).all()), enc, f"{name} are not all finite")
    if nonnegative:
        _need(bool((t >= 0).all()), enc, f"{name} are negative")


def _codes(enc: Encoded, n: int, width: int, high: int) -> torch.Tensor:
    packed = _tensor(enc, "codes", (torch.uint8,), packed_length(n, width))
    spare = packed_length(n, width) * 8 - n * width
    if spare:
        _need(int(packed[-1]) >> (8 - spare) == 0, enc, "the padding bits of the last byte are not zero")
    codes = unpack_codes(packed, n, width)
    if high < (1 << width) - 1:
        bad = int((codes > high).sum())
        _need(bad == 0, enc, f"{bad} codes exceed the largest valid code {high}")
    return codes


def _chunks(enc: Encoded, bits: int, chunk: int, lo: int, hi: int) -> int:
    _need(lo <= bits <= hi, enc, f"bits = {bits} outside [{lo}, {hi}]")
    _need(chunk >= 1, enc, f"chunk = {chunk} is not >= 1")
    return -(-enc.size // chunk)


def _per_chunk(scales: torch.Tensor, chunk: int, size: int) -> torch.Tensor:
    # indexed, not repeat_interleave(chunk): a received chunk of 2**40 must not allocate 2**40
    return scales[torch.arange(size) // chunk]


def decode(
    enc: Encoded, *, size: int, shapes: Sequence[Sequence[int]] | None = None
) -> torch.Tensor:
    """The dense float32 vector ``enc`` stands for, after checking every field.

    Args:
        enc: the received encoding.
        size: the length the server expects (the model's ``layout.size``).
        shapes: the model's tensor shapes in layout order (needed by ``lowrank`` only).

    Raises:
        MalformedUpdate: an unknown kind, a length that disagrees with the header or the model,
            indices out of range or repeated, codes out of range, non-finite values or scales,
            negative scales, non-zero padding bits, tensors that do not belong to the kind,
            and for ``sparse`` a Golomb–Rice stream longer than its ``k`` indices below ``d``
            can need, other than ``k`` quotients or trailing bytes (:func:`~consortium.compression.rice.decode_gaps`).
    """
    if not isinstance(enc, Encoded):
        raise MalformedUpdate(f"expected an Encoded update, got {type(enc).__name__}")
    _need(enc.size == size, enc, f"it stands for {enc.size} values, the model has {size}")
    d = enc.size
    kind = enc.kind
    if kind in ("fp16", "bf16"):
        _header(enc, 0)
        _absent(enc, "indices", "codes", "scales")
        dtype = torch.float16 if kind == "fp16" else torch.bfloat16
        values = _tensor(enc, "values", (dtype,), d).to(torch.float32)
        _finite(enc, "values", values)
        return values
    if kind == "topk":
        (k,) = _header(enc, 1)
        _need(1 <= k <= d, enc, f"k = {k} outside [1, {d}]")
        _absent(enc, "codes", "scales")
        idx = _tensor(enc, "indices", (torch.int32,), k).to(torch.int64)
        values = _tensor(enc, "values", (torch.float32, torch.float16), k).to(torch.float32)
        _need(int(idx.min()) >= 0 and int(idx.max()) < d, enc,
              f"indices outside [0, {d}) (found {int(idx.min())} .. {int(idx.max())})")
        _need(bool((idx[1:] > idx[:-1]).all()), enc,
              "indices repeat or are not in increasing order")
        _finite(enc, "values", values)
        out = torch.zeros(d)
        out[idx] = values
        return out
    if kind == "sparse":
        return _sparse(enc, d)
    if kind == "randk":
        k, seed = _header(enc, 2)
        _need(1 <= k <= d, enc, f"k = {k} outside [1, {d}]")
        _need(0 <= seed < 2**63, enc, f"seed {seed} is not a 63-bit integer")
        _absent(enc, "indices", "codes", "scales")
        values = _tensor(enc, "values", (torch.float32,), k)
        _finite(enc, "values", values)
        out = torch.zeros(d)
        out[random_indices(d, k, seed)] = values
        return out
    if kind == "qsgd":
        bits, chunk = _header(enc, 2)
        n_chunks = _chunks(enc, bits, chunk, 1, 7)
        _absent(enc, "indices", "values")
        scales = _tensor(enc, "scales", (torch.float32,), n_chunks)
        _finite(enc, "scales", scales, nonnegative=True)
        codes = _codes(enc, d, bits + 1, (1 << (bits + 1)) - 1)
        s = (1 << bits) - 1
        level = (codes >> 1).to(torch.float32)
        sign = 1.0 - 2.0 * (codes & 1).to(torch.float32)
        return sign * level / s * _per_chunk(scales, chunk, d)
    if kind == "int":
        bits, chunk = _header(enc, 2)
        n_chunks = _chunks(enc, bits, chunk, 2, 8)
        _absent(enc, "indices", "values")
        scales = _tensor(enc, "scales", (torch.float32,), n_chunks)
        _finite(enc, "scales", scales, nonnegative=True)
        top = (1 << (bits - 1)) - 1
        codes = _codes(enc, d, bits, 2 * top)
        return (codes - top).to(torch.float32) * _per_chunk(scales, chunk, d)
    if kind == "sign":
        _header(enc, 0)
        _absent(enc, "indices", "values", "scales")
        codes = _codes(enc, d, 1, 1)
        return 2.0 * codes.to(torch.float32) - 1.0
    if kind == "lowrank":
        from consortium.compression.lowrank import decode_lowrank, lowrank_length

        (rank,) = _header(enc, 1)
        _need(rank >= 1, enc, f"rank = {rank} is not >= 1")
        _absent(enc, "indices", "codes", "scales")
        _need(shapes is not None, enc, "a low-rank update needs the model's shapes to decode")
        assert shapes is not None
        values = _tensor(enc, "values", (torch.float32,), lowrank_length(shapes, rank))
        _finite(enc, "values", values)
        return decode_lowrank(values, shapes, rank)
    raise MalformedUpdate(
        f"encoded update of unknown kind {kind!r}; expected fp16, bf16, topk, sparse, randk, "
        "qsgd, int, sign or lowrank"
    )


def _sparse(enc: Encoded, d: int) -> torch.Tensor:
    """Top-k with Golomb–Rice coded gaps: every check of
    :func:`~consortium.compression.rice.decode_gaps` (bounded work before anything is unpacked)."""
    from consortium.compression.rice import RiceError, decode_gaps, rice_parameter

    (k,) = _header(enc, 1)
    _need(1 <= k <= d, enc, f"k = {k} outside [1, {d}]")
    b = rice_parameter(d, k)  # derived on both sides: nothing a sender could inflate
    _absent(enc, "indices", "scales")
    values = _tensor(enc, "values", (torch.float16, torch.float32), k).to(torch.float32)
    _finite(enc, "values", values)
    codes = enc.codes
    _need(codes is not None, enc, "it has no codes (the coded indices)")
    assert codes is not None
    _need(codes.dtype == torch.uint8 and codes.ndim == 1, enc,
          f"codes are {codes.dtype} of shape {tuple(codes.shape)}, expected flat uint8")
    try:
        idx = decode_gaps(codes.numpy(), d=d, k=k, b=b)
    except RiceError as exc:
        raise MalformedUpdate(f"encoded update (sparse, d={d}) refused: {exc}") from exc
    out = torch.zeros(d)
    out[torch.from_numpy(idx)] = values
    return out
