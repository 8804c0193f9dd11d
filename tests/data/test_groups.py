"""Group columns kept aside (labels, features removed, bands on raw values) and Kamiran &
Calders' reweighing: hand-computed weights and resampled cell counts."""

from __future__ import annotations

from importlib.resources import as_file, files

import numpy as np
import pytest
import torch

from consortium.config import DataConfig, EvaluationConfig, ExperimentConfig, FairnessConfig
from consortium.data._assemble import ClientArrays, assemble
from consortium.data.groups import (
    band_labels,
    feature_group_labels,
    fitting_split,
    keep_groups_aside,
    parse_bands,
    reweigh,
    reweighing_weights,
    uniform_sample,
)
from consortium.data.heart_disease import COLUMNS, SITES, site_split
from consortium.data.registry import load_dataset
from consortium.errors import ConfigError, DataError

NAMES = ("sex", "sex_missing", "score", "cp=1", "cp=2")


def _tiny() -> object:
    # sex, sex_missing, score, cp one-hot; site b's last test row has sex missing, cp unset
    a_train = np.array([[1, 0, 0.5, 1, 0], [0, 0, -1.0, 0, 1], [1, 0, 2.0, 0, 1]], np.float32)
    a_test = np.array([[0, 0, 0.1, 1, 0]], np.float32)
    b_train = np.array([[0, 0, 1.5, 0, 1], [1, 0, 0.0, 1, 0]], np.float32)
    b_test = np.array([[1, 0, 3.0, 0, 1], [0.4, 1, 1.0, 0, 0]], np.float32)
    return assemble("tiny", [
        ClientArrays("a", a_train, np.array([1, 0, 1]), a_test, np.array([0])),
        ClientArrays("b", b_train, np.array([0, 1]), b_test, np.array([1, 0])),
    ], num_classes=2, input_shape=(5,), feature_names=NAMES)


def test_parse_bands() -> None:
    assert parse_bands(["age: 50, 60", " chol:200"]) == {"age": (50.0, 60.0), "chol": (200.0,)}
    for bad, match in [("age 50, 60", "not '<column>:"), ("age: 50, x", "numbers"),
                       ("age: 60, 50", "strictly increasing"), ("age: 50, 50", "strictly"),
                       ("age: nan", "finite")]:
        with pytest.raises(ConfigError, match=match):
            parse_bands([bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_bands(["age: 50", "age: 60"])


def test_band_labels_hold_their_lower_edge() -> None:
    got = band_labels(np.array([49.0, 50.0, 59.5, 60.0, 75.0, np.nan]), (50.0, 60.0))
    assert got.tolist() == ["<50", "50\u201360", "50\u201360", "\u226560", "\u226560", "missing"]


def test_feature_group_labels() -> None:
    x = np.array([[1, 0, 0.5, 1, 0], [0, 0, 1, 0, 1], [0.4, 1, 2, 0, 0]])
    assert feature_group_labels(x, NAMES, "sex").tolist() == ["1", "0", "missing"]
    assert feature_group_labels(x, NAMES, "cp").tolist() == ["1", "2", "missing"]
    with pytest.raises(ConfigError, match="continuous.*score_band"):
        feature_group_labels(x, NAMES, "score")
    with pytest.raises(ConfigError, match="'age', which is not a feature.*features: sex"):
        feature_group_labels(x, NAMES, "age")


def test_group_columns_leave_the_features() -> None:
    ds = _tiny()
    out = keep_groups_aside(ds, ["sex", "cp"])  # type: ignore[arg-type]
    assert out.feature_names == ("score",) and out.input_shape == (1,)
    packed = out.packed()
    assert packed.train.x[:, 0].tolist() == [0.5, -1.0, 2.0, 1.5, 0.0]
    assert out.groups["a"]["sex"]["train"].tolist() == ["1", "0", "1"]
    assert out.groups["a"]["cp"]["test"].tolist() == ["1"]
    assert out.groups["b"]["sex"]["test"].tolist() == ["1", "missing"]
    assert out.groups["b"]["cp"]["test"].tolist() == ["2", "missing"]
    assert torch.equal(packed.train.y, ds.packed().train.y)  # type: ignore[attr-defined]
    kept = keep_groups_aside(ds, ["sex"], as_features=True)  # type: ignore[arg-type]
    assert kept.feature_names == NAMES and kept.groups["a"]["sex"]["train"].tolist() == ["1", "0", "1"]


def test_a_band_keeps_its_column_and_needs_edges() -> None:
    ds = _tiny()
    out = keep_groups_aside(ds, ["score_band"], bands={"score": (1.0,)},  # type: ignore[arg-type]
                            scales={"score": (10.0, 2.0)})  # raw = 2·v + 10
    assert out.feature_names == NAMES
    assert out.groups["a"]["score_band"]["train"].tolist() == ["\u22651", "\u22651", "\u22651"]
    out = keep_groups_aside(ds, ["score_band"], bands={"score": (1.0,)})  # type: ignore[arg-type]
    assert out.groups["a"]["score_band"]["train"].tolist() == ["<1", "<1", "\u22651"]
    with pytest.raises(ConfigError, match="no edges for 'score'"):
        keep_groups_aside(ds, ["score_band"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="does not name 'score_band'"):
        keep_groups_aside(ds, ["sex"], bands={"score": (1.0,)})  # type: ignore[arg-type]


def _raw(column: str, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for site, name in SITES.items():
        with as_file(files("consortium.data") / "_heart_disease" / name) as path:
            x_train, _, x_test, _ = site_split(path, site, seed=seed)
        j = COLUMNS.index(column)
        out[site] = (x_train[:, j], x_test[:, j])
    return out


def test_heart_disease_bands_cut_the_raw_age() -> None:
    ev = EvaluationConfig(groups=("sex", "age_band"), bands=("age: 50, 60",))
    ds = load_dataset(DataConfig(), seed=3, evaluation=ev)
    plain = load_dataset(DataConfig(), seed=3)
    assert "sex" not in (ds.feature_names or ()) and "age" in (ds.feature_names or ())
    assert ds.input_shape == (plain.input_shape[0] - 1,)
    ages, sexes = _raw("age", 3), _raw("sex", 3)
    for site in SITES:
        for i, part in enumerate(("train", "test")):
            want = band_labels(ages[site][i], (50.0, 60.0))
            assert ds.groups[site]["age_band"][part].tolist() == want.tolist()
            assert ds.groups[site]["sex"][part].tolist() == [
                str(int(v)) for v in sexes[site][i]]
    assert {"<50", "50\u201360", "\u226560"} == set(ds.groups["cleveland"]["age_band"]["train"])


def test_bands_are_refused_without_raw_values() -> None:
    ev = EvaluationConfig(groups=("mean radius_band",), bands=("mean radius: 15",))
    with pytest.raises(ConfigError, match="heart-disease only"):
        load_dataset(DataConfig(dataset="breast-cancer", partition="iid"), seed=0, evaluation=ev)


def test_reweighing_weights_by_hand() -> None:
    # n = 10; group a: 4 rows (3 positive), group b: 6 rows (1 positive); 4 positives in all
    g = np.array(["a"] * 4 + ["b"] * 6)
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    w = reweighing_weights(g, y)
    assert w == pytest.approx({("a", 1): 4 * 4 / (10 * 3), ("a", 0): 4 * 6 / (10 * 1),
                               ("b", 1): 6 * 4 / (10 * 1), ("b", 0): 6 * 6 / (10 * 5)})
    # the weighted data make group and label independent: P_w(y=1 | g) = P(y=1) = 0.4
    for grp, n in (("a", 4), ("b", 6)):
        pos = sum(w[(grp, 1)] for gg, yy in zip(g, y) if gg == grp and yy == 1)
        assert pos / n == pytest.approx(0.4)


def test_uniform_sample_cell_counts() -> None:
    g = np.array(["a"] * 4 + ["b"] * 6)
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    pick = uniform_sample(g, y, np.random.default_rng(0))
    # expected sizes n_g·n_y/n: (a,1) 1.6 → 2, (a,0) 2.4 → 2, (b,1) 2.4 → 2, (b,0) 3.6 → 4
    cells = {(str(gg), int(yy)): int(((g[pick] == gg) & (y[pick] == yy)).sum())
             for gg in "ab" for yy in (0, 1)}
    assert cells == {("a", 1): 2, ("a", 0): 2, ("b", 1): 2, ("b", 0): 4}
    assert len(set(pick[(g[pick] == "a") & (y[pick] == 1)])) == 2  # undersampled: no repeats
    assert pick[(g[pick] == "a") & (y[pick] == 0)].tolist() == [3, 3]  # one row, duplicated
    assert np.array_equal(pick, uniform_sample(g, y, np.random.default_rng(0)))
    assert list(pick) == sorted(pick)


def test_reweigh_resamples_each_site_and_keeps_the_test_split() -> None:
    out = keep_groups_aside(_tiny(), ["sex"])  # type: ignore[arg-type]
    again = reweigh(out, "sex", seed=5)
    assert torch.equal(again.packed().test.x, out.packed().test.x)
    # site a: (sex, y) = (1,1) twice, (0,0) once; n = 3 → (1,1): 2·2/3 → 1, (0,0): 1·1/3 → 0
    sizes = again.packed().train_sizes().tolist()
    assert sizes == [1, 2]  # b: (0,0) 1·1/2 → 1 (round half up), (1,1) 1·1/2 → 1
    assert again.groups["a"]["sex"]["train"].tolist() == ["1"]
    assert again.packed().train.y.tolist()[:1] == [1]
    assert np.array_equal(reweigh(out, "sex", seed=5).packed().train.x, again.packed().train.x)
    with pytest.raises(ConfigError, match="evaluation.groups"):
        reweigh(out, "cp", seed=5)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="does not name 'age_band'"):
        ExperimentConfig(evaluation=EvaluationConfig(groups=("sex",), bands=("age: 50",)))
    with pytest.raises(ConfigError, match="one of evaluation.groups"):
        ExperimentConfig(fairness=FairnessConfig(method="reweigh", column="sex"))
    with pytest.raises(ConfigError, match="without fairness.method"):
        ExperimentConfig(fairness=FairnessConfig(column="sex"))
    with pytest.raises(ConfigError, match="strictly increasing"):
        ExperimentConfig.from_dict({"evaluation": {"groups": ["age_band"], "bands": ["age: 6, 5"]}})


def _rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(r) for r in x.reshape(len(x), -1).tolist())


def test_fitting_split_on_the_training_rows() -> None:
    out = keep_groups_aside(_tiny(), ["sex"])  # type: ignore[arg-type]
    fit = fitting_split(out, "sex", fraction=0.0, seed=1)
    assert torch.equal(fit.packed().train.x, out.packed().train.x)  # still trained on
    assert torch.equal(fit.fitting["a"].x, out.clients["a"].train.x)
    assert fit.groups["b"]["sex"]["fit"].tolist() == out.groups["b"]["sex"]["train"].tolist()
    # reweighing afterwards resamples the training rows, not the fitting rows
    both = reweigh(fit, "sex", seed=5)
    assert torch.equal(both.fitting["a"].x, out.clients["a"].train.x)
    assert both.groups["a"]["sex"]["fit"].tolist() == ["1", "0", "1"]
    assert both.groups["a"]["sex"]["train"].tolist() == ["1"]


def test_fitting_split_is_carved_from_training_rows_only() -> None:
    cfg = DataConfig()
    ev = EvaluationConfig(groups=("sex",))
    plain = load_dataset(cfg, seed=3, evaluation=ev)
    fair = FairnessConfig(method="thresholds", column="sex", fit_fraction=0.3)
    carved = load_dataset(cfg, seed=3, evaluation=ev, fairness=fair)
    assert torch.equal(carved.packed().test.x, plain.packed().test.x)  # test rows untouched
    for cid, client in plain.clients.items():
        mine, fit = carved.clients[cid], carved.fitting[cid]
        # fitting + training rows are exactly the original training rows ...
        assert _rows(torch.cat([mine.train.x, fit.x])) == _rows(client.train.x)
        assert len(fit) == round(0.3 * len(client.train))
        # ... and no fitting row is a test row
        assert not set(_rows(fit.x)) & set(_rows(client.test.x))
        assert len(carved.groups[cid]["sex"]["fit"]) == len(fit)
        assert len(carved.groups[cid]["sex"]["train"]) == len(mine.train)
        # stratified by (sex, label): each cell gives up its share, within one row
        sex, y = plain.groups[cid]["sex"]["train"], client.train.y.numpy()
        fsex, fy = carved.groups[cid]["sex"]["fit"], fit.y.numpy()
        for g in ("0", "1"):
            for label in (0, 1):
                n_cell = int(((sex == g) & (y == label)).sum())
                assert abs(int(((fsex == g) & (fy == label)).sum()) - 0.3 * n_cell) <= 1
    again = load_dataset(cfg, seed=3, evaluation=ev, fairness=fair)
    assert all(torch.equal(again.fitting[c].x, carved.fitting[c].x) for c in carved.fitting)
    other = load_dataset(cfg, seed=4, evaluation=ev, fairness=fair)
    assert not torch.equal(other.fitting["cleveland"].y, carved.fitting["cleveland"].y) or (
        not torch.equal(other.fitting["cleveland"].x, carved.fitting["cleveland"].x))
    with pytest.raises(DataError, match="fit_fraction"):
        fitting_split(plain, "sex", fraction=1.0, seed=3)
    with pytest.raises(ConfigError, match="evaluation.groups"):
        fitting_split(plain, "cp", fraction=0.3, seed=3)
