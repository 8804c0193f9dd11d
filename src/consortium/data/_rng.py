"""Per-purpose random generators derived from one run seed with numpy's SeedSequence."""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["generator"]


def generator(seed: int, *purpose: str | int) -> np.random.Generator:
    """A generator for one purpose (``"split"``, a client id ...) under the run ``seed``.

    Each purpose gets an independent stream, so drawing more for one purpose (more clients,
    a larger test set) never shifts the draws of another. Strings are hashed with CRC-32,
    which, unlike ``hash()``, is the same in every process.
    """
    key: list[int] = []
    for p in purpose:
        # The tag keeps the string "7" and the integer 7 (or a string's hash) apart.
        key += [1, zlib.crc32(p.encode("utf-8"))] if isinstance(p, str) else [0, int(p) % 2**32]
    # SeedSequence needs non-negative entropy; negative run seeds map to distinct large ones.
    return np.random.default_rng(np.random.SeedSequence(int(seed) % 2**64, spawn_key=tuple(key)))
