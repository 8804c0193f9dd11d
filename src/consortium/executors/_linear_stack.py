"""A hand-batched forward and backward pass for stacks of Linear and ReLU layers.

The logistic and mlp models are ``Sequential(Flatten, Linear, ReLU, …, Linear)``. For them the
vectorised executor skips ``vmap``, ``functional_call`` and the autograd engine, whose fixed
cost per step dominates when each client's batch is ten examples: ``baddbmm`` computes every
client's layer at once and the gradient of the mean cross-entropy is written out by hand.
Tests check it against the autograd path and the sequential executor.

Frozen parameters (``requires_grad = False``) are constants shared by every client, not columns
of the stacked parameters: the stack works on the trainable part only, and the backward pass
stops at the lowest layer that trains, so fine-tuning a head on a frozen body costs the head's
backward only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from consortium.types import Layout

__all__ = ["LinearStack"]

Part = slice | torch.Tensor
"""A trainable tensor's columns in the stacked vector, or a frozen tensor's (shared) value."""


@dataclass(frozen=True)
class _Layer:
    w: Part
    b: Part | None
    out_features: int
    in_features: int
    relu: bool

    @property
    def trains(self) -> bool:
        return isinstance(self.w, slice) or isinstance(self.b, slice)


class LinearStack:
    """Batched loss and gradient for ``Sequential([Flatten], Linear, [ReLU], …)`` models."""

    def __init__(self, layers: list[_Layer], size: int) -> None:
        self.layers = layers
        self.size = size
        """Length of the stacked vector: the trainable parameters only."""
        self.lowest = next(i for i, layer in enumerate(layers) if layer.trains)
        """The backward pass stops here: no layer below has a parameter that trains."""

    @classmethod
    def match(
        cls, module: nn.Module, layout: Layout, *, frozen_from: torch.Tensor | None = None
    ) -> LinearStack | None:
        """The fast path for ``module``, or ``None`` if it is not such a stack.

        ``frozen_from``: a whole flat vector holding the values of ``module``'s frozen
        parameters; the stacked vector then holds only the trainable ones, in layout order
        (:func:`~consortium.executors.vectorized.trainable_columns`). Without it every
        parameter is a column of the stacked vector.
        """
        if not isinstance(module, nn.Sequential):
            return None
        parts = _parts(module, layout, frozen_from)
        children = list(module.named_children())
        if children and isinstance(children[0][1], nn.Flatten):
            flat = children[0][1]
            if flat.start_dim != 1 or flat.end_dim != -1:
                return None
            children = children[1:]
        layers: list[_Layer] = []
        used = 0
        for name, child in children:
            if isinstance(child, nn.Linear):
                if f"{name}.weight" not in parts:
                    return None
                bias = parts.get(f"{name}.bias") if child.bias is not None else None
                layers.append(_Layer(parts[f"{name}.weight"], bias, child.out_features,
                                     child.in_features, relu=False))
                used += child.weight.numel() + (child.bias.numel() if child.bias is not None else 0)
            elif isinstance(child, nn.ReLU) and layers and not layers[-1].relu:
                layers[-1] = dataclasses.replace(layers[-1], relu=True)
            else:
                return None
        if not layers or layers[-1].relu or not any(layer.trains for layer in layers):
            return None
        if used != layout.size:  # parameters outside the stack: not ours to handle
            return None
        size = sum(p.stop - p.start for p in parts.values() if isinstance(p, slice))
        return cls(layers, size)

    def loss_and_grad(
        self,
        params: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        valid: torch.Tensor,
        counts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-client mean cross-entropy ``[m]`` and its gradient ``[m, size]``.

        Args:
            params: ``[m, size]`` stacked flat (trainable) parameters.
            x: ``[m, B, …]`` each client's batch (padding rows are ignored through ``valid``).
            y: ``[m, B]`` labels.
            valid: ``[m, B]`` which rows are real examples.
            counts: ``[m]`` real examples per client.
        """
        m = params.shape[0]
        h = x.reshape(m, x.shape[1], -1)
        inputs: list[torch.Tensor] = []
        pre: list[torch.Tensor] = []
        for layer in self.layers:
            inputs.append(h)
            w = self._weight(layer, params)
            if w.ndim == 3 and isinstance(layer.b, slice):  # every client's own layer
                z = torch.baddbmm(self._bias(layer, params), h, w.transpose(1, 2))
            else:  # a frozen weight or bias, shared by all clients, broadcasts
                z = h @ w.transpose(-1, -2)
                if layer.b is not None:
                    z = z + self._bias(layer, params)
            pre.append(z)
            h = torch.relu(z) if layer.relu else z
        logp = torch.log_softmax(h, dim=-1)
        scale = valid.to(logp.dtype) / counts.to(logp.dtype).unsqueeze(1)  # [m, B]
        nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        loss = (nll * valid).sum(1) / counts
        # d(mean CE)/d logits = (softmax − onehot) / count, zero on padding rows
        g = logp.exp()
        g.scatter_add_(-1, y.unsqueeze(-1), -torch.ones_like(nll).unsqueeze(-1))
        g.mul_(scale.unsqueeze(-1))
        grad = torch.empty((m, self.size), dtype=params.dtype, device=params.device)
        for i in reversed(range(self.lowest, len(self.layers))):
            layer = self.layers[i]
            if layer.relu:
                g = g * (pre[i] > 0)
            if isinstance(layer.w, slice):
                grad[:, layer.w] = torch.bmm(g.transpose(1, 2), inputs[i]).reshape(m, -1)
            if isinstance(layer.b, slice):
                grad[:, layer.b] = g.sum(1)
            if i > self.lowest:
                w = self._weight(layer, params)
                g = torch.bmm(g, w) if w.ndim == 3 else g @ w
        return loss, grad

    def _weight(self, layer: _Layer, params: torch.Tensor) -> torch.Tensor:
        """``[m, out, in]`` per-client weights, or the frozen ``[out, in]`` shared by all."""
        if isinstance(layer.w, slice):
            return params[:, layer.w].view(params.shape[0], layer.out_features, layer.in_features)
        return layer.w

    def _bias(self, layer: _Layer, params: torch.Tensor) -> torch.Tensor:
        """``[m, 1, out]`` per-client biases, or the frozen ``[out]`` shared by all."""
        assert layer.b is not None
        if isinstance(layer.b, slice):
            return params[:, layer.b].unsqueeze(1)
        return layer.b


def _parts(module: nn.Module, layout: Layout, frozen_from: torch.Tensor | None) -> dict[str, Part]:
    """Each parameter's columns in the stacked vector, or (frozen, with ``frozen_from``) its
    value."""
    trains = {name: p.requires_grad for name, p in module.named_parameters()}
    parts: dict[str, Part] = {}
    offset = whole = 0
    for spec in layout.specs:
        if frozen_from is not None and not trains.get(spec.name, True):
            parts[spec.name] = frozen_from[whole : whole + spec.numel].view(spec.shape)
        else:
            parts[spec.name] = slice(offset, offset + spec.numel)
            offset += spec.numel
        whole += spec.numel
    return parts
