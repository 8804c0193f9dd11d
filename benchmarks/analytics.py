"""Cost of a federated Table 1 (issue 15): 100 simulated sites × 10,000 rows × 20 columns.

What runs: ``consortium analyze`` as a user runs it — a subprocess on a Parquet file with a
``site`` column (1,000,000 rows: 12 numeric columns, 4 integer-coded and 4 text categorical
columns, 2 % missing) — whole process, with its peak RSS; and, in process, the two phases alone
(profile + describe at every site, agree + combine at the server) with the tables already read,
beside the pooled computation a data scientist would run on the concatenated table
(``pyarrow`` → numpy: mean, sd, quartiles, counts per column), which federation must not be far
behind.

Run:  PYTHONPATH=src python benchmarks/analytics.py [--sites 100] [--rows 10000] [--repeats 3]
Writes benchmarks/results/analytics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_parquet(path: Path, sites: int, rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n = sites * rows
    cols: dict[str, object] = {"site": np.repeat([f"site{i:03d}" for i in range(sites)], rows)}
    shift = np.repeat(rng.normal(0, 0.3, sites), rows)
    for j in range(12):
        x = rng.normal(50 + 5 * j, 10, n) + 10 * shift
        x[rng.random(n) < 0.02] = np.nan
        cols[f"num{j}"] = x
    for j in range(4):
        cols[f"code{j}"] = rng.integers(0, 3 + j, n).astype(np.int64)
    for j in range(4):
        cols[f"text{j}"] = rng.choice(np.array(["low", "mid", "high", "none"][: 2 + j % 3]), n)
    pq.write_table(pa.table(cols), path)


def run_cli(path: Path, out: Path) -> dict[str, float]:
    cfg = out.parent / "analyze.toml"
    cfg.write_text(
        f'[data]\ndataset = "parquet"\npath = "{path}"\nsite_column = "site"\n'
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "consortium.cli", "analyze",
         str(cfg), "--out", str(out)],
        env=env, capture_output=True, text=True, check=True,
    )
    wall = time.perf_counter() - start
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024}


def in_process(path: Path, repeats: int) -> dict[str, float]:
    from consortium.analytics.analysis import in_process as sites_in_process
    from consortium.analytics.analysis import run_query
    from consortium.analytics.query import Query
    from consortium.analytics.sources import site_tables
    from consortium.config import DataConfig

    t0 = time.perf_counter()
    tables = site_tables(DataConfig(dataset="parquet", path=str(path), site_column="site"))
    read_s = time.perf_counter() - t0
    q = Query()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_query(sites_in_process(tables, q), q)
        best = min(best, time.perf_counter() - t0)
    return {"read_and_split_s": read_s, "federated_s": best}


def pooled(path: Path, repeats: int) -> float:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        table = pq.read_table(path)
        for name in table.column_names:
            col = table.column(name)
            if name.startswith("num"):
                x = col.to_numpy()
                x = x[~np.isnan(x)]
                x.mean(), x.std(ddof=1), np.quantile(x, [0.25, 0.5, 0.75])
            else:
                pc.value_counts(col)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sites.parquet"
        make_parquet(path, args.sites, args.rows)
        size_mb = path.stat().st_size / 2**20
        cli = run_cli(path, Path(tmp) / "out")
        inner = in_process(path, args.repeats)
        pool = pooled(path, args.repeats)
    rows = [
        ("consortium analyze (subprocess, whole process)", f"{cli['wall_s']:.2f} s",
         f"{cli['peak_rss_mb']:.0f} MB"),
        ("  read + split by site (in process)", f"{inner['read_and_split_s']:.2f} s", ""),
        ("  profile + describe + combine, 100 sites", f"{inner['federated_s']:.2f} s", ""),
        ("pooled numpy/pyarrow on the concatenated table", f"{pool:.2f} s", ""),
    ]
    print(f"{args.sites} sites × {args.rows:,} rows × 20 columns ({size_mb:.1f} MB Parquet)")
    for r in rows:
        print(f"{r[0]:<50} {r[1]:>9} {r[2]:>9}")
    print(f"federated / pooled (in process): {inner['federated_s'] / pool:.1f}×")
    out = Path(__file__).parent / "results" / "analytics.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "sites": args.sites, "rows_per_site": args.rows, "columns": 20,
        "parquet_mb": size_mb, "cli": cli, "in_process": inner, "pooled_s": pool,
        "command": "PYTHONPATH=src python benchmarks/analytics.py",
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
