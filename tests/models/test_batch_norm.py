"""The zoo's batch-norm models: running statistics as parameters that do not train, are not
frozen, and move as PyTorch's batch norm moves its buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from consortium.aggregation.frozen import frozen_mask
from consortium.errors import ConfigError
from consortium.models import MODELS
from consortium.models.zoo import (
    BUILT_IN,
    FederatedBatchNorm1d,
    FederatedBatchNorm2d,
    build_model,
    check_local_dp,
    freeze,
    frozen_names,
    statistics_names,
)
from consortium.types import Parameters


@pytest.mark.parametrize(("name", "shape"), [("mlp_bn", (13,)), ("cnn_bn", (1, 8, 8))])
def test_models_are_listed_and_carry_their_statistics(name: str, shape: tuple[int, ...]) -> None:
    assert name in MODELS and name in BUILT_IN
    model = build_model(name, shape, 3, hidden=(8, 4))
    # check_fits' probe ran in eval mode: the built model's statistics are untouched
    for n, p in model.named_parameters():
        if n.endswith("running_mean"):
            assert not p.any()
        if n.endswith("running_var"):
            assert torch.equal(p, torch.ones_like(p))
    assert model(torch.zeros(4, *shape)).shape == (4, 3)
    assert not list(model.buffers())  # num_batches_tracked dropped, statistics are parameters
    stats = statistics_names(model)
    assert len(stats) == 4
    layout = Parameters.from_module(model).layout
    assert stats <= set(layout.names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in stats)
    assert frozen_mask(model, layout) is None  # not frozen: FedAvg averages them
    assert model.training


@pytest.mark.parametrize("cls", [FederatedBatchNorm1d, FederatedBatchNorm2d])
def test_same_as_torch_batch_norm(cls: type) -> None:
    torch.manual_seed(0)
    ours, theirs = cls(3), (nn.BatchNorm1d if cls is FederatedBatchNorm1d else nn.BatchNorm2d)(3)
    x = torch.randn(6, 3) if cls is FederatedBatchNorm1d else torch.randn(6, 3, 4, 4)
    for _ in range(3):
        assert torch.equal(ours(x), theirs(x))
        x = x * 2 + 1
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    assert torch.equal(ours(x), theirs(x))


def test_one_step_by_hand() -> None:
    bn = FederatedBatchNorm1d(1)
    x = torch.tensor([[1.0], [2.0], [6.0]])
    bn(x)  # momentum 0.1: 0.9·0 + 0.1·3 and 0.9·1 + 0.1·7 (unbiased variance)
    assert bn.running_mean.item() == pytest.approx(0.3)
    assert bn.running_var.item() == pytest.approx(1.6)


def test_a_batch_of_one_uses_the_running_statistics() -> None:
    bn = FederatedBatchNorm1d(2)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    out = bn(torch.tensor([[3.0, 0.0]]))  # torch's BatchNorm1d raises here
    assert torch.allclose(out, torch.tensor([[1.0, 1.0]]), atol=1e-5)
    assert bn.running_mean.tolist() == [1.0, -1.0]


def test_freezing_a_layer_leaves_its_statistics_out() -> None:
    model = build_model("mlp_bn", (5,), 2, hidden=(4,))
    assert frozen_names(model, ["2"]) == {"2.weight", "2.bias"}
    frozen = freeze(lambda: build_model("mlp_bn", (5,), 2, hidden=(4,)), ["1", "2"])()
    layout = Parameters.from_module(frozen).layout
    mask = frozen_mask(frozen, layout)
    assert mask is not None
    by_name = dict(zip(layout.names, torch.split(mask, [s.numel for s in layout.specs])))
    assert by_name["2.weight"].all() and not by_name["2.running_mean"].any()


def test_local_dp_is_refused() -> None:
    check_local_dp(build_model("mlp_bn", (5,), 2), local_dp=False)
    check_local_dp(build_model("mlp", (5,), 2), local_dp=True)
    with pytest.raises(ConfigError, match="batch normalisation"):
        check_local_dp(build_model("mlp_bn", (5,), 2), local_dp=True)
