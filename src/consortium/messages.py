"""Typed messages between server and clients: Task, Result, EvaluationResult."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from consortium.types import Parameters, Update

__all__ = ["EvaluationResult", "Result", "Task"]


@dataclass(frozen=True)
class Task:
    """What the server asks one client to do this round.

    Attributes:
        round: 1-based round number.
        client_id: the addressee.
        parameters: the global model.
        seed: the client's seed for this round (batch order, noise).
        payload: algorithm tensors the client needs (SCAFFOLD's server control variate).
        stage_payloads: per pipeline stage, what its client half needs (a clip norm ...).
        work: fraction of the planned local steps to do (systems heterogeneity; 1 = all).
        cohort_size: how many clients were asked to take part this round (a site's policy
            may refuse to join too small an aggregate).
        model_nbytes: under downlink compression, the bytes the model took to reach this
            client (:mod:`consortium.compression.downlink`); ``None``: the dense parameters.
        downlink: deployed per-client downlink compression: the
            :class:`~consortium.compression.downlink.ModelDelta` the wire carries instead of
            ``parameters`` (which the site rebuilds from its own reference); ``None``: the
            parameters travel whole.
    """

    round: int
    client_id: str
    parameters: Parameters
    seed: int
    payload: dict[str, torch.Tensor] = field(default_factory=dict)
    stage_payloads: tuple[dict[str, Any], ...] = ()
    work: float = 1.0
    cohort_size: int = 0
    model_nbytes: int | None = None
    downlink: Any = None

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this task carries (model plus payload): the model dense, or
        its compressed messages' exact bytes under downlink compression."""
        n = self.parameters.vector.numel() * self.parameters.vector.element_size()
        if self.model_nbytes is not None:
            n = self.model_nbytes
        return n + sum(t.numel() * t.element_size() for t in self.payload.values())


@dataclass(frozen=True)
class Result:
    """A client's answer to a :class:`Task`: an update, or why there is none."""

    round: int
    client_id: str
    update: Update | None
    error: str | None = None
    refused: bool = False
    """The site declined the task under its own policy (not a failure)."""

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the update carries: the delta, or its encoding under
        compression (:attr:`consortium.compression.Encoded.nbytes`), plus the extras."""
        if self.update is None:
            return 0
        u = self.update
        n = u.delta.numel() * u.delta.element_size()
        if u.encoded is not None:  # a compressed update: its exact encoded bytes
            n += int(u.encoded.nbytes)
        return n + sum(t.numel() * t.element_size() for t in u.extras.values())


@dataclass(frozen=True)
class EvaluationResult:
    """A client's evaluation of the global model on its own test split."""

    round: int
    client_id: str
    num_examples: int
    metrics: dict[str, float]
