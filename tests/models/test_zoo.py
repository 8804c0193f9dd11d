"""The model zoo: shapes, user factories, and clear errors when a model does not fit."""

from __future__ import annotations

import pytest
import torch

from consortium.errors import ModelError
from consortium.models import build_model


@pytest.mark.parametrize(
    ("name", "shape"), [("logistic", (13,)), ("mlp", (13,)), ("logistic", (1, 8, 8)), ("cnn", (1, 8, 8))]
)
def test_builtin_models_map_to_class_logits(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 3)
    assert model(torch.zeros(4, *shape)).shape == (4, 3)


def test_cnn_on_tabular_data_is_explained() -> None:
    with pytest.raises(ModelError, match="image data"):
        build_model("cnn", (13,), 2)


def test_user_factory(tmp_path, monkeypatch) -> None:
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def make(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], num_classes))\n"
        "def wrong():\n"
        "    return torch.nn.Linear(3, 7)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model("mymodels:make", (5,), 2)(torch.zeros(1, 5)).shape == (1, 2)
    with pytest.raises(ModelError, match="does not accept"):
        build_model("mymodels:wrong", (5,), 2)
    with pytest.raises(ModelError, match="has no callable"):
        build_model("mymodels:missing", (5,), 2)
    with pytest.raises(ModelError, match="cannot import"):
        build_model("nosuchpackage.x:make", (5,), 2)


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ModelError, match="logistic, mlp, cnn"):
        build_model("resnet", (5,), 2)


def test_seeded_initialisation() -> None:
    a = build_model("mlp", (5,), 2, seed=1)
    b = build_model("mlp", (5,), 2, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
