"""Random-k under secure aggregation: one coordinate set per round, shared by every client.

Secure aggregation (SecAgg+, Bell et al. 2020) sums vectors coordinate by coordinate, so a
compressor composes with it only when it is linear and every client keeps the *same*
coordinates: then the sum of the clients' kept coordinates is the kept coordinates of the sum,
and the server scatters the ``k`` summed values back into ``d``. Random-k (Stich, Cordonnier &
Jaggi, "Sparsified SGD with memory", NeurIPS 2018) with a round-shared index set is such a
compressor (on sparsified secure aggregation see also Ergün, Sami & Güler, "Sparsified secure
aggregation for privacy-preserving federated learning", arXiv 2112.12872). Top-k keeps each
client's own largest coordinates (client-specific supports: the masked vectors would not line
up), and sign, QSGD and int/fp16 codes are decoded non-linearly per client (per-bucket scales,
a majority vote), so none of those can travel through a masked sum.

The set is derived from public values only: the SecAgg context (which names the run,
:func:`~consortium.secagg.stage.secagg_context`), the round, ``d`` and ``k``. It is not
privacy-relevant (which coordinates are sent reveals nothing about their values), every
client and the server compute it themselves, and the server cannot hand different sites
different sets: the context and round are those of the round's signed SecAgg config, which
each site checks against its own run and task. A simulation's context is the constant
``b"consortium"``, so its sets follow the round alone, the same for every run seed.

The indices come from ChaCha20 (the masks' generator, :func:`~consortium.secagg.masks.expand_mask`,
portable across machines and library versions): one 62-bit key per coordinate, the ``k``
smallest kept (ties by index).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["SECURE_METHODS", "check_secure", "refusal", "round_coordinates"]

SECURE_METHODS = ("randk",)
"""The ``[compression] uplink`` methods that compose with secure aggregation."""

_LABEL = b"consortium/secagg/randk-coordinates/v1"


def round_coordinates(size: int, k: int, *, context: bytes, round: int) -> torch.Tensor:
    """The sorted ``k`` of ``size`` coordinates every client of round ``round`` sends (int64).

    Args:
        size: ``d``, the delta's length.
        k: coordinates kept, ``1 <= k <= size``.
        context: the round's SecAgg context (the run's, see the module docstring).
        round: the training round.

    Raises:
        ValueError: ``k`` outside ``[1, size]`` or a negative round.
    """
    from consortium.secagg.masks import expand_mask

    if not 1 <= k <= size:
        raise ValueError(f"expected 1 <= k <= size, found k = {k}, size = {size}")
    if round < 0:
        raise ValueError(f"expected a round >= 0, found {round}")
    if k == size:
        return torch.arange(size, dtype=torch.int64)
    seed = hashlib.sha256(
        b"".join(len(p).to_bytes(4, "big") + p for p in (
            _LABEL, bytes(context), round.to_bytes(8, "big"), size.to_bytes(8, "big"),
            k.to_bytes(8, "big"),
        ))
    ).digest()
    keys = expand_mask(seed, size, modulus_bits=62)
    order = torch.argsort(keys, stable=True)
    return order[:k].sort().values


def refusal(method: str) -> str:
    """Why ``[compression] uplink = method`` cannot run under secure aggregation, and the fix."""
    return (
        f"compression.uplink = {method!r} cannot combine with secure aggregation: SecAgg sums "
        "masked vectors coordinate by coordinate, so only a linear compressor whose clients "
        "all keep the same coordinates passes through it. \"randk\" does (one coordinate set "
        "per round, derived from the round and shared by every client); top-k keeps each "
        "client's own coordinates (the masked vectors would not line up) and "
        "sign/qsgd/int8/int4/int2/fp16/bf16/powersgd are decoded per client (scales, votes, "
        "factors), which a masked sum cannot do. Use compression.uplink = \"randk\", or \"none\" "
        "and a lower secure_aggregation.bits, or disable secure aggregation"
    )


def check_secure(cfg: Any) -> None:
    """Refuse an ``[compression] uplink`` that cannot run under secure aggregation (or
    distributed DP, which runs inside it); random-k under plain SecAgg (or with local DP)
    passes, and secure aggregation's own stage then sends the round's ``k`` coordinates.

    Raises:
        ConfigError: another method (:func:`refusal`), or random-k with central or
            distributed DP (the reason in the message).
    """
    from consortium.errors import ConfigError

    method = cfg.compression.uplink
    if method not in SECURE_METHODS:
        raise ConfigError(refusal(method))
    if not 0 < cfg.compression.fraction <= 1:
        raise ConfigError(
            f"compression.fraction = {cfg.compression.fraction} must be in (0, 1]: the share of "
            "the delta's coordinates random-k sends each round"
        )
    mode = cfg.privacy.mode
    if mode == "distributed":
        raise ConfigError(
            "compression.uplink = \"randk\" cannot combine with distributed DP yet: each "
            "site's discrete Gaussian noise, its sensitivity and the modulus' wrap margin are "
            "calibrated on all d coordinates of the integer sum (the noise on k coordinates and "
            "its accounting are not implemented). Use compression.uplink = \"none\" with "
            "distributed DP, or plain secure aggregation with randk"
        )
    if mode == "central":
        raise ConfigError(
            "compression.uplink = \"randk\" cannot combine with secure aggregation and central "
            "DP: the server cannot re-clip a summed update, and random-k changes what one "
            "client moves the sum by after its clip (the d/k rescaling, or an error-feedback "
            "residual added after clipping), so noise calibrated to the clip C would no longer "
            "cover it. Use privacy.mode = \"local\" (noise added in training; sparsifying "
            "afterwards is post-processing) or drop random-k"
        )
