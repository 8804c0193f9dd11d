"""Clipping each client's update to a maximum L2 norm, on the client, and re-checking it on the server."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from consortium.aggregation.base import ClientContext, RoundContext, StageState
from consortium.errors import ConfigError
from consortium.types import Layout, Update

__all__ = ["clip_by_l2_norm", "enforce_norm"]

SLACK = 1e-5
"""Relative excess over the clip norm the server lets through unchanged: a client's float32
scaling lands a hair above ``C`` (rounding), and re-scaling honest updates would change
honest runs; the bound one site can reach is ``C·(1 + SLACK)``."""


def enforce_norm(delta: torch.Tensor, limit: float) -> tuple[torch.Tensor, float]:
    """``(delta, ‖delta‖)``, the delta scaled to norm ``limit`` when it exceeds ``limit·(1 +
    SLACK)``: the server's check of a clip its client was asked to apply. Returns the very
    same tensor when it is within (so honest runs stay bit-identical); a non-finite delta is
    returned as it is (validation rejects it; the norm is then inf or NaN).
    """
    from consortium.aggregation.bound import update_norm

    norm = update_norm(delta)
    if not norm > limit * (1 + SLACK) or not math.isfinite(norm):
        return delta, norm
    return (delta.to(torch.float64) * (limit / norm)).to(delta.dtype), norm


@dataclass(frozen=True)
class ClipByL2Norm:
    """Scale a client's delta by ``min(1, C / ‖Δ‖₂)``.

    The client half of DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially
    Private Recurrent Language Models", ICLR 2018) and a cheap bound on any one client's
    influence. Gives the capability ``"clipped"`` that noise stages need. Its ``receive`` half
    re-applies the clip on the server, where a malicious client may have skipped it.
    """

    max_norm: float
    name: str = "clip_by_l2_norm"
    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset({"clipped"})

    def init(self, layout: Layout) -> StageState:
        return {}

    def broadcast(self, state: StageState) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def client(self, update: Update, payload: Mapping[str, Any], ctx: ClientContext) -> Update:
        limit = float(payload.get("max_norm", self.max_norm))
        norm = float(torch.linalg.vector_norm(update.delta))
        scale = min(1.0, limit / norm) if norm > 0 else 1.0
        metrics = {**update.metrics, "update_norm": norm}
        return dataclasses.replace(update, delta=update.delta * scale, metrics=metrics)

    def receive(self, update: Update, state: StageState, ctx: RoundContext) -> Update:
        """Re-clip on the server (:func:`enforce_norm`): a malicious client skips its half.
        An update within the bound is passed through as the same object; an empty delta (the
        values travel inside secure aggregation) is left alone."""
        if update.delta.numel() == 0:
            return update
        delta, _ = enforce_norm(update.delta, self.max_norm)
        return update if delta is update.delta else dataclasses.replace(update, delta=delta)


def clip_by_l2_norm(max_norm: float) -> ClipByL2Norm:
    """Clip each client's update to L2 norm ``max_norm`` (on the client, before sending)."""
    if not max_norm > 0:
        raise ConfigError(f"clip_by_l2_norm: max_norm = {max_norm!r} must be > 0")
    return ClipByL2Norm(float(max_norm))
