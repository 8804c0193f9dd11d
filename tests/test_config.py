"""Configuration: TOML in and out, --set overrides, validation messages."""

from __future__ import annotations

import pytest

from consortium.config import ExperimentConfig, apply_overrides, load_config, parse_override
from consortium.errors import ConfigError


def test_default_config_is_the_heart_disease_demo() -> None:
    cfg = load_config()
    assert cfg.name == "heart-disease"
    assert cfg.data.dataset == "heart-disease" and cfg.data.partition == "natural"
    assert cfg.evaluation.baselines == ("local", "pooled")


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("rounds=5", ["rounds"], 5),
        ("algorithm.lr=0.1", ["algorithm", "lr"], 0.1),
        ("model.name=mlp", ["model", "name"], "mlp"),
        ('model.name="cnn"', ["model", "name"], "cnn"),
        ("evaluation.baselines=[]", ["evaluation", "baselines"], []),
        ("executor.kind=auto", ["executor", "kind"], "auto"),
        ("x.flag=true", ["x", "flag"], True),
        ("model.name=pkg.mod:make", ["model", "name"], "pkg.mod:make"),
    ],
)
def test_parse_override_reads_toml_values(text: str, path: list[str], value: object) -> None:
    assert parse_override(text) == (path, value)


def test_override_without_equals_is_explained() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("rounds")


def test_overrides_apply_and_validate() -> None:
    cfg = load_config(None, ["rounds=3", "model.name=mlp", "model.hidden=[8, 4]"])
    assert cfg.rounds == 3 and cfg.model.name == "mlp" and cfg.model.hidden == (8, 4)


def test_overrides_do_not_touch_the_input() -> None:
    data = {"data": {"clients": 3}}
    apply_overrides(data, ["data.clients=5"])
    assert data == {"data": {"clients": 3}}


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("rounds=0", "rounds = 0"),
        ("rounds=2.5", "expected an integer"),
        ("algorithm.name=fedsgd", "algorithm.name = 'fedsgd' is not allowed: expected one of"),
        ("data.dataset=mnist", "data.dataset"),
        ("algorithm.lrr=0.1", "unknown key 'algorithm.lrr'"),
        ("algorithm.lr=-1", "algorithm.lr"),
        ("sampling.fraction=1.5", "sampling.fraction"),
        ("data.alpha=0", "data.alpha"),
        ("simulation.stragglers=2", "simulation.stragglers"),
        ("colour=1", "unknown key 'colour'"),
        ("rounds.x=1", "is a value, not a section"),
    ],
)
def test_bad_values_name_key_and_allowed(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_both_sampling_modes_is_an_error() -> None:
    with pytest.raises(ConfigError, match="only one"):
        load_config(None, ["sampling.fraction=0.5", "sampling.clients_per_round=2"])


def test_a_sampling_mode_on_the_command_line_replaces_the_files() -> None:
    cfg = load_config(None, ["sampling.fraction=0.5"])  # the default sets clients_per_round = 4
    assert cfg.sampling.fraction == 0.5 and cfg.sampling.clients_per_round == 0
    assert load_config(None, ["sampling.clients_per_round=2"]).sampling.clients_per_round == 2


def test_toml_round_trip(tmp_path) -> None:
    cfg = load_config(None, ["rounds=7", "model.hidden=[16]", "evaluation.baselines=[\"pooled\"]"])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_missing_and_invalid_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_from_dict_rejects_a_section_that_is_not_a_table() -> None:
    with pytest.raises(ConfigError, match="must be a table"):
        ExperimentConfig.from_dict({"data": 3})
