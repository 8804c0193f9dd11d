"""Tests for data harmonisation: harmonize.toml (renames, code maps, units), applied at every site,
and the cross-site schema check that refuses two codings of one column (issue 15)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from consortium.data._tables import read_csv_table
from consortium.data.base import FederatedDataset
from consortium.data.files import load_csv, load_parquet, read_site_table
from consortium.data.harmonize import (
    Harmonization,
    apply,
    check_schemas,
    load_harmonization,
    parse_harmonization,
    site_schema_from_summary,
)
from consortium.errors import ConfigError, DataError

# sex coded M/F at one site, male/female at the other; the label column is the same everywhere
SITE_A = ["age,sex,label", "30,M,0", "41,F,1", "52,M,1", "38,F,0", "47,M,1", "33,F,0"]
SITE_B = ["age,sex,label", "61,male,0", "70,female,1", "66,male,1", "58,female,0", "75,male,1"]
SEX_MAP = '[map.sex]\nM = "male"\nF = "female"\n'


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def recode(lines: list[str], column: int, codes: dict[str, str]) -> list[str]:
    out = [lines[0]]
    for line in lines[1:]:
        cells = line.split(",")
        cells[column] = codes.get(cells[column], cells[column])
        out.append(",".join(cells))
    return out


def assert_same(a: FederatedDataset, b: FederatedDataset) -> None:
    """Bit-identical tensors, the same clients, features and labels."""
    assert a.client_ids == b.client_ids
    assert a.feature_names == b.feature_names
    assert a.notes["labels"] == b.notes["labels"]
    for cid in a.client_ids:
        for part in ("train", "test"):
            x, y = getattr(a.clients[cid], part), getattr(b.clients[cid], part)
            assert torch.equal(x.x, y.x), (cid, part)
            assert torch.equal(x.y, y.y), (cid, part)


@pytest.fixture
def two_codings(tmp_path: Path) -> Path:
    folder = tmp_path / "sites"
    folder.mkdir()
    write(folder / "site_a.csv", SITE_A)
    write(folder / "site_b.csv", SITE_B)
    return folder


@pytest.fixture
def one_coding(tmp_path: Path) -> Path:
    folder = tmp_path / "common"
    folder.mkdir()
    write(folder / "site_a.csv", recode(SITE_A, 1, {"M": "male", "F": "female"}))
    write(folder / "site_b.csv", SITE_B)
    return folder


# -- the acceptance case: M/F against male/female -------------------------------------------


def test_two_codings_without_a_map_are_an_error_naming_both(two_codings: Path) -> None:
    with pytest.raises(DataError) as err:
        load_csv(path=str(two_codings / "*.csv"), target="label", seed=0)
    text = str(err.value)
    assert "column 'sex' is coded F, M at site 'site_a' but female, male at site 'site_b'" in text
    assert "[map.sex]" in text and "harmonize.toml" in text


def test_a_map_gives_the_same_data_as_one_coding(two_codings: Path, one_coding: Path,
                                                 tmp_path: Path) -> None:
    h = toml(tmp_path / "harmonize.toml", SEX_MAP)
    mapped = load_csv(path=str(two_codings / "*.csv"), target="label", seed=0, harmonize=h,
                      min_count=1)  # tiny files: name every category
    plain = load_csv(path=str(one_coding / "*.csv"), target="label", seed=0, min_count=1)
    assert_same(mapped, plain)
    assert mapped.feature_names == ("age", "sex=female", "sex=male")


def test_numbers_at_one_site_text_at_another(tmp_path: Path, one_coding: Path) -> None:
    folder = tmp_path / "numbers"
    folder.mkdir()
    # 1 / 2.0 in one file, male / female in the other: numbers compare by value
    write(folder / "site_a.csv", recode(SITE_A, 1, {"M": "1", "F": "2.0"}))
    write(folder / "site_b.csv", SITE_B)
    with pytest.raises(DataError, match=r"coded 1, 2 at site 'site_a' but female, male"):
        load_csv(path=str(folder / "*.csv"), target="label", seed=0)
    h = toml(tmp_path / "h.toml", '[map.sex]\n"1" = "male"\n"2" = "female"\n')
    mapped = load_csv(path=str(folder / "*.csv"), target="label", seed=0, harmonize=h)
    assert_same(mapped, load_csv(path=str(one_coding / "*.csv"), target="label", seed=0))


def test_parquet_integer_codes_map_like_text(tmp_path: Path, one_coding: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "pq"
    folder.mkdir()
    for name, lines, sex in (("site_a", SITE_A, {"M": 1, "F": 2}),
                             ("site_b", SITE_B, {"male": "male", "female": "female"})):
        cells = [r.split(",") for r in lines[1:]]
        pq.write_table(pa.table({"age": [int(c[0]) for c in cells],
                                 "sex": [sex[c[1]] for c in cells],
                                 "label": [int(c[2]) for c in cells]}), folder / f"{name}.parquet")
    h = parse_harmonization({"map": {"sex": {"1": "male", "2.0": "female"}}})
    mapped = load_parquet(path=str(folder / "*.parquet"), target="label", seed=0, harmonize=h)
    plain = load_csv(path=str(one_coding / "*.csv"), target="label", seed=0)
    assert mapped.feature_names == plain.feature_names
    for cid in plain.client_ids:
        assert torch.equal(mapped.clients[cid].train.x, plain.clients[cid].train.x)


def test_allow_keeps_both_codings(two_codings: Path, tmp_path: Path) -> None:
    h = toml(tmp_path / "h.toml", '[check]\nallow = ["sex"]\n')
    ds = load_csv(path=str(two_codings / "*.csv"), target="label", seed=0, harmonize=h,
                  min_count=1)  # tiny files: name every category
    assert ds.feature_names == ("age", "sex=F", "sex=M", "sex=female", "sex=male")


def test_overlapping_or_single_codes_are_not_an_error(tmp_path: Path) -> None:
    # one shared value, or one value at a site, is not "coded differently"
    write(tmp_path / "a.csv", ["x,c,y", "1,red,0", "2,blue,1", "3,red,1"])
    write(tmp_path / "b.csv", ["x,c,y", "1,red,0", "2,green,1", "3,green,0"])
    write(tmp_path / "c.csv", ["x,c,y", "1,pink,0", "2,pink,1"])
    ds = load_csv(path=str(tmp_path / "*.csv"), target="y", seed=0, min_count=1)
    assert ds.feature_names == ("x", "c=blue", "c=green", "c=pink", "c=red")


def test_a_site_column_file_is_checked_per_site(tmp_path: Path) -> None:
    rows = ["site,sex,y", "a,M,0", "a,F,1", "a,M,1", "b,male,0", "b,female,1", "b,male,1"]
    path = write(tmp_path / "all.csv", rows)
    with pytest.raises(DataError, match=r"coded F, M at site 'a' but female, male at site 'b'"):
        load_csv(path=str(path), target="y", seed=0, site_column="site")
    # a per-site map applies to that site's rows only
    h = parse_harmonization({"site": {"a": {"map": {"sex": {"M": "male", "F": "female"}}}}})
    ds = load_csv(path=str(path), target="y", seed=0, site_column="site", harmonize=h,
                  min_count=1)  # tiny files: name every category
    assert ds.feature_names == ("sex=female", "sex=male")
    common = write(tmp_path / "common.csv", [rows[0], *recode(rows, 1, {"M": "male", "F": "female"})[1:]])
    assert_same(ds, load_csv(path=str(common), target="y", seed=0, site_column="site",
                             min_count=1))
    # and per-site units: only site b's rows are converted
    kg = write(tmp_path / "kg.csv", ["site,w,y", "a,70,0", "b,154,1", "a,80,1", "b,176,0"])
    table = apply(read_csv_table(kg), parse_harmonization(
        {"units": {"w": {"to": "kg"}}, "site": {"b": {"units": {"w": {"from": "lb"}}}}}),
        site_column="site")
    np.testing.assert_allclose(table.columns["w"].to_numpy(),
                               [70, 154 * 0.45359237, 80, 176 * 0.45359237], rtol=1e-15)
    h_bad = parse_harmonization({"site": {"c": {"map": {"sex": {"M": "male"}}}}})
    with pytest.raises(ConfigError, match=r"\[site\.c\].*the sites are a, b"):
        load_csv(path=str(path), target="y", seed=0, site_column="site", harmonize=h_bad)


# -- maps, renames and units on one table -------------------------------------------------------


def test_map_rewrites_codes_and_keeps_missing(tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", ["sex,smoker", "M,yes", " F ,no", "NA,yes", "1,", "1.0,no"])
    h = parse_harmonization({"map": {"sex": {"M": "male", "F": "female", "1": "male"},
                                     "smoker": {"yes": "1", "no": "0"}}})
    out = apply(read_csv_table(path), h)
    assert out.columns["sex"].to_pylist() == ["male", "female", None, "male", "male"]
    assert out.columns["smoker"].to_pylist() == ["1", "0", "1", None, "0"]


def test_an_unmapped_code_names_file_line_site_and_value(tmp_path: Path) -> None:
    path = write(tmp_path / "north.csv", ["sex,y", "M,0", "female,1", "U,0"])
    h = parse_harmonization({"map": {"sex": {"M": "male", "F": "female"}}})
    with pytest.raises(DataError) as err:
        apply(read_csv_table(path), h)
    text = str(err.value)
    assert "north.csv line 4 (site 'north'): column 'sex' holds 'U'" in text
    assert "common codes (female, male)" in text and '"U" = "<common code>"' in text
    # an identity entry, or [check] allow, accepts it
    ok = parse_harmonization({"map": {"sex": {"M": "male", "F": "female", "U": "U"}}})
    assert apply(read_csv_table(path), ok).columns["sex"].to_pylist() == ["male", "female", "U"]


def test_a_missing_target_code_makes_the_value_missing(tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", ["sex", "M", "9", "F"])
    h = parse_harmonization({"map": {"sex": {"M": "male", "F": "female", "9": ""}}})
    assert apply(read_csv_table(path), h).columns["sex"].to_pylist() == ["male", None, "female"]


def test_site_map_extends_and_overrides_the_global_one(tmp_path: Path) -> None:
    path = write(tmp_path / "east.csv", ["sex", "1", "2", "M"])
    h = parse_harmonization({"map": {"sex": {"M": "male", "F": "female", "1": "male"}},
                             "site": {"east": {"map": {"sex": {"1": "female", "2": "male"}}}}})
    table = read_csv_table(path)
    assert apply(table, h).columns["sex"].to_pylist() == ["female", "male", "male"]
    # another site's section does not apply here; the deployment names the site itself
    with pytest.raises(DataError, match="holds '2'"):
        apply(table, h, site="west")


def test_rename(tmp_path: Path, one_coding: Path) -> None:
    folder = tmp_path / "renamed"
    folder.mkdir()
    write(folder / "site_a.csv", ["Age,Sex,label", *recode(SITE_A, 1, {"M": "male", "F": "female"})[1:]])
    write(folder / "site_b.csv", SITE_B)
    h = parse_harmonization({"rename": {"Age": "age", "Sex": "sex"}})
    ds = load_csv(path=str(folder / "*.csv"), target="label", seed=0, harmonize=h)
    assert_same(ds, load_csv(path=str(one_coding / "*.csv"), target="label", seed=0))
    # a map names the column by its new name
    table = apply(read_csv_table(folder / "site_a.csv"),
                  parse_harmonization({"rename": {"Sex": "sex"}, "map": {"sex": {"male": "m"}},
                                       "check": {"allow": ["sex"]}}))
    assert table.names == ["Age", "sex", "label"]
    assert table.columns["sex"].to_pylist()[:2] == ["m", "female"]


def test_rename_and_map_errors_name_file_and_columns(tmp_path: Path) -> None:
    table = read_csv_table(write(tmp_path / "s.csv", ["age,sex", "1,M"]))
    with pytest.raises(DataError, match=r"'age' = 'sex'.*s\.csv has both columns"):
        apply(table, parse_harmonization({"rename": {"age": "sex"}}))
    swapped = apply(table, parse_harmonization({"rename": {"age": "sex", "sex": "age"}}))
    assert swapped.names == ["sex", "age"] and swapped.columns["age"].to_pylist() == ["M"]
    with pytest.raises(DataError, match=r"\[rename\] 'gender' = 'gndr'.*has neither column; columns "
                                        r"found: age, sex"):
        apply(table, parse_harmonization({"rename": {"gender": "gndr"}}))
    with pytest.raises(DataError, match=r"\[map\.gender\] names column 'gender', which .*s\.csv "
                                        r"does not have \(after renaming\); columns found: age, sex"):
        apply(table, parse_harmonization({"map": {"gender": {"M": "male"}}}))
    with pytest.raises(DataError, match=r"\[units\.weight\] names column 'weight'"):
        apply(table, parse_harmonization({"units": {"weight": {"from": "lb", "to": "kg"}}}))


@pytest.mark.parametrize(
    ("unit_from", "unit_to", "substance", "value", "expected"),
    [
        ("mmol/L", "mg/dL", "cholesterol", 5.0, 5.0 * 38.67),
        ("mg/dL", "mmol/L", "cholesterol", 38.67, 1.0),
        ("mmol/L", "mg/dL", "glucose", 1.0, 18.016),
        ("µmol/L", "mg/dL", "creatinine", 88.42, 1.0),
        ("umol/l", "mg/dl", "creatinine", 176.84, 2.0),
        ("lb", "kg", None, 100.0, 45.359237),
        ("kg", "lb", None, 0.45359237, 1.0),
        ("in", "cm", None, 10.0, 25.4),
        ("cm", "in", None, 254.0, 100.0),
        ("°F", "°C", None, 212.0, 100.0),
        ("F", "C", None, 32.0, 0.0),
        ("°C", "°F", None, 37.0, 98.6),
        ("K", "°C", None, 273.15, 0.0),
        ("g/L", "mg/dL", None, 2.0, 200.0),
    ],
)
def test_unit_conversions_by_hand(unit_from: str, unit_to: str, substance: str | None,
                                  value: float, expected: float, tmp_path: Path) -> None:
    table = read_csv_table(write(tmp_path / "s.csv", ["v", repr(value), "NA"]))
    entry: dict[str, Any] = {"from": unit_from, "to": unit_to}
    if substance:
        entry["substance"] = substance
    out = apply(table, parse_harmonization({"units": {"v": entry}})).columns["v"].to_pylist()
    assert out[1] is None
    assert math.isclose(out[0], expected, rel_tol=1e-12, abs_tol=1e-12)


def test_units_only_at_the_sites_that_declare_them(tmp_path: Path) -> None:
    mmol = [5.2, 6.1, 4.9, 5.5, 5.0, 6.3]
    mg = [201.0, 236.0, 190.0, 212.0, 199.0]
    labels_a, labels_b = [0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 1]
    mixed, common = tmp_path / "mixed", tmp_path / "common"
    mixed.mkdir()
    common.mkdir()
    write(mixed / "site_a.csv", ["chol,label", *(f"{v},{y}" for v, y in zip(mmol, labels_a))])
    write(mixed / "site_b.csv", ["chol,label", *(f"{v},{y}" for v, y in zip(mg, labels_b))])
    # the mmol/L site's values written in mg/dL, as the conversion computes them
    write(common / "site_a.csv", ["chol,label", *(f"{v * 38.67!r},{y}" for v, y in zip(mmol, labels_a))])
    write(common / "site_b.csv", ["chol,label", *(f"{v},{y}" for v, y in zip(mg, labels_b))])
    h = toml(tmp_path / "h.toml", '[units.chol]\nto = "mg/dL"\nsubstance = "cholesterol"\n\n'
                                  '[site.site_a.units.chol]\nfrom = "mmol/L"\n')
    converted = apply(read_csv_table(mixed / "site_a.csv"), load_harmonization(h))
    np.testing.assert_allclose(converted.columns["chol"].to_numpy(),
                               [201.084, 235.887, 189.483, 212.685, 193.35, 243.621], rtol=1e-12)
    untouched = apply(read_csv_table(mixed / "site_b.csv"), load_harmonization(h))
    assert untouched.columns["chol"].to_pylist() == ["201.0", "236.0", "190.0", "212.0", "199.0"]
    assert_same(load_csv(path=str(mixed / "*.csv"), target="label", seed=0, harmonize=h),
                load_csv(path=str(common / "*.csv"), target="label", seed=0))


def test_explicit_factor_and_a_unit_on_text_is_an_error(tmp_path: Path) -> None:
    table = read_csv_table(write(tmp_path / "s.csv", ["v,w", "2,3", "4,high"]))
    h = parse_harmonization({"units": {"v": {"factor": 10, "offset": 1}}})
    assert apply(table, h).columns["v"].to_pylist() == [21.0, 41.0]
    bad = parse_harmonization({"units": {"w": {"from": "kg", "to": "lb"}}})
    with pytest.raises(DataError, match=r"column 'w' holds 'high', not a number.*kg → lb"):
        apply(table, bad)


# -- the file's own errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[maps.sex]\nM = 'male'\n", r"unknown key 'maps' in the top level; expected one of rename, map"),
        ("[units.chol]\nform = 'mmol/L'\nto = 'mg/dL'\n", r"unknown key 'form' in \[units\.chol\]; "
                                                          r"expected one of from, to"),
        ("[units.chol]\nfrom = 'mmol/dl'\nto = 'mg/dL'\n", r"units\.chol\.from = 'mmol/dl' is not a "
                                                           r"unit consortium knows"),
        ("[units.chol]\nfrom = 'mmol/L'\nto = 'mg/dL'\n", r"depends on the substance; add substance ="),
        ("[units.chol]\nfrom = 'mmol/L'\nto = 'mg/dL'\nsubstance = 'chalk'\n", r"depends on the substance"),
        ("[units.w]\nfrom = 'kg'\nto = 'cm'\n", r"kg \(mass\) to cm \(length\), which measure different"),
        ("[site.a.units.w]\nfrom = 'kg'\n", r"\[site\.a\.units\.w\] says from = 'kg' but not which unit"),
        ("[units.w]\nfactor = 0\n", r"units\.w\.factor = 0 must be a finite number"),
        ("[map.sex]\nM = true\n", r"\[map\.sex\] 'M' = True: the common code must be a string"),
        ("[map.sex]\n'1' = 'male'\n'1.0' = 'female'\n", r"maps '1' and '1\.0', which are the same value"),
        ("[map]\nsex = 'male'\n", r"map\.sex must be a table"),
        ("[rename]\na = 'x'\nb = 'x'\n", r"gives 'a' and 'b' the same new name 'x'"),
        ("[rename]\na = ''\n", r"\[rename\] 'a' = '': the new name must be a non-empty string"),
        ("[site.a.rename]\nx = 'y'\n", r"\[site\.a\.rename\] is not supported"),
        ("[check]\nallow = 'sex'\n", r"\[check\] allow must be a list of column names"),
        ("[map.sex\nM = 'male'\n", r"cannot read .*h\.toml as TOML"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_harmonization(toml(tmp_path / "h.toml", text))


def test_a_missing_file_names_the_setting(tmp_path: Path, two_codings: Path) -> None:
    with pytest.raises(ConfigError, match=r"'absent\.toml' does not exist.*fix data\.harmonize"):
        load_csv(path=str(two_codings / "*.csv"), target="label", seed=0, harmonize="absent.toml")


def test_a_full_file_parses(tmp_path: Path) -> None:
    h = load_harmonization(toml(tmp_path / "h.toml", (
        '[rename]\n"Sex" = "sex"\n\n[map.sex]\nM = "male"\n"1" = "male"\nF = 2\n\n'
        '[units.chol]\nto = "mg/dL"\nsubstance = "cholesterol"\n\n'
        '[units.temp]\nfrom = "degF"\nto = "celsius"\n\n'
        '[site.hungary.units.chol]\nfrom = "mmol/L"\n\n[site.hungary.map.sex]\n"0" = "female"\n\n'
        '[check]\nallow = ["notes"]\n')))
    assert isinstance(h, Harmonization)
    assert h.rename == {"Sex": "sex"}
    assert h.maps["sex"] == {"M": "male", "1": "male", "F": "2"}
    assert h.units["chol"] is None and h.unit_names == {"chol": "mg/dL", "temp": "°C"}
    temp = h.units["temp"]
    assert temp is not None and math.isclose(temp.factor, 5 / 9) and math.isclose(temp.offset, -160 / 9)
    chol = h.site_units["hungary"]["chol"]
    assert chol is not None and chol.factor == 38.67 and chol.offset == 0.0
    assert h.sites == {"hungary"} and h.allow == {"notes"}
    assert h.codes("sex") == {"male": "male", "2": "2", "female": "female"}


# -- check_schemas: every kind of finding -------------------------------------------------------


def test_check_schemas_finds_each_difference(tmp_path: Path) -> None:
    a = read_csv_table(write(tmp_path / "a.csv", [
        "sex,chol,grade,notes,id",
        *(f"{s},{c},{g},,{i}" for s, c, g, i in
          zip("MFMFMF", [5.2, 6.1, 4.9, 5.5, 5.0, 6.3], ["1", "2", "3", "1", "2", "3"], range(6))),
    ]))
    b = read_csv_table(write(tmp_path / "b.csv", [
        "sex,chol,grade,notes,extra",
        *(f"{s},{c},{g},{n},x" for s, c, g, n in
          zip(["male", "female"] * 3, [201, 236, 190, 212, 199, 220], ["low", "high"] * 3, "abcdef")),
    ]))
    findings = check_schemas({"a": a, "b": b})
    kinds = [(f.kind, f.column, f.severity) for f in findings]
    assert set(kinds[:4]) == {("missing_column", "id", "error"), ("missing_column", "extra", "error"),
                              ("codes", "sex", "error"), ("codes", "grade", "error")}
    assert set(kinds[4:]) == {("empty", "notes", "warning"), ("units", "chol", "warning")}
    units = next(f for f in findings if f.kind == "units")
    assert "mmol/L → mg/dL (cholesterol)" in units.detail and set(units.sites) == {"a", "b"}
    # declared units narrow the suspicion; allow silences the codes
    quiet = check_schemas({"a": a, "b": b}, allow=["sex", "grade"], units={"chol": "kg"})
    assert {f.kind for f in quiet} == {"missing_column", "empty"}


def test_type_difference_without_a_coding_is_a_warning(tmp_path: Path) -> None:
    a = read_csv_table(write(tmp_path / "a.csv", ["v", *(str(i) for i in range(60))]))
    b = read_csv_table(write(tmp_path / "b.csv", ["v", "low", "high", "low"]))
    (finding,) = check_schemas({"a": a, "b": b})
    assert (finding.kind, finding.severity, finding.sites) == ("type", "warning", ("b",))
    assert "numbers at site 'a' but text at site 'b'" in finding.detail


def test_check_schemas_from_summaries_matches_tables(tmp_path: Path) -> None:
    from consortium.data.preprocess import Column, summarize_site

    tables = {
        "a": read_csv_table(write(tmp_path / "a.csv", ["age,sex", "30,M", "40,F"])),
        "b": read_csv_table(write(tmp_path / "b.csv", ["age,sex", "31,male", "41,female"])),
    }
    columns = [Column("age", "numeric"), Column("sex", "categorical")]
    profiles = {}
    for name, table in tables.items():
        raw = np.array([[float(v), s] for v, s in zip(table.columns["age"].to_pylist(),
                                                      table.columns["sex"].to_pylist())], dtype=object)
        summary = summarize_site(raw, columns=columns)
        profiles[name] = site_schema_from_summary(["age", "sex"], [True, False], summary)
    assert [f.detail for f in check_schemas(profiles)] == [f.detail for f in check_schemas(tables)]


# -- the deployed site and the server --------------------------------------------------------------


def test_a_site_reads_its_own_file_harmonised(tmp_path: Path) -> None:
    path = write(tmp_path / "export_2024.csv", SITE_A)
    h = parse_harmonization({"map": {"sex": {"M": "male", "F": "female"}},
                             "site": {"budapest": {"map": {"sex": {"M": "female", "F": "male"}}}}})
    table = read_site_table(path, target="label", harmonize=h, site="budapest")
    x, _, _, _ = table.split(classes=[0, 1], seed=0, test_fraction=0.25)
    assert set(x[:, 1]) == {"male", "female"}
    assert table.features == ("age", "sex") and table.numeric == (True, False)


def test_the_server_refuses_a_second_coding(tmp_path: Path) -> None:
    pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
    import asyncio

    from consortium.data.preprocess import Column, summarize_site
    from consortium.deploy.hub import Hub
    from consortium.deploy.summary import TableSchema

    def describe(lines: list[str], harmonize: Harmonization | None = None) -> tuple[Any, TableSchema]:
        path = write(tmp_path / "site.csv", lines)
        table = read_site_table(path, target="label", harmonize=harmonize)
        x, _, x_test, _ = table.split(classes=sorted(table.labels), seed=0,
                                      test_fraction=0.25)
        columns = [Column(c, "numeric" if n else "categorical")
                   for c, n in zip(table.features, table.numeric)]
        return (summarize_site(x, columns=columns, holdout=x_test),
                TableSchema(table.features, table.numeric, table.labels))

    def hub(config: str = "") -> Hub:
        return Hub(asyncio.new_event_loop(), config_toml=config, run_id="t", max_result_bytes=1,
                   summaries_expected=3)

    plain = hub()
    assert plain.submit_summary(plain.register("a"), *describe(SITE_A)) is None
    refused = plain.submit_summary(plain.register("b"), *describe([*SITE_B, "62,male,2"]))
    assert refused is not None
    assert "column 'sex' is coded F, M at site 'a' but female, male at site 'b'" in refused
    assert plain.schema.labels == {0, 1}  # b's refused summary left not even its label 2
    # harmonised at the site, the codes agree
    mapped = parse_harmonization({"map": {"sex": {"M": "male", "F": "female"}}})
    again = hub()
    assert again.submit_summary(again.register("a"), *describe(SITE_A, mapped)) is None
    assert again.submit_summary(again.register("b"), *describe(SITE_B, mapped)) is None
    # [check] allow in the experiment's harmonisation file, read by the server
    h = toml(tmp_path / "h.toml", '[check]\nallow = ["sex"]\n')
    allowed = hub(f'[data]\nharmonize = {json.dumps(str(h))}\n')
    assert allowed.allow_codes == {"sex"}
    assert allowed.submit_summary(allowed.register("a"), *describe(SITE_A)) is None
    assert allowed.submit_summary(allowed.register("b"), *describe(SITE_B)) is None


# -- the command --------------------------------------------------------------------------------


def test_consortium_run_with_harmonize(two_codings: Path, tmp_path: Path, capsys) -> None:
    from consortium.cli import main

    h = toml(tmp_path / "harmonize.toml", SEX_MAP)
    args = ["run", "--no-progress", "--set", "rounds=2", "--set", 'data.dataset="csv"',
            "--set", f"data.path={json.dumps(str(two_codings / '*.csv'))}",
            "--set", 'data.target="label"', "--set", "evaluation.baselines=[]",
            "--set", "sampling.clients_per_round=2"]
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    assert "column 'sex' is coded F, M at site 'site_a'" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main([*args, "--set", f"data.harmonize={json.dumps(str(h))}", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    assert "harmonize.toml" in (out / "config.toml").read_text()
