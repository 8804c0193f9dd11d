"""X25519 key agreement, HKDF-SHA256 key derivation and AES-GCM encryption for secure aggregation.

Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning"; Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", SecAgg+) needs two things from public-key cryptography: a key shared by each pair of
clients (for pairwise masks and for encrypting the Shamir shares one client sends another through
the server), and an authenticated cipher so that the server cannot read or alter those shares.

Every primitive here comes from the ``cryptography`` package; this module only fixes the choices
(X25519, HKDF-SHA256, AES-256-GCM with a random 96-bit nonce) and maps its errors to ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from consortium.errors import DecryptionError, MissingExtraError

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("Secure aggregation", "secagg", "cryptography") from exc

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "PUBLIC_KEY_BYTES",
    "DecryptionError",
    "KeyPair",
    "decrypt",
    "encrypt",
    "generate_keypair",
    "public_bytes",
    "shared_key",
]

KEY_BYTES = 32
NONCE_BYTES = 12
PUBLIC_KEY_BYTES = 32
_TAG_BYTES = 16


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair: the private key object and the raw 32-byte public key to publish."""

    private: X25519PrivateKey
    public: bytes


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from the operating system's CSPRNG (Bonawitz et al. 2017, round 0)."""
    private = X25519PrivateKey.generate()
    return KeyPair(private=private, public=public_bytes(private))


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte X25519 public key belonging to ``private``."""
    return private.public_key().public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def shared_key(
    my_private: X25519PrivateKey,
    their_public_bytes: bytes,
    *,
    info: bytes,
    length: int = KEY_BYTES,
) -> bytes:
    """A key both parties derive alike: HKDF-SHA256 over the X25519 agreement, bound to ``info``.

    Both sides pass the same ``info`` (say ``b"consortium/secagg/share-encryption/v1"`` plus the
    round), so keys for different purposes or rounds are independent even though the agreement is
    the same (Bell et al. 2020, section 3).

    Raises:
        ValueError: ``their_public_bytes`` is not a 32-byte X25519 public key, ``info`` is not
            bytes, or the agreement is degenerate (a low-order public key, which an honest peer
            never sends).
    """
    if (
        not isinstance(their_public_bytes, (bytes, bytearray))
        or len(their_public_bytes) != PUBLIC_KEY_BYTES
    ):
        found = (
            f"{len(their_public_bytes)} bytes"
            if isinstance(their_public_bytes, (bytes, bytearray))
            else type(their_public_bytes).__name__
        )
        raise ValueError(
            f"expected a raw {PUBLIC_KEY_BYTES}-byte X25519 public key, found {found}; "
            "pass KeyPair.public or public_bytes(private_key)"
        )
    if not isinstance(info, (bytes, bytearray)):
        raise ValueError(
            f"expected info as bytes, found {type(info).__name__}; encode it, e.g. b'...'"
        )
    if not 1 <= length <= 255 * 32:
        raise ValueError(
            f"expected 1 <= length <= {255 * 32} (the HKDF-SHA256 limit), found {length}"
        )
    try:
        agreement = my_private.exchange(
            X25519PublicKey.from_public_bytes(bytes(their_public_bytes))
        )
    except ValueError as exc:
        raise ValueError(
            "the X25519 agreement with this public key is degenerate (low-order point); "
            "reject this peer's key"
        ) from exc
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=bytes(info)).derive(
        agreement
    )


def encrypt(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """AES-GCM encryption; returns ``nonce || ciphertext || tag`` with a fresh random 12-byte nonce.

    ``associated_data`` is authenticated but not encrypted; bind it to the context the receiver
    checks (sender, recipient, round), as Bonawitz et al. 2017 require for the encrypted shares,
    so a share cannot be replayed to another recipient or round.

    Raises:
        ValueError: ``key`` is not 16, 24 or 32 bytes.
    """
    _check_key(key)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(bytes(key)).encrypt(nonce, bytes(plaintext), bytes(associated_data))


def decrypt(key: bytes, ciphertext: bytes, *, associated_data: bytes) -> bytes:
    """The plaintext of :func:`encrypt`'s output, after checking its authentication tag.

    Raises:
        ValueError: ``key`` is not 16, 24 or 32 bytes.
        DecryptionError: the ciphertext was altered or truncated, or ``key`` or
            ``associated_data`` differ from the ones used to encrypt.
    """
    _check_key(key)
    if len(ciphertext) < NONCE_BYTES + _TAG_BYTES:
        raise DecryptionError(
            f"expected at least {NONCE_BYTES + _TAG_BYTES} bytes (nonce and tag), found "
            f"{len(ciphertext)}; the ciphertext was truncated in transit or is not from encrypt()"
        )
    nonce, body = bytes(ciphertext[:NONCE_BYTES]), bytes(ciphertext[NONCE_BYTES:])
    try:
        return AESGCM(bytes(key)).decrypt(nonce, body, bytes(associated_data))
    except InvalidTag as exc:
        raise DecryptionError(
            "AES-GCM authentication failed: the ciphertext was altered, or the key or associated "
            "data differ from the sender's; drop this message and treat the sender as dropped out"
        ) from exc


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) not in (16, 24, 32):
        found = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(
            f"expected an AES key of 16, 24 or 32 bytes, found {found}; derive one with shared_key()"
        )
