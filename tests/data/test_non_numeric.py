"""A numeric column with a few cells that are not numbers (issue 20: `4O` for 40) is an error
naming the file, line and value, or, as `data.non_numeric` chooses, missing values with a
warning, or categories; a column that is mostly text stays categorical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from consortium.config import DataConfig, load_config
from consortium.data import load_dataset
from consortium.data.files import load_csv, load_parquet
from consortium.errors import ConfigError, DataError


def _sites(folder: Path, *, typo: str | None = "4O", text_share: int = 0) -> Path:
    """Three site files of 40 rows; site b's row 8 (line 9) holds ``typo`` in ``age``.
    ``text_share``: that many rows of every site hold a word in ``grade`` instead of a number."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for site in ("a", "b", "c"):
        lines = ["age,grade,chol,y"]
        for i in range(40):
            age = str(int(rng.integers(30, 80)))
            if site == "b" and i == 7 and typo is not None:
                age = typo
            grade = "high" if i < text_share else str(int(rng.integers(1, 4)))
            lines.append(f"{age},{grade},{int(rng.integers(150, 300))},{i % 2}")
        (folder / f"{site}.csv").write_text("\n".join(lines) + "\n")
    return folder


def _load(folder: Path, **kw) -> object:
    return load_csv(path=str(folder / "*.csv"), target="y", seed=0, **kw)


def test_a_typo_in_a_numeric_column_names_file_line_and_value(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        _load(_sites(tmp_path))
    message = str(err.value)
    assert f"{tmp_path / 'b.csv'} line 9" in message and "'4O'" in message
    assert "column 'age'" in message and "1 of its 120 values" in message
    assert 'data.non_numeric = "missing"' in message  # the fix


def test_missing_mode_reads_the_typo_as_an_empty_cell_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lenient = _load(_sites(tmp_path / "typo"), non_numeric="missing")
    warning = capsys.readouterr().err
    assert "warning" in warning and "'4O'" in warning and "b.csv line 9" in warning
    blank = _load(_sites(tmp_path / "blank", typo=""))  # the same cell left empty: missing
    assert lenient.feature_names == blank.feature_names
    assert "age" in lenient.feature_names and "age_missing" in lenient.feature_names
    for cid in blank.client_ids:
        for split in ("train", "test"):
            a, b = getattr(lenient.clients[cid], split), getattr(blank.clients[cid], split)
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_category_mode_keeps_the_column_categorical(tmp_path: Path) -> None:
    ds = _load(_sites(tmp_path), non_numeric="category")
    assert "age" not in ds.feature_names  # no numeric age: categories (each too rare to name)
    assert "chol" in ds.feature_names


def test_a_mostly_text_column_stays_categorical_without_error(tmp_path: Path) -> None:
    ds = _load(_sites(tmp_path, typo=None, text_share=30))  # 75 % words: a coded column
    assert "grade=high" in ds.feature_names and "grade" not in ds.feature_names


def test_a_column_of_numbers_only_is_numeric_as_before(tmp_path: Path) -> None:
    ds = _load(_sites(tmp_path, typo=None))
    assert {"age", "grade", "chol"} <= set(ds.feature_names)


def test_parquet_names_the_row(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    values = [str(v) for v in range(30, 70)]
    values[12] = "x7"
    table = pa.table({"age": values, "site": ["s1", "s2"] * 20, "y": [0, 1, 1, 0] * 10})
    pq.write_table(table, tmp_path / "all.parquet")
    with pytest.raises(DataError, match=r"'x7'.*row 13|row 13.*'x7'"):
        load_parquet(path=str(tmp_path / "all.parquet"), target="y", seed=0, site_column="site")


def test_the_config_key_reaches_the_loader_and_is_refused_for_other_data(tmp_path: Path) -> None:
    folder = _sites(tmp_path)
    cfg = DataConfig(dataset="csv", path=str(folder / "*.csv"), target="y")
    with pytest.raises(DataError, match="4O"):
        load_dataset(cfg, seed=0)
    ds = load_dataset(DataConfig(dataset="csv", path=str(folder / "*.csv"), target="y",
                                 non_numeric="missing"), seed=0)
    assert "age_missing" in ds.feature_names
    with pytest.raises(ConfigError, match="non_numeric.*csv or parquet"):
        load_config(None, ["data.non_numeric=missing"])  # heart disease: not a file of yours


def test_a_deployed_site_judges_its_own_file_the_same_way(tmp_path: Path) -> None:
    from consortium.data.files import read_site_table

    folder = _sites(tmp_path)
    read_site_table(folder / "a.csv", target="y")  # no typo at site a
    with pytest.raises(DataError, match=r"b\.csv line 9.*|'4O'"):
        read_site_table(folder / "b.csv", target="y")
    table = read_site_table(folder / "b.csv", target="y", non_numeric="missing")
    assert dict(zip(table.features, table.numeric))["age"] is True
    x_train, _, x_test, _ = table.split(classes=[0, 1], seed=0, test_fraction=0.25)
    ages = np.concatenate([x_train[:, 0], x_test[:, 0]]).astype(float)
    assert np.isnan(ages).sum() == 1  # the typo, now a missing value
    assert not read_site_table(folder / "b.csv", target="y", non_numeric="category").numeric[0]
