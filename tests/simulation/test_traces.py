"""Device and availability traces: synthetic ones repeat for a seed, files load strictly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from consortium.config import SimulationConfig
from consortium.errors import ConfigError
from consortium.server.traces import (
    IntervalTrace,
    load_availability,
    load_profiles,
    make_availability,
    make_profiles,
)

IDS = [f"c{i}" for i in range(2000)]


def test_synthetic_traces_repeat_for_a_seed_and_change_with_it() -> None:
    sim = SimulationConfig(availability="diurnal", speeds="fedscale", slow_fraction=0.3)
    a, b, c = (make_profiles(IDS, sim, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.speed, b.speed) and not np.array_equal(a.speed, c.speed)
    x, y = make_availability(IDS, sim, seed=0), make_availability(IDS, sim, seed=0)
    assert np.array_equal(x.until(1234.5), y.until(1234.5))


def test_fedscale_speeds_are_heavy_tailed_around_the_median() -> None:
    p = make_profiles(IDS, SimulationConfig(speeds="fedscale", speed=100.0), seed=0)
    assert np.median(p.speed) == pytest.approx(100.0, rel=0.1)
    assert np.quantile(p.speed, 0.95) / np.quantile(p.speed, 0.05) > 5
    assert p.speed.mean() > np.median(p.speed)  # log-normal: right-skewed


def test_slow_fraction_makes_that_share_slow_factor_times_slower() -> None:
    p = make_profiles(IDS, SimulationConfig(slow_fraction=0.3, slow_factor=10.0), seed=0)
    slow = p.speed < 1000.0
    assert slow.sum() == 600
    assert np.allclose(p.speed[slow], 100.0) and np.allclose(p.up[slow], 1.25e5)


def test_diurnal_availability_is_online_the_duty_share() -> None:
    av = make_availability(IDS, SimulationConfig(availability="diurnal", duty=0.5), seed=0)
    for t in (0.0, 3600.0, 50000.0):
        assert (av.until(t) > t).mean() == pytest.approx(0.5, abs=0.05)
    up = av.until(7200.0)
    on = up > 7200.0
    assert ((up[on] - 7200.0) <= 0.5 * 86400 + 1e-6).all()


def test_availability_file_merges_wraps_and_is_checked(tmp_path) -> None:
    f = tmp_path / "avail.csv"
    f.write_text("client,start,end\na,0,10\na,10,20\na,25,30\nb,5,30\nzz,0,1\nb,0,2\n")
    tr = load_availability(str(f), ["a", "b"])
    assert isinstance(tr, IntervalTrace) and tr.horizon == 30.0
    np.testing.assert_allclose(tr.until(1.0), [20.0, 2.0])  # [0,10) and [10,20) merged
    np.testing.assert_allclose(tr.until(3.0), [20.0, -np.inf])
    # the trace repeats after its horizon: an interval ending there runs on into the replay's
    np.testing.assert_allclose(tr.until(22.0), [-np.inf, 32.0])
    np.testing.assert_allclose(tr.until(27.0), [50.0, 32.0])
    np.testing.assert_allclose(tr.until(33.0), [50.0, -np.inf])
    assert tr.next_online(21.0) == 21.0 and load_availability(str(f), ["a"]).next_online(21.0) == 25.0
    with pytest.raises(ConfigError, match="no row for 1 client"):
        load_availability(str(f), ["a", "b", "q"])
    bad = tmp_path / "bad.csv"
    bad.write_text("client,start,end\na,5,5\n")
    with pytest.raises(ConfigError, match="row 1"):
        load_availability(str(bad), ["a"])
    cols = tmp_path / "cols.csv"
    cols.write_text("client,begin,end\na,0,5\n")
    with pytest.raises(ConfigError, match="lacks the column"):
        load_availability(str(cols), ["a"])


def test_speeds_file_csv_and_parquet(tmp_path) -> None:
    table = pa.table({"client": ["1", "2"], "speed": [10.0, 20.0], "bandwidth": [1e3, 2e3],
                      "latency": [0.1, 0.2]})
    pq.write_table(table, tmp_path / "s.parquet")
    p = load_profiles(str(tmp_path / "s.parquet"), ["2", "1"])
    np.testing.assert_allclose(p.speed, [20.0, 10.0])
    np.testing.assert_allclose(p.latency, [0.2, 0.1])
    (tmp_path / "s.csv").write_text("client,speed,bandwidth\n1,10,1000\n2,0,5\n")
    with pytest.raises(ConfigError, match="> 0"):
        load_profiles(str(tmp_path / "s.csv"), ["1", "2"])
    with pytest.raises(ConfigError, match="neither a built-in trace nor a file"):
        make_profiles(["1"], SimulationConfig(speeds="nowhere.csv"), seed=0)
