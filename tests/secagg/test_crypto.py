"""Key agreement, HKDF and AES-GCM: agreement, round trip and tamper detection."""

from __future__ import annotations

import pytest

from consortium.secagg.crypto import (
    DecryptionError,
    decrypt,
    encrypt,
    generate_keypair,
    public_bytes,
    shared_key,
)

INFO = b"consortium/secagg/share-encryption/v1"


def test_both_parties_derive_the_same_key() -> None:
    a, b = generate_keypair(), generate_keypair()
    assert len(a.public) == 32 and a.public == public_bytes(a.private)
    k_ab = shared_key(a.private, b.public, info=INFO)
    assert k_ab == shared_key(b.private, a.public, info=INFO)
    assert len(k_ab) == 32
    assert shared_key(a.private, b.public, info=INFO + b"x") != k_ab
    assert shared_key(a.private, generate_keypair().public, info=INFO) != k_ab


def test_round_trip_and_fresh_nonces() -> None:
    key = shared_key(generate_keypair().private, generate_keypair().public, info=INFO)
    c1 = encrypt(key, b"share bytes", associated_data=b"1->2 round 0")
    c2 = encrypt(key, b"share bytes", associated_data=b"1->2 round 0")
    assert c1 != c2 and len(c1) == 12 + len(b"share bytes") + 16
    assert decrypt(key, c1, associated_data=b"1->2 round 0") == b"share bytes"
    assert decrypt(key, encrypt(key, b"", associated_data=b""), associated_data=b"") == b""


def test_tampering_detected_anywhere() -> None:
    key = bytes(range(32))
    ct = encrypt(key, b"secret share", associated_data=b"ad")
    for position in (0, 11, 12, len(ct) - 17, len(ct) - 1):  # nonce, body, tag
        altered = bytearray(ct)
        altered[position] ^= 0x01
        with pytest.raises(DecryptionError, match="authentication failed"):
            decrypt(key, bytes(altered), associated_data=b"ad")
    with pytest.raises(DecryptionError, match="truncated"):
        decrypt(key, ct[:20], associated_data=b"ad")


def test_wrong_associated_data_or_key_detected() -> None:
    key = bytes(range(32))
    ct = encrypt(key, b"secret share", associated_data=b"1->2 round 0")
    with pytest.raises(DecryptionError):
        decrypt(key, ct, associated_data=b"1->3 round 0")
    with pytest.raises(DecryptionError):
        decrypt(bytes(32), ct, associated_data=b"1->2 round 0")


def test_bad_keys_rejected() -> None:
    me = generate_keypair()
    with pytest.raises(ValueError, match="32-byte X25519 public key"):
        shared_key(me.private, b"\x01" * 31, info=INFO)
    with pytest.raises(ValueError, match="degenerate"):
        shared_key(me.private, bytes(32), info=INFO)  # a low-order point
    with pytest.raises(ValueError, match="16, 24 or 32 bytes"):
        encrypt(b"short", b"x", associated_data=b"")
