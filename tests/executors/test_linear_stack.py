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


@pytest.mark.parametrize("frozen", [("1",), ("1", "3"), ("3.bias",), ("5.weight",)])
def test_frozen_parameters_are_constants_and_get_no_gradient(frozen: tuple[str, ...]) -> None:
    """With frozen parameters the stack works on the trainable columns only; its gradient
    equals autograd's with the frozen values as constants, and the trainable columns of the
    whole model's gradient (frozen ones must not enter)."""
    from consortium.executors.vectorized import trainable_columns
    from consortium.models.zoo import freeze

    model = freeze(lambda: mlp((7,), 3, hidden=(5, 4)), frozen)()
    g = torch.Generator().manual_seed(1)
    params = Parameters.from_module(model)
    columns = trainable_columns(model, params.layout)
    assert columns is not None and 0 < len(columns) < params.layout.size
    m, b = 3, 5
    whole = params.vector + 0.1 * torch.randn(m, params.layout.size, generator=g)
    whole[:, :] = torch.where(  # every client shares the global model's frozen values
        torch.isin(torch.arange(params.layout.size), columns), whole, params.vector
    )
    x = torch.randn(m, b, 7, generator=g)
    y = torch.randint(0, 3, (m, b), generator=g)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    counts = valid.sum(1)
    stack = LinearStack.match(model, params.layout, frozen_from=params.vector)
    assert stack is not None and stack.size == len(columns)
    loss_a, grad_a = stack.loss_and_grad(whole[:, columns], x, y, valid, counts)
    forward = vmap(_forward_fn(model, params.layout, params.vector))
    loss_b, grad_b = _autograd_loss_and_grad(forward, whole[:, columns], x, y, valid, counts)
    full = vmap(_forward_fn(model, params.layout))
    loss_c, grad_c = _autograd_loss_and_grad(full, whole, x, y, valid, counts)
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and torch.allclose(loss_a, loss_c, atol=1e-6)
    assert torch.allclose(grad_a, grad_b, atol=1e-6)
    assert torch.allclose(grad_a, grad_c[:, columns], atol=1e-6)
