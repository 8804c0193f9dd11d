"""The columnar file path: hand-checked encodings, and bit-for-bit equality with the
per-site protocol of consortium.data.preprocess (summarise, merge, fit, transform)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from consortium.data._columnar import _site_sums
from consortium.data._rng import generator
from consortium.data.files import load_csv, load_parquet
from consortium.data.holdout import _class_of, holdout
from consortium.data.preprocess import Column, encode_sites
from consortium.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def test_a_small_mixed_file_with_missing_values_encodes_as_computed_by_hand(tmp_path: Path) -> None:
    # one row per site: nothing is held out, so the statistics cover every row
    (tmp_path / "all.csv").write_text(
        "site,age,colour,smoker,label\n"
        "a,30,red,1,yes\n"
        "b,,blue,0,no\n"
        "c,50, red ,?,yes\n"
        "d,40,NA,1,no\n"
    )
    ds = load_csv(path=str(tmp_path / "all.csv"), target="label", seed=0, site_column="site",
                  min_count=1)  # one row per site: name every category
    assert ds.client_ids == ["a", "b", "c", "d"]
    assert ds.feature_names == ("age", "age_missing", "colour=blue", "colour=red",
                                "colour_missing", "smoker", "smoker_missing")
    assert ds.notes["labels"] == "0=no, 1=yes"
    # age: mean 40 over 30, 50, 40; std sqrt((900 + 2500 + 1600) / 3 - 40²) = sqrt(200 / 3)
    z = 10 / math.sqrt(200 / 3)
    expected = torch.tensor([
        # age  age?  blue  red  colour?  smoker  smoker?
        [-z,   0.0,  0.0,  1.0, 0.0,     1.0,    0.0],
        [0.0,  1.0,  1.0,  0.0, 0.0,     0.0,    0.0],  # missing age: the mean, standardised
        [z,    0.0,  0.0,  1.0, 0.0,     2 / 3,  1.0],  # smoker is 0/1: imputed with the share
        [0.0,  0.0,  0.0,  0.0, 1.0,     1.0,    0.0],  # of ones, 2/3; colour NA: all zeros
    ], dtype=torch.float32)
    packed = ds.packed()
    assert len(packed.test) == 0
    torch.testing.assert_close(packed.train.x, expected, rtol=0, atol=1e-6)
    assert packed.train.y.tolist() == [1, 0, 1, 0]


def _random_rows(rng: np.random.Generator, n_sites: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows, site after site, with a continuous column (some missing), a 0/1 column, a text
    column (some missing) and a label; site sizes up to 300 rows, past numpy's pairwise-sum
    block of 128. Returns the columns and each row's site name."""
    sizes = rng.choice([1, 2, 7, 40, 129, 300], n_sites)
    n = int(sizes.sum())
    cont = rng.normal(3, 10, n)
    cont[rng.random(n) < 0.2] = np.nan
    columns = {
        "cont": cont,
        "flag": rng.integers(0, 2, n).astype(float),
        "colour": rng.choice(["red", "blue", "green", ""], n).astype(object),
        "label": rng.integers(0, 3, n),
    }
    return columns, np.repeat([f"site{i:02d}" for i in range(n_sites)], sizes)


def _by_protocol(columns: dict[str, np.ndarray], site: np.ndarray, names: list[str], seed: int):
    """The per-site reference: each site splits its own rows (in the order given), then
    summarize_site / merge_summaries / fit_encoder / transform through encode_sites."""
    cols = [Column("cont", "numeric"), Column("flag", "numeric"), Column("colour", "categorical")]
    x = np.empty((len(site), 3), dtype=object)
    x[:, 0], x[:, 1] = columns["cont"], columns["flag"]
    x[:, 2] = [None if c == "" else c for c in columns["colour"]]
    trains, tests, y_tr, y_te = [], [], [], []
    for name in names:
        mine = np.flatnonzero(site == name)
        y = columns["label"][mine].astype(np.int64)
        keep, held = holdout(y, fraction=0.25, rng=generator(seed, "files", "split", name))
        trains.append(x[mine[keep]])
        tests.append(x[mine[held]])
        y_tr.append(y[keep])
        y_te.append(y[held])
    encoder, xs, xt = encode_sites(trains, tests, columns=cols)
    return encoder, np.concatenate(xs), np.concatenate(xt), np.concatenate(y_tr), np.concatenate(y_te)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_file_path_equals_the_per_site_protocol_bit_for_bit(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(7)
    columns, site = _random_rows(rng, 25)
    if fmt == "csv":  # one file per site
        names = sorted(set(site.tolist()))
        for name in names:
            mine = np.flatnonzero(site == name)
            lines = ["cont,flag,colour,label"] + [
                f"{'' if np.isnan(c) else repr(float(c))},{int(f)},{col},{lab}"
                for c, f, col, lab in zip(*(columns[k][mine] for k in columns))
            ]
            (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
        ds = load_csv(path=str(tmp_path), target="label", seed=3)
    else:  # one file, the sites' rows interleaved, in row groups
        shuffle = rng.permutation(len(site))
        columns = {k: v[shuffle] for k, v in columns.items()}
        site = site[shuffle]
        names = list(dict.fromkeys(site.tolist()))  # order of first appearance
        pq.write_table(pa.table({"site": site.tolist(), **{k: v.tolist() for k, v in columns.items()}}),
                       tmp_path / "all.parquet", row_group_size=97)
        ds = load_parquet(path=str(tmp_path / "all.parquet"), target="label", seed=3,
                          site_column="site")
    encoder, x_tr, x_te, y_tr, y_te = _by_protocol(columns, site, names, seed=3)
    packed = ds.packed()
    assert list(packed.client_ids) == names
    assert ds.feature_names == encoder.feature_names
    assert "colour_missing" in ds.feature_names and "cont_missing" in ds.feature_names
    for got, want in ((packed.train.x, x_tr), (packed.test.x, x_te)):
        assert got.numpy().dtype == want.dtype == np.float32
        assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
    assert packed.train.y.tolist() == y_tr.tolist() and packed.test.y.tolist() == y_te.tolist()


def test_site_sums_equal_numpy_sums_of_each_segment() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.choice([0, 1, 5, 8, 9, 127, 128, 129, 300, 1000], 60)
    offsets = np.cumsum([0, *sizes])
    values = rng.normal(0, 1, offsets[-1]) * 10.0 ** rng.integers(-3, 6, offsets[-1])
    values[rng.random(len(values)) < 0.1] = np.nan
    count, total, total_sq = _site_sums(values, offsets)
    for s in range(len(sizes)):
        present = values[offsets[s]:offsets[s + 1]]
        present = present[~np.isnan(present)]
        assert count[s] == present.size
        assert total[s] == present.sum() and total_sq[s] == np.square(present).sum()


def test_class_counting_agrees_with_unique() -> None:
    rng = np.random.default_rng(1)
    for labels in (rng.integers(0, 5, 30), rng.integers(3, 9, 17).astype(np.int32),
                   np.array([2, 2, 7]), rng.normal(size=9).round(), np.array(["b", "a", "b"])):
        inverse, counts = _class_of(labels)
        _, want_inverse, want_counts = np.unique(labels, return_inverse=True, return_counts=True)
        assert inverse.tolist() == want_inverse.tolist()
        assert counts.tolist() == want_counts.tolist()


def test_parquet_types_read_as_python_read_them(tmp_path: Path) -> None:
    """Dictionary columns decode; text that Python's float reads ("1_000", " 2 ") is numeric;
    booleans are 0/1; a float label 1.0 is the label 1."""
    pq.write_table(pa.table({
        "site": pa.array(["n", "s", "n", "s"]).dictionary_encode(),
        "num_text": ["1_000", " 2 ", "3", None],
        "flag": [True, False, None, True],
        "y": [1.0, 0.0, 1.0, 0.0],
    }), tmp_path / "all.parquet")
    ds = load_parquet(path=str(tmp_path / "all.parquet"), target="y", seed=0, site_column="site")
    assert ds.client_ids == ["n", "s"]
    assert ds.feature_names == ("num_text", "num_text_missing", "flag", "flag_missing")
    assert ds.notes["labels"] == "0=0, 1=1"
    every = torch.cat([ds.packed().train.x, ds.packed().test.x])
    assert set(every[:, 2].tolist()) <= {0.0, 1.0, 2 / 3} and every[:, 3].sum() == 1


def test_csv_line_numbers_count_blank_records(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x,y\n\n1,0\n,\n2,\n3,1\n")
    (tmp_path / "b.csv").write_text("x,y\n1,0\n2,1\n")
    with pytest.raises(DataError, match=r"a\.csv line 5 has no value in the target column"):
        load_csv(path=str(tmp_path / "*.csv"), target="y", seed=0)


def test_a_site_column_groups_interleaved_rows_in_order_of_first_appearance(tmp_path: Path) -> None:
    letters = "babcabcacaca"
    rows = ["s,x,y"] + [f"{s},{i},{i % 2}" for i, s in enumerate(letters)]
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    ds = load_csv(path=str(tmp_path / "all.csv"), target="y", seed=0, site_column="s")
    assert ds.client_ids == ["b", "a", "c"]
    sizes = {c: len(d.train) + len(d.test) for c, d in ds.clients.items()}
    assert sizes == {c: letters.count(c) for c in "bac"}
