"""Federated median and mode imputation equal the pooled values (median within 0.01 sd)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from consortium.cli import main
from consortium.data._rng import generator
from consortium.data.files import load_csv
from consortium.data.heart_disease import _FEATURES, SITES, _read_site, load_heart_disease
from consortium.data.holdout import holdout
from consortium.data.preprocess import encode_sites


def _train_columns(seed: int) -> np.ndarray:
    parts = []
    for site, name in SITES.items():
        x, y = _read_site(name)
        keep, _ = holdout(y, fraction=0.25, rng=generator(seed, "heart-disease", site))
        parts.append(x[keep])
    return np.concatenate(parts)


def test_heart_disease_median_and_mode_equal_the_pooled_training_values() -> None:
    x = _train_columns(0)
    trains = [x[:300], x[300:]]  # any split into sites gives the same federated values
    enc, _, _ = encode_sites(trains, [x[:5], x[:5]], columns=_FEATURES, impute="median",
                             impute_categorical="mode")
    for j, col in enumerate(_FEATURES):
        v = x[:, j][~np.isnan(x[:, j])]
        if enc.kinds[j] == "continuous":
            assert abs(enc.fill[j] - np.median(v)) <= 0.01 * enc.std[j] + 1e-12, col.name
        elif enc.kinds[j] == "binary":
            assert enc.fill[j] == float(np.mean(v) >= 0.5)
        else:
            values, counts = np.unique(v, return_counts=True)
            assert enc.fill_category[j] == int(values[np.argmax(counts)]), col.name
    # every site split gives the same encoder
    enc2, _, _ = encode_sites([x], [x[:5]], columns=_FEATURES, impute="median",
                              impute_categorical="mode")
    np.testing.assert_array_equal(enc.fill, enc2.fill)


def test_the_loaded_data_use_the_fill_values() -> None:
    mean = load_heart_disease(seed=0)
    med = load_heart_disease(seed=0, impute="median", impute_categorical="mode")
    assert mean.feature_names == med.feature_names
    names = list(med.feature_names)
    i, flag = names.index("chol"), names.index("chol_missing")
    xs = np.concatenate([c.train.x.numpy() for c in med.clients.values()])
    xm = np.concatenate([c.train.x.numpy() for c in mean.clients.values()])
    missing = xs[:, flag] == 1
    assert missing.any()
    assert np.allclose(xm[missing, i], 0.0, atol=1e-6)  # the mean standardises to 0
    assert len(set(np.round(xs[missing, i], 5))) == 1 and not np.allclose(xs[missing, i], 0.0)
    j = [k for k, n in enumerate(names) if n.startswith("thal=")]
    thal_missing = xs[:, names.index("thal_missing")] == 1
    assert np.all(xs[thal_missing][:, j].sum(axis=1) == 1)  # the mode, one-hot
    assert np.all(xm[thal_missing][:, j].sum(axis=1) == 0)  # the default: all zeros


def test_csv_sites_columnar_path_matches_the_per_site_protocol(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for site in ("a", "b", "c"):
        n = 60
        age = rng.normal(50, 10, n).round(1).astype(object)
        age[rng.random(n) < 0.2] = ""
        smoker = rng.choice(["yes", "no", "no", ""], n)
        y = rng.integers(0, 2, n)
        lines = ["age,smoker,y"] + [f"{a},{s},{t}" for a, s, t in zip(age, smoker, y)]
        (tmp_path / f"{site}.csv").write_text("\n".join(lines) + "\n")
    ds = load_csv(path=str(tmp_path / "*.csv"), target="y", seed=0, impute="median",
                  impute_categorical="mode")
    names = list(ds.feature_names)
    x = np.concatenate([c.train.x.numpy() for c in ds.clients.values()])
    flag = x[:, names.index("age_missing")] == 1
    filled = set(np.round(x[flag, names.index("age")], 5))
    assert len(filled) == 1
    assert np.all(x[x[:, names.index("smoker_missing")] == 1][:, names.index("smoker=no")] == 1)


def test_deployment_refuses_median_imputation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nimpute = "median"\n')
    code = main(["server", str(cfg), "--insecure", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "second round of site counts" in capsys.readouterr().err
