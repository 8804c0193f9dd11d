"""The hand-batched Linear/ReLU path equals autograd through vmap."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from consortium.executors._linear_stack import LinearStack
from consortium.executors.vectorized import _autograd_loss_and_grad, _forward_fn
from consortium.models import cnn, logistic, mlp
from consortium.types import Parameters


@pytest.mark.parametrize("model", [logistic((7,), 3), mlp((7,), 3, hidden=(5, 4)), mlp((2, 2, 2), 4, hidden=(6,))])
def test_matches_autograd(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    params = Parameters.from_module(model)
    in_shape = (2, 2, 2) if isinstance(model[0], torch.nn.Flatten) and model[1].in_features == 8 else (7,)
    m, b = 3, 5
    stacked = params.vector + 0.1 * torch.randn(m, params.layout.size, generator=g)
    x = torch.randn(m, b, *in_shape, generator=g)
    y = torch.randint(0, model[-1].out_features, (m, b), generator=g)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    counts = valid.sum(1)
    stack = LinearStack.match(model, params.layout)
    assert stack is not None
    loss_a, grad_a = stack.loss_and_grad(stacked, x, y, valid, counts)
    forward = vmap(_forward_fn(model, params.layout))
    loss_b, grad_b = _autograd_loss_and_grad(forward, stacked, x, y, valid, counts)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert torch.allclose(grad_a, grad_b, atol=1e-6)


def test_other_models_take_the_general_path() -> None:
    model = cnn((1, 8, 8), 3)
    assert LinearStack.match(model, Parameters.from_module(model).layout) is None
    odd = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    assert LinearStack.match(odd, Parameters.from_module(odd).layout) is None
