"""Parameters, updates and the layout that maps named tensors to one flat vector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch

__all__ = ["Layout", "Parameters", "TensorSpec", "Update"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor in a flat vector."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """The order, shapes and dtypes of a model's tensors inside a flat vector.

    Aggregation works on flat float vectors (stacked to ``[n_clients, d]`` when a rule needs
    every update); the layout turns them back into named tensors.
    """

    specs: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Layout:
        return cls(tuple(TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()))

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return sum(s.numel for s in self.specs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``tensors`` (in layout order) into one float32 vector."""
        missing = [s.name for s in self.specs if s.name not in tensors]
        if missing:
            raise KeyError(f"tensors missing from the layout: {missing}")
        parts = [tensors[s.name].detach().reshape(-1).to(torch.float32) for s in self.specs]
        return torch.cat(parts) if parts else torch.zeros(0)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into named tensors of the layout's shapes and dtypes."""
        if vector.ndim != 1 or vector.numel() != self.size:
            raise ValueError(f"expected a flat vector of {self.size} values, got {tuple(vector.shape)}")
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for s in self.specs:
            out[s.name] = vector[offset : offset + s.numel].reshape(s.shape).to(s.dtype)
            offset += s.numel
        return out

    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)} for s in self.specs]


@dataclass(frozen=True)
class Parameters:
    """A model's parameters as one flat float32 vector plus its layout: the trainable tensors,
    the frozen ones, and batch-norm running statistics held as parameters
    (:class:`~consortium.models.zoo.FederatedBatchNorm1d`)."""

    layout: Layout
    vector: torch.Tensor

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> Parameters:
        named = {n: p for n, p in module.named_parameters()}
        layout = Layout.of(named)
        return cls(layout, layout.flatten(named).clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(self.vector)

    def load_into(self, module: torch.nn.Module) -> None:
        """Copy these values into ``module``'s parameters (in place, no autograd history)."""
        named = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in self.tensors().items():
                named[name].copy_(value)

    def replace(self, vector: torch.Tensor) -> Parameters:
        return Parameters(self.layout, vector)


@dataclass
class Update:
    """What one client sends back after local training.

    Attributes:
        client_id: the sender.
        delta: flat vector ``local − global`` (after the client half of the pipeline).
        weight: aggregation weight, normally the number of training samples.
        metrics: training metrics (``train_loss``, ``steps`` ...).
        extras: algorithm-specific tensors that are *summed* across clients (for example
            SCAFFOLD's control-variate delta); the algorithm scales them on the client so that
            a plain sum is what the server needs, which keeps them secure-aggregation friendly.
        encoded: the compressed form of the delta, when the pipeline compresses (see below).
    """

    client_id: str
    delta: torch.Tensor
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    encoded: Any = None
    """What travels instead of ``delta`` under uplink compression: a
    :class:`consortium.compression.Encoded` (``delta`` is then empty until the server's
    compression stage decodes it); ``None`` otherwise."""
