"""The SecAgg+ round's configuration, its messages (frozen dataclasses) and the bytes its clients sign.

:mod:`consortium.secagg.protocol` runs the round with these; :mod:`consortium.deploy.codec`
puts them on the wire. The phases and who sends what are described there; the signed
encodings here follow Bonawitz et al. 2017, Fig. 4 (the active-adversary variant): every
client signs its two public keys in phase 1 and the survivor set in the consistency round,
each encoded canonically (length-prefixed fields behind a fixed label) and bound to the
round's configuration, so that a signature from one purpose, round or run verifies for no other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from consortium.errors import RoundAborted
from consortium.secagg.masks import MAX_MODULUS_BITS
from consortium.secagg.shamir import Share

__all__ = [
    "MASKED_WORD_BITS",
    "SEED_COMMITMENT_BYTES",
    "AdvertiseKeys",
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedShares",
    "KeysBroadcast",
    "MaskedInput",
    "SecAggAbort",
    "SecAggConfig",
    "SecAggRefusal",
    "SecAggResult",
    "SharesForClient",
    "UnmaskRequest",
    "UnmaskResponse",
    "consistency_bytes",
    "masked_wire_dtype",
    "seed_commitment",
    "signed_keys_bytes",
]

_KEYS_LABEL = b"consortium/secagg/signed-keys/v1"
_CONSISTENCY_LABEL = b"consortium/secagg/consistency/v1"
_SEED_LABEL = b"consortium/secagg/seed-commitment/v1"
SEED_COMMITMENT_BYTES = 32


class SecAggAbort(RoundAborted):
    """The secure-aggregation round stopped; nothing that would unmask an input was revealed."""


class SecAggRefusal(SecAggAbort):
    """A client refused an unmask request that would reveal both secrets of one client, or one
    the survivors did not agree on."""


# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class SecAggConfig:
    """Parameters of one SecAgg+ round (Bell et al. 2020).

    Args:
        num_clients_expected: clients invited to the round (``n``).
        threshold: ``t``, the Shamir threshold; any ``t`` of a client's neighbours can recover its
            secrets, fewer learn nothing. Must be ``<= neighbours``.
        neighbours: ``k``, the degree of the neighbour graph; ``k >= n - 1`` is full SecAgg.
        round: the training round, bound into every key, seed, ciphertext and signature.
        context: bytes naming the run (``b"consortium/secagg/v2/" + run_id``), bound like
            ``round``.
        modulus_bits: masked inputs live in ``[0, 2**modulus_bits)``.

    Raises:
        ValueError: an argument out of range.
    """

    num_clients_expected: int
    threshold: int
    neighbours: int
    round: int
    context: bytes
    modulus_bits: int = 32

    def __post_init__(self) -> None:
        for name in ("num_clients_expected", "threshold", "neighbours", "round", "modulus_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected {name} as an int, found {value!r}")
        if self.num_clients_expected < 2:
            raise ValueError(
                f"expected num_clients_expected >= 2, found {self.num_clients_expected}; "
                "secure aggregation of one client hides nothing"
            )
        if not 1 <= self.neighbours:
            raise ValueError(f"expected neighbours >= 1, found {self.neighbours}")
        if not 1 <= self.threshold <= self.neighbours:
            raise ValueError(
                f"expected 1 <= threshold <= neighbours, found threshold={self.threshold}, "
                f"neighbours={self.neighbours}; a client's secrets are shared among its neighbours"
            )
        if not 0 <= self.round < 2**64:
            raise ValueError(f"expected round in [0, 2**64), found {self.round}")
        if not isinstance(self.context, (bytes, bytearray)):
            raise ValueError(
                f"expected context as bytes, found {type(self.context).__name__}; "
                "e.g. run_id.encode()"
            )
        if not 1 <= self.modulus_bits <= MAX_MODULUS_BITS:
            raise ValueError(
                f"expected modulus_bits in [1, {MAX_MODULUS_BITS}], found {self.modulus_bits}"
            )


# ------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class AdvertiseKeys:
    """Phase 1, client to server: the client's two raw X25519 public keys.

    With authentication, ``certificate`` (DER, issued by the consortium CA for ``client_id``) and
    ``signature`` (ECDSA over :func:`signed_keys_bytes`); empty without. ``seed_commitment`` is
    :func:`seed_commitment` of the client's self-mask seed ``b``: the server checks the seed it
    reconstructs from the neighbours' shares against it, so a neighbour that reveals a shifted
    share cannot corrupt the sum unnoticed (the server leaves out a client without one).
    """

    client_id: str
    c_public: bytes
    s_public: bytes
    certificate: bytes = b""
    signature: bytes = b""
    seed_commitment: bytes = b""


@dataclass(frozen=True)
class KeysBroadcast:
    """Phase 1, server to one client: the graph seed, the participants and the neighbours' keys.

    ``signatures`` holds, with authentication, each neighbour's ``(certificate, signature)``
    from its :class:`AdvertiseKeys`, which the client checks before sharing anything.
    """

    round: int
    graph_seed: bytes
    participants: tuple[str, ...]
    neighbour_keys: Mapping[str, tuple[bytes, bytes]]  # neighbour -> (c_public, s_public)
    signatures: Mapping[str, tuple[bytes, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class EncryptedShares:
    """Phase 2, client to server: one AES-GCM ciphertext per neighbour."""

    sender: str
    ciphertexts: Mapping[str, bytes]  # recipient -> ciphertext


@dataclass(frozen=True)
class SharesForClient:
    """Phase 2, server to one client: the ciphertexts its neighbours addressed to it."""

    recipient: str
    ciphertexts: Mapping[str, bytes]  # sender -> ciphertext


@dataclass(frozen=True)
class MaskedInput:
    """Phase 3, client to server: the masked vector ``y`` (int64 in ``[0, 2**modulus_bits)``).

    In memory the residues are int64 (the protocol's arithmetic); on the wire they travel in
    the narrowest exact form, :func:`masked_wire_dtype`: 4-byte uint32 words for the usual
    modulus ``2**32`` (half of int64), int64 only for a residue beyond 32 bits.
    :meth:`wire_nbytes` is what the wire then carries, which ``bytes_up`` counts.
    """

    client_id: str
    vector: torch.Tensor

    def wire_nbytes(self) -> int:
        """Bytes of the client id (UTF-8) and the vector in its wire form, without framing."""
        width = 4 if masked_wire_dtype(self.vector) == "uint32" else 8
        return len(self.client_id.encode("utf-8")) + self.vector.numel() * width


MASKED_WORD_BITS = 32
"""Residues below ``2**MASKED_WORD_BITS`` (every residue of a modulus up to ``2**32``) travel
as uint32 words."""


def masked_wire_dtype(vector: torch.Tensor) -> str:
    """The wire dtype of a masked vector: ``"uint32"`` when every value lies in
    ``[0, 2**32)`` (always, for ``modulus_bits <= 32``), else ``"int64"``; exact either way."""
    if vector.numel() == 0:
        return "uint32"
    low, high = int(vector.min()), int(vector.max())
    return "uint32" if low >= 0 and high >> MASKED_WORD_BITS == 0 else "int64"


@dataclass(frozen=True)
class ConsistencyRequest:
    """Consistency round, server to each survivor: the survivor set ``U3`` (Bonawitz et al. 2017,
    Fig. 4, "ConsistencyCheck"), the clients whose masked inputs are in the sum."""

    survivors: tuple[str, ...]


@dataclass(frozen=True)
class ConsistencySignature:
    """Consistency round, survivor to server: its signature over :func:`consistency_bytes` of
    the survivor set it was sent."""

    client_id: str
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Phase 4, server to survivors: who sent a masked input and who dropped after phase 2.

    With authentication the request is per survivor and ``signatures`` is its consistency
    proof: neighbour -> that neighbour's :class:`ConsistencySignature` over ``survivors``.
    """

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    signatures: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class UnmaskResponse:
    """Phase 4, client to server: ``b`` shares of surviving and ``s`` shares of dropped neighbours."""

    client_id: str
    b_shares: Mapping[str, Share]
    s_shares: Mapping[str, Share]


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum ``sum_u x_u mod 2**modulus_bits`` and the clients whose inputs it holds."""

    sum: torch.Tensor
    contributors: tuple[str, ...]


# --------------------------------------------------------------------------------- signed bytes


def signed_keys_bytes(
    config: SecAggConfig, client_id: str, c_public: bytes, s_public: bytes
) -> bytes:
    """What a client signs in phase 1: its id and two public keys, bound to the round's config.

    Binding every config field (not only round and context) means a server that sends two
    clients different thresholds or neighbour counts in one round makes their signatures fail
    at each other.
    """
    return _length_prefixed(
        _KEYS_LABEL, bind_config(config), client_id.encode(), bytes(c_public), bytes(s_public)
    )


def seed_commitment(config: SecAggConfig, client_id: str, seed: bytes) -> bytes:
    """The 32-byte hash commitment to a client's self-mask seed ``b``: SHA-256 over a fixed
    label, the round's config, the client id and the seed.

    It hides ``b`` (a uniform 32-byte secret: SHA-256 is preimage resistant) and binds it
    (collision resistance): a seed reconstructed from shifted shares does not match. The
    config and id in the hash keep one commitment from passing for another round or client.
    """
    return hashlib.sha256(
        _length_prefixed(_SEED_LABEL, bind_config(config), client_id.encode(), bytes(seed))
    ).digest()


def consistency_bytes(config: SecAggConfig, survivors: Iterable[str]) -> bytes:
    """What a survivor signs in the consistency round: the sorted survivor set, bound to the
    round's config."""
    ids = sorted(survivors)
    return _length_prefixed(
        _CONSISTENCY_LABEL, bind_config(config), len(ids).to_bytes(4, "big"),
        *(i.encode() for i in ids),
    )


def bind_config(config: SecAggConfig) -> bytes:
    """Every field of ``config``, canonically encoded."""
    return _length_prefixed(
        bytes(config.context),
        config.round.to_bytes(8, "big"),
        config.num_clients_expected.to_bytes(8, "big"),
        config.threshold.to_bytes(8, "big"),
        config.neighbours.to_bytes(8, "big"),
        config.modulus_bits.to_bytes(2, "big"),
    )


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)
