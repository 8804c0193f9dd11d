"""Tests for CSV and Parquet sources: sites from files or a site column, clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from consortium.data.base import FederatedDataset
from consortium.data.files import load_csv, load_parquet
from consortium.errors import DataError, MissingExtraError

HEADER = "age,smoker,city,label"
SITE_A = ["30,0,paris,no", "40,1,rome,yes", "50,1,paris,yes", "60,0,rome,no"]
SITE_B = ["35,1,oslo,maybe", "45,NA,paris,no", "55,0,oslo,yes", "65,1,,maybe"]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def two_sites(tmp_path: Path) -> Path:
    write(tmp_path / "site_b.csv", [HEADER, *SITE_B])
    write(tmp_path / "site_a.csv", [HEADER, *SITE_A])
    return tmp_path


def _rows(ds: FederatedDataset, cid: str) -> tuple[torch.Tensor, torch.Tensor]:
    c = ds.clients[cid]
    return torch.cat([c.train.x, c.test.x]), torch.cat([c.train.y, c.test.y])


def test_one_client_per_file_with_union_labels_and_one_hot(two_sites: Path) -> None:
    # tiny files: min_count=1 names every category (the default 5 would name none)
    ds = load_csv(path=str(two_sites / "*.csv"), target="label", seed=0, min_count=1)
    assert ds.client_ids == ["site_a", "site_b"]  # sorted by path
    assert ds.num_classes == 3
    assert ds.notes["labels"] == "0=maybe, 1=no, 2=yes"
    assert ds.feature_names == (
        "age",
        "smoker",
        "smoker_missing",
        "city=oslo",
        "city=paris",
        "city=rome",
        "city_missing",
    )
    assert ds.input_shape == (7,)
    # every site's labels, mapped through the sorted union
    _, y_a = _rows(ds, "site_a")
    assert sorted(y_a.tolist()) == [1, 1, 2, 2]
    _, y_b = _rows(ds, "site_b")
    assert sorted(y_b.tolist()) == [0, 0, 1, 2]
    for c in ds.clients.values():
        assert len(c.train) == 3 and len(c.test) == 1
        assert torch.isfinite(c.train.x).all() and torch.isfinite(c.test.x).all()


def test_numeric_columns_standardised_and_zero_one_columns_kept(two_sites: Path) -> None:
    ds = load_csv(path=str(two_sites), target="label", seed=0)  # a directory works too
    train = ds.pooled_train().x.double()
    age, smoker, flagged = train[:, 0], train[:, 1], train[:, 2] == 1
    assert abs(age.mean().item()) < 1e-6  # federated mean over the train rows
    assert age.std(unbiased=False).item() == pytest.approx(1.0)
    # smoker only holds 0/1, so it is not standardised ...
    assert set(smoker[~flagged].tolist()) == {0.0, 1.0}
    # ... and the one NA smoker (train or test) is flagged and gets the train share of ones.
    every = torch.cat([torch.cat([c.train.x, c.test.x]) for c in ds.clients.values()]).double()
    assert every[:, 2].sum().item() == 1.0
    imputed = every[every[:, 2] == 1, 1].item()
    assert imputed == pytest.approx(smoker[~flagged].mean().item(), rel=1e-6)
    assert 0 < imputed < 1


def test_one_file_with_a_site_column(tmp_path: Path) -> None:
    lines = ["hospital,x,y", "north,1.0,a", "south,2.0,b", "north,3.0,b", "south,4.0,a", "east,5,a"]
    ds = load_csv(
        path=str(write(tmp_path / "all.csv", lines)), target="y", seed=0, site_column="hospital"
    )
    assert ds.client_ids == ["north", "south", "east"]  # order of first appearance
    assert ds.feature_names == ("x",)
    sizes = {cid: len(c.train) + len(c.test) for cid, c in ds.clients.items()}
    assert sizes == {"north": 2, "south": 2, "east": 1}


def test_numeric_labels_sort_as_numbers(tmp_path: Path) -> None:
    write(tmp_path / "a.csv", ["x,y", "1,10", "2,9", "3,2", "4,10"])
    write(tmp_path / "b.csv", ["x,y", "5,2.0", "6,9", "7,10", "8,2"])
    ds = load_csv(path=str(tmp_path / "*.csv"), target="y", seed=0)
    assert ds.notes["labels"] == "0=2, 1=9, 2=10"  # "2.0" and "2" are one label


def test_split_is_seeded(two_sites: Path) -> None:
    rows = [f"{i},0,paris,{'yes' if i % 2 else 'no'}" for i in range(40)]
    write(two_sites / "site_c.csv", [HEADER, *rows])
    a = load_csv(path=str(two_sites / "*.csv"), target="label", seed=0)
    b = load_csv(path=str(two_sites / "*.csv"), target="label", seed=0)
    c = load_csv(path=str(two_sites / "*.csv"), target="label", seed=1)
    assert torch.equal(a.clients["site_c"].test.x, b.clients["site_c"].test.x)
    assert not torch.equal(a.clients["site_c"].test.x, c.clients["site_c"].test.x)


def test_missing_target_column_lists_the_columns(two_sites: Path) -> None:
    with pytest.raises(DataError, match="'outcome'.*columns found: age, smoker, city, label"):
        load_csv(path=str(two_sites / "*.csv"), target="outcome", seed=0)
    with pytest.raises(DataError, match="data.target is not set.*age, smoker, city, label"):
        load_csv(path=str(two_sites / "*.csv"), target="", seed=0)


def test_missing_label_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "a.csv", ["x,y", "1,0", "2,", "3,1"])
    write(tmp_path / "b.csv", ["x,y", "1,0", "3,1"])
    with pytest.raises(DataError, match=r"a\.csv line 3 has no value in the target column 'y'"):
        load_csv(path=str(tmp_path / "*.csv"), target="y", seed=0)


def test_one_file_needs_a_site_column(tmp_path: Path) -> None:
    path = write(tmp_path / "all.csv", ["x,y", "1,0", "2,1"])
    with pytest.raises(DataError, match="site_column is not set.*one of: x, y"):
        load_csv(path=str(path), target="y", seed=0)
    with pytest.raises(DataError, match="'site'.*columns found: x, y"):
        load_csv(path=str(path), target="y", seed=0, site_column="site")


def test_single_label_value_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.csv", ["x,y", "1,0", "2,0"])
    write(tmp_path / "b.csv", ["x,y", "1,0"])
    with pytest.raises(DataError, match="only the value 0"):
        load_csv(path=str(tmp_path / "*.csv"), target="y", seed=0)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "is empty"),
        (["x,y"], "header but no rows"),
        (["x,y", "1,0,5"], "line 2 has 3 fields, the header has 2"),
        (["x,x", "1,0"], "two columns named 'x'"),
        (["x,y", "inf,0", "1,1"], "line 2 has an infinite value in column 'x'"),
    ],
)
def test_bad_csv_files(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines), encoding="utf-8")
    write(tmp_path / "good.csv", ["x,y", "1,0", "2,1"])
    with pytest.raises(DataError, match=message):
        load_csv(path=str(tmp_path / "*.csv"), target="y", seed=0)


def test_unreadable_and_absent_files(tmp_path: Path) -> None:
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="cannot read .*bin.csv as CSV"):
        load_csv(path=str(tmp_path / "bin.csv"), target="y", seed=0, site_column="s")
    with pytest.raises(DataError, match="no file matches"):
        load_csv(path=str(tmp_path / "nothing*.csv"), target="y", seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_csv(path=str(tmp_path / "absent.csv"), target="y", seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \*\.csv file"):
        load_csv(path=str(tmp_path / "empty"), target="y", seed=0)
    with pytest.raises(DataError, match="data.path is empty"):
        load_csv(path="", target="y", seed=0)


def test_files_with_different_columns(tmp_path: Path) -> None:
    write(tmp_path / "a.csv", ["x,y", "1,0"])
    write(tmp_path / "b.csv", ["x,z,y", "1,2,0"])
    with pytest.raises(DataError, match=r"extra \['z'\], lacking \[\]"):
        load_csv(path=str(tmp_path / "*.csv"), target="y", seed=0)


def test_parquet_gives_the_same_data_as_csv(two_sites: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "pq"
    out.mkdir()
    for name, rows in (("site_a", SITE_A), ("site_b", SITE_B)):
        cells = [r.split(",") for r in rows]
        table = pa.table(
            {
                "age": [int(c[0]) for c in cells],
                "smoker": [None if c[1] == "NA" else int(c[1]) for c in cells],
                "city": [c[2] or None for c in cells],
                "label": [c[3] for c in cells],
            }
        )
        pq.write_table(table, out / f"{name}.parquet")
    from_csv = load_csv(path=str(two_sites / "*.csv"), target="label", seed=3)
    from_pq = load_parquet(path=str(out / "*.parquet"), target="label", seed=3)
    assert from_pq.client_ids == from_csv.client_ids
    assert from_pq.feature_names == from_csv.feature_names
    assert from_pq.notes["labels"] == from_csv.notes["labels"]
    for cid in from_csv.client_ids:
        for part in ("train", "test"):
            a, b = getattr(from_csv.clients[cid], part), getattr(from_pq.clients[cid], part)
            assert torch.equal(a.y, b.y)
            np.testing.assert_allclose(a.x.numpy(), b.x.numpy(), rtol=1e-6)


def test_parquet_with_a_site_column_and_a_missing_label(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "all.parquet"
    pq.write_table(pa.table({"site": [1, 2, 1], "x": [0.5, 1.5, 2.5], "y": [0, 1, None]}), path)
    with pytest.raises(DataError, match=r"all\.parquet row 3 has no value in the target"):
        load_parquet(path=str(path), target="y", seed=0, site_column="site")


def test_unreadable_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read .*junk.parquet as Parquet"):
        load_parquet(path=str(path), target="y", seed=0, site_column="s")


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.parquet"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'consortium\[parquet\]'"):
        load_parquet(path=str(path), target="y", seed=0, site_column="s")


def test_one_sites_own_file_splits_as_it_does_among_the_others(tmp_path) -> None:
    """A deployed site reads only its file; its train/test split is the simulation's."""
    from consortium.data.files import load_csv, load_site_csv

    rng = __import__("numpy").random.default_rng(3)
    for site in ("east", "west"):
        rows = ["a,b,label"] + [f"{rng.normal():.4f},{rng.normal():.4f},{int(rng.random() > 0.5)}"
                                for _ in range(40)]
        (tmp_path / f"{site}.csv").write_text("\n".join(rows) + "\n")
    both = load_csv(path=str(tmp_path / "*.csv"), target="label", seed=5)
    alone = load_site_csv(tmp_path / "west.csv", target="label", seed=5)
    assert list(alone.clients) == ["west"]
    for split in ("train", "test"):
        assert getattr(alone.clients["west"], split).y.tolist() == getattr(both.clients["west"], split).y.tolist()
