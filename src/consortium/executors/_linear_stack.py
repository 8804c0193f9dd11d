"""A hand-batched forward and backward pass for stacks of Linear and ReLU layers.

The logistic and mlp models are ``Sequential(Flatten, Linear, ReLU, …, Linear)``. For them the
vectorised executor skips ``vmap``, ``functional_call`` and the autograd engine, whose fixed
cost per step dominates when each client's batch is ten examples: ``baddbmm`` computes every
client's layer at once and the gradient of the mean cross-entropy is written out by hand.
Tests check it against the autograd path and the sequential executor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from consortium.types import Layout

__all__ = ["LinearStack"]


@dataclass(frozen=True)
class _Layer:
    w: slice
    b: slice | None
    out_features: int
    in_features: int
    relu: bool


class LinearStack:
    """Batched loss and gradient for ``Sequential([Flatten], Linear, [ReLU], …)`` models."""

    def __init__(self, layers: list[_Layer], size: int) -> None:
        self.layers = layers
        self.size = size

    @classmethod
    def match(cls, module: nn.Module, layout: Layout) -> LinearStack | None:
        """The fast path for ``module``, or ``None`` if it is not such a stack."""
        if not isinstance(module, nn.Sequential):
            return None
        spans: dict[str, slice] = {}
        offset = 0
        for spec in layout.specs:
            spans[spec.name] = slice(offset, offset + spec.numel)
            offset += spec.numel
        children = list(module.named_children())
        if children and isinstance(children[0][1], nn.Flatten):
            flat = children[0][1]
            if flat.start_dim != 1 or flat.end_dim != -1:
                return None
            children = children[1:]
        layers: list[_Layer] = []
        for name, child in children:
            if isinstance(child, nn.Linear):
                if f"{name}.weight" not in spans:
                    return None
                layers.append(
                    _Layer(
                        w=spans[f"{name}.weight"],
                        b=spans.get(f"{name}.bias") if child.bias is not None else None,
                        out_features=child.out_features,
                        in_features=child.in_features,
                        relu=False,
                    )
                )
            elif isinstance(child, nn.ReLU) and layers and not layers[-1].relu:
                last = layers[-1]
                layers[-1] = _Layer(last.w, last.b, last.out_features, last.in_features, True)
            else:
                return None
        if not layers or layers[-1].relu:
            return None
        used = sum(layer.w.stop - layer.w.start for layer in layers) + sum(
            layer.b.stop - layer.b.start for layer in layers if layer.b is not None
        )
        if used != layout.size:  # parameters outside the stack: not ours to handle
            return None
        return cls(layers, layout.size)

    def loss_and_grad(
        self,
        params: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        valid: torch.Tensor,
        counts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-client mean cross-entropy ``[m]`` and its gradient ``[m, d]``.

        Args:
            params: ``[m, d]`` stacked flat parameters.
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
            w = params[:, layer.w].view(m, layer.out_features, layer.in_features)
            inputs.append(h)
            if layer.b is not None:
                z = torch.baddbmm(params[:, layer.b].unsqueeze(1), h, w.transpose(1, 2))
            else:
                z = torch.bmm(h, w.transpose(1, 2))
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
        grad = torch.empty((m, self.size), dtype=params.dtype)
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if layer.relu:
                g = g * (pre[i] > 0)
            grad[:, layer.w] = torch.bmm(g.transpose(1, 2), inputs[i]).reshape(m, -1)
            if layer.b is not None:
                grad[:, layer.b] = g.sum(1)
            if i > 0:
                w = params[:, layer.w].view(m, layer.out_features, layer.in_features)
                g = torch.bmm(g, w)
        return loss, grad
