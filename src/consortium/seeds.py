"""Seeds derived from (run seed, purpose, round, client), so every draw can be repeated exactly."""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(run_seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and a path such as ``("batches", round, client_id)``.

    A hash, not a counter: the seed of round 7 does not depend on what rounds 1–6 drew,
    which is what makes a resumed run equal to an uninterrupted one.
    """
    text = "/".join([str(int(run_seed))] + [str(p) for p in parts])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
