"""The benchmark's model as numpy arrays, and the precomputed update every node sends back.

The model is consortium's ``logistic`` on 26,213 features and 10 classes: a weight
``[classes, input_dim]`` and a bias ``[classes]``, 262,140 float32 values, 1.0 MB.
"""

from __future__ import annotations

import numpy as np

_BASE: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def initial_arrays(input_dim: int, classes: int) -> dict[str, np.ndarray]:
    """The global model the ServerApp starts from (seeded, small weights)."""
    rng = np.random.default_rng(0)
    return {"weight": (rng.standard_normal((classes, input_dim)) * 1e-2).astype(np.float32),
            "bias": np.zeros(classes, dtype=np.float32)}


def reply_arrays(input_dim: int, classes: int, *, node: int, server_round: int) -> dict[str, np.ndarray]:
    """The "trained" model a node returns: one precomputed array per process, with the first
    weight and bias values set from ``(node, server_round)``.

    Flower's object store is content-addressed (an object's id is the SHA-256 of its bytes):
    identical replies from different nodes would be stored, and uploaded, once. Real training
    makes every reply differ; so does this.
    """
    key = (input_dim, classes)
    if key not in _BASE:
        rng = np.random.default_rng(1)
        _BASE[key] = ((rng.standard_normal((classes, input_dim)) * 1e-2).astype(np.float32),
                      np.zeros(classes, dtype=np.float32))
    weight, bias = (a.copy() for a in _BASE[key])
    tag = float((node % 1_000_003) * 1_000 + server_round)
    weight.flat[0] = tag
    bias[0] = tag
    return {"weight": weight, "bias": bias}
