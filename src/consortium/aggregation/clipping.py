"""Clipping each client's update to a maximum L2 norm, on the client."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from consortium.aggregation.base import ClientContext, StageState
from consortium.errors import ConfigError
from consortium.types import Layout, Update

__all__ = ["clip_by_l2_norm"]


@dataclass(frozen=True)
class ClipByL2Norm:
    """Scale a client's delta by ``min(1, C / ‖Δ‖₂)``.

    The client half of DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially
    Private Recurrent Language Models", ICLR 2018) and a cheap bound on any one client's
    influence. Gives the capability ``"clipped"`` that noise stages need.
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


def clip_by_l2_norm(max_norm: float) -> ClipByL2Norm:
    """Clip each client's update to L2 norm ``max_norm`` (on the client, before sending)."""
    if not max_norm > 0:
        raise ConfigError(f"clip_by_l2_norm: max_norm = {max_norm!r} must be > 0")
    return ClipByL2Norm(float(max_norm))
