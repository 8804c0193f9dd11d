"""``model.freeze``: which parameters a name selects, and clear errors for names that miss."""

from __future__ import annotations

import pytest
import torch

import consortium
from consortium.errors import ModelError
from consortium.models.zoo import freeze, frozen_names, mlp
from tests.conftest import make_toy


def make() -> torch.nn.Module:
    return mlp((5,), 2, hidden=(4, 3))  # parameters 1.*, 3.*, 5.* (0, 2, 4 hold none)


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["1"], {"1.weight", "1.bias"}),
        (["1.weight"], {"1.weight"}),
        (["1", "3.bias"], {"1.weight", "1.bias", "3.bias"}),
    ],
)
def test_names_select_parameters_or_whole_submodules(patterns, expected) -> None:
    module = freeze(make, patterns)()
    assert frozen_names(module, patterns) == expected
    assert {n for n, p in module.named_parameters() if not p.requires_grad} == expected


def test_a_prefix_of_a_name_is_not_a_submodule() -> None:
    """A pattern matches whole dotted names: "1.w" selects neither "1.weight" nor "1.bias"."""
    with pytest.raises(ModelError, match=r"\['1\.w'\].*1\.weight, 1\.bias, 3\.weight"):
        freeze(make, ["1.w"])()


def test_freezing_everything_is_refused() -> None:
    with pytest.raises(ModelError, match="freezes every parameter"):
        freeze(make, ["1", "3", "5"])()


def test_no_names_returns_the_factory_itself() -> None:
    assert freeze(make, ()) is make


def test_a_typo_in_the_config_fails_before_the_first_round() -> None:
    cfg = {"rounds": 1, "model": {"name": "mlp", "hidden": [4], "freeze": ["0.weight"]}}
    with pytest.raises(ModelError, match=r"model\.freeze names \['0\.weight'\]"):
        consortium.simulate(cfg, dataset=make_toy(2))


def test_a_deployed_site_builds_the_same_frozen_model() -> None:
    """``consortium client`` builds its model from the experiment's config as ``simulate``
    does: the site must freeze the same parameters, or it would train the body the server
    keeps fixed."""
    from consortium.config import load_config
    from consortium.deploy.client import _Site

    cfg = load_config(None, overrides=['model.name="mlp"', 'model.freeze=["1"]'])
    site = _Site.build(cfg, "c0", make_toy(1))
    trains = {n: p.requires_grad for n, p in site.client.model_factory().named_parameters()}
    assert trains == {"1.weight": False, "1.bias": False, "3.weight": True, "3.bias": True}
