"""Tests for load_dataset, the data set and partition tables, and the data package's surface."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from consortium import data
from consortium.config import DataConfig
from consortium.data.registry import DATASETS, PARTITIONS, load_dataset
from consortium.errors import DataError


def _literal(name: str) -> set[str]:
    return set(typing.get_args(typing.get_type_hints(DataConfig)[name]))


def test_tables_match_the_config_choices() -> None:
    assert set(DATASETS) == _literal("dataset")
    assert set(PARTITIONS) == _literal("partition")
    assert all(
        isinstance(v, str) and v and "\n" not in v
        for v in (*DATASETS.values(), *PARTITIONS.values())
    )


def test_default_config_is_the_four_hospitals() -> None:
    ds = load_dataset(DataConfig(), seed=0)
    assert ds.name == "heart-disease"
    assert ds.client_ids == ["cleveland", "hungarian", "switzerland", "va"]


@pytest.mark.parametrize(
    ("cfg", "name", "clients"),
    [
        (DataConfig(dataset="synthetic", clients=3, samples_per_client=20), "synthetic", 3),
        (DataConfig(dataset="digits", partition="iid", clients=4), "digits", 4),
        (DataConfig(dataset="breast-cancer", partition="shards", clients=5), "breast-cancer", 5),
    ],
)
def test_dispatch(cfg: DataConfig, name: str, clients: int) -> None:
    ds = load_dataset(cfg, seed=0)
    assert ds.name == name and len(ds.clients) == clients


def test_config_values_reach_the_loader() -> None:
    cfg = DataConfig(
        dataset="digits", partition="iid", clients=2, test_fraction=0.5, server_test_fraction=0.1
    )
    ds = load_dataset(cfg, seed=0)
    assert ds.server_test is not None and len(ds.server_test) == 180
    c = ds.clients["client-0"]
    assert abs(len(c.train) - len(c.test)) <= 1


def test_csv_dispatch(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x,y\n1,0\n2,1\n3,0\n")
    (tmp_path / "b.csv").write_text("x,y\n4,1\n5,0\n")
    ds = load_dataset(DataConfig(dataset="csv", path=str(tmp_path / "*.csv"), target="y"), seed=0)
    assert ds.client_ids == ["a", "b"]


def test_same_seed_same_data() -> None:
    cfg = DataConfig(dataset="breast-cancer", partition="dirichlet", clients=4)
    a, b = load_dataset(cfg, seed=3), load_dataset(cfg, seed=3)
    for cid in a.client_ids:
        assert torch.equal(a.clients[cid].train.x, b.clients[cid].train.x)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (DataConfig(partition="iid"), 'four real hospitals.*"natural"'),
        (DataConfig(dataset="synthetic", partition="dirichlet"), "own model"),
        (DataConfig(dataset="csv", partition="shards", path="x.csv"), "your files"),
        (
            DataConfig(dataset="digits"),
            "no natural sites.*'iid', 'dirichlet', 'shards', 'quantity'",
        ),
        (DataConfig(server_test_fraction=0.2), "no server-side test set"),
    ],
)
def test_partitions_that_do_not_apply(cfg: DataConfig, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(cfg, seed=0)


def test_unknown_names() -> None:
    # DataConfig itself does not check its Literal fields; load_dataset must not trust them.
    mnist = DataConfig(dataset="mnist")  # type: ignore[arg-type]
    with pytest.raises(
        DataError, match="unknown data set 'mnist'; expected one of 'heart-disease'"
    ):
        load_dataset(mnist, seed=0)
    odd = DataConfig(dataset="digits", partition="random")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="unknown partition 'random'; expected one of 'natural'"):
        load_dataset(odd, seed=0)


def test_package_all_is_sorted_and_importable() -> None:
    # ruff's RUF022 order (isort style): CONSTANTS, then Classes, then functions and modules.
    def isort_key(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert data.__all__ == sorted(data.__all__, key=isort_key)
    for name in data.__all__:
        assert getattr(data, name) is not None
    assert {
        "Split",
        "ClientData",
        "FederatedDataset",
        "load_dataset",
        "DATASETS",
        "PARTITIONS",
    } <= set(data.__all__)


def test_importing_the_data_package_loads_no_optional_library() -> None:
    code = (
        "import sys, consortium.data\n"
        "heavy = [m for m in ('sklearn', 'pyarrow', 'pandas') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    src = str(Path(data.__file__).parents[2])
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": src},
    )
    assert out.stdout.strip() == ""
