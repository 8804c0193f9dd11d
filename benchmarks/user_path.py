"""The user's path: `consortium run` on the user's own files, beside a plain PyTorch loop.

benchmarks/simulation.py hands packed tensors to ``simulate``; a user starts from a file.
Here W1 (FedProx Synthetic(1, 1), 60 features, 10 classes, per-client sizes
``max(10, LogNormal(ln 50 − ½, 1))``, as in simulation.py) is written as the user would hold
it — one Parquet file with a ``site`` column, or one CSV file per site — and each system
runs as its own process from that file:

- ``consortium``: ``consortium run experiment.toml`` (logistic, FedAvg, 10 % of clients a
  round, 1 local epoch, batch 10, lr 0.01, 20 rounds, test fraction 0.2, evaluated once at
  the end, no baselines: the same work as the plain loop);
- ``plain``: what a researcher writes instead: read the file with pyarrow, standardise,
  group rows by site, split 80/20 per site, then FedAvg with clients in sequence;
- ``load``: ``load_parquet`` / ``load_csv`` alone (read, infer, encode, pack).

Each reports the whole process's wall time and peak RSS (``getrusage(RUSAGE_CHILDREN)`` of a
fresh wrapper process, so one child each). Threads are pinned to one (OMP/MKL) because the
machine is shared. ``--src`` runs consortium from another source tree (e.g. an export of
main, for "before"). ``--big`` adds the load + encode time of a 10-million-row, 30-column
Parquet file (28 features: 25 float with 1 % missing, 1 integer, 2 text; a site column of
100 sites; a label).

Run:  python benchmarks/user_path.py                       # N = 1,000 and 10,000, and --big
      python benchmarks/user_path.py --n 1000 --no-big --src /tmp/main/src --out before.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FEATURES = [f"x{i}" for i in range(60)]
SETTINGS = {"rounds": 20, "fraction": 0.1, "local_epochs": 1, "batch_size": 10, "lr": 0.01,
            "test_fraction": 0.2}


# -- data --------------------------------------------------------------------------------------


def write_w1(n: int, out: Path, *, fmt: str) -> Path:
    """W1 at ``n`` clients as one Parquet file with a site column, or one CSV file per site.
    Returns what ``data.path`` points at."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT / "src"))
    from consortium.data.synthetic import load_synthetic

    rng = np.random.default_rng(0)
    sizes = np.maximum(10, rng.lognormal(math.log(50) - 0.5, 1.0, n).astype(int))
    ds = load_synthetic(alpha=1.0, beta=1.0, num_clients=n, seed=0, sizes=sizes.tolist(),
                        test_fraction=0.2)
    packed = ds.packed()
    x = np.concatenate([packed.train.x.numpy(), packed.test.x.numpy()]).astype(np.float64)
    y = np.concatenate([packed.train.y.numpy(), packed.test.y.numpy()])
    site = np.concatenate([np.repeat(np.arange(n), np.diff(o.numpy()))
                           for o in (packed.train_offsets, packed.test_offsets)])
    order = np.argsort(site, kind="stable")  # a site's rows together, as an extract holds them
    table = pa.table({"site": [f"s{v}" for v in site[order]],
                      **{f: x[order, i] for i, f in enumerate(FEATURES)}, "label": y[order]})
    if fmt == "parquet":
        path = out / f"w1-{n}.parquet"
        if not path.exists():
            pq.write_table(table, path)
        return path
    folder = out / f"w1-{n}-csv"
    if not folder.exists():
        folder.mkdir(parents=True)
        bounds = np.cumsum([0, *np.bincount(site[order], minlength=n)])
        body = table.drop_columns(["site"])
        for s in range(n):
            pcsv.write_csv(body.slice(bounds[s], bounds[s + 1] - bounds[s]),
                           folder / f"s{s}.csv")
    return folder


def write_big(out: Path, rows: int = 10_000_000) -> Path:
    """The 10-million-row, 30-column Parquet file (written once, in row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = out / f"big-{rows}.parquet"
    if path.exists():
        return path
    rng = np.random.default_rng(1)
    schema = None
    writer = None
    step = 1_000_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        cols = {"site": pa.array(rng.integers(0, 100, n).astype(str))}
        for i in range(25):
            v = rng.normal(i, 1 + i, n)
            v[rng.random(n) < 0.01] = np.nan
            cols[f"f{i}"] = pa.array(v)
        cols["count"] = pa.array(rng.integers(0, 50, n))
        cols["colour"] = pa.array(rng.choice(["red", "green", "blue", "grey"], n))
        cols["grade"] = pa.array(rng.choice(["a", "b", "c", "d", "e", "f"], n))
        cols["label"] = pa.array(rng.integers(0, 2, n))
        batch = pa.table(cols)
        if writer is None:
            schema = batch.schema
            writer = pq.ParquetWriter(path, schema)
        writer.write_table(batch)
    assert writer is not None
    writer.close()
    return path


# -- workers: each runs in its own process and prints one JSON line -----------------------------


def _experiment(n: int, fmt: str, path: Path) -> str:
    s = SETTINGS
    site = 'site_column = "site"\n' if fmt == "parquet" else ""
    return (
        f'name = "w1-{n}-{fmt}"\nseed = 0\nrounds = {s["rounds"]}\n\n'
        f'[data]\ndataset = "{fmt}"\npath = "{path}"\ntarget = "label"\n{site}'
        f'test_fraction = {s["test_fraction"]}\n\n[model]\nname = "logistic"\n\n'
        f'[algorithm]\nname = "fedavg"\nlocal_epochs = {s["local_epochs"]}\n'
        f'batch_size = {s["batch_size"]}\nlr = {s["lr"]}\n\n'
        f'[sampling]\nclients_per_round = {max(1, math.ceil(s["fraction"] * n))}\n\n'
        f'[evaluation]\nbaselines = []\nevery = {s["rounds"]}\n'
    )


def worker_load(fmt: str, path: str) -> dict:
    from consortium.data.files import load_csv, load_parquet

    start = time.perf_counter()
    if fmt == "parquet":
        ds = load_parquet(path=path, target="label", seed=0, site_column="site",
                          test_fraction=SETTINGS["test_fraction"])
    else:
        ds = load_csv(path=path, target="label", seed=0, test_fraction=SETTINGS["test_fraction"])
    packed = ds.packed()
    return {"load_s": time.perf_counter() - start, "clients": len(packed),
            "rows": len(packed.train) + len(packed.test), "features": ds.input_shape[0]}


def worker_plain(fmt: str, path: str) -> dict:
    """A researcher's own loop over the same file: no framework, same FedAvg arithmetic."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(1)
    if fmt == "parquet":
        table = pq.read_table(path)
        site_col = table.column("site").to_numpy()
        _, site = np.unique(site_col, return_inverse=True)
    else:
        files = sorted(Path(path).glob("*.csv"))
        parts = [pcsv.read_csv(f) for f in files]
        site = np.repeat(np.arange(len(parts)), [p.num_rows for p in parts])
        table = pa.concat_tables(parts)
    x = np.stack([table.column(f).to_numpy() for f in FEATURES], axis=1)
    x = ((x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)).astype(np.float32)
    y = table.column("label").to_numpy().astype(np.int64)
    # group by site and hold out 20 % of each site's rows at random
    rng = np.random.default_rng(0)
    order = np.lexsort((rng.random(len(y)), site))
    counts = np.bincount(site)
    starts = np.cumsum([0, *counts])[:-1]
    rank = np.arange(len(y)) - np.repeat(starts, counts)
    held = rank < np.repeat(np.maximum(1, np.round(counts * 0.2)).astype(int), counts)
    train_rows, test_rows = order[~held], order[held]
    n = len(counts)
    train_site = site[train_rows]
    off = np.cumsum([0, *np.bincount(train_site, minlength=n)])
    xt, yt = torch.from_numpy(x[train_rows]), torch.from_numpy(y[train_rows])

    torch.manual_seed(0)
    model = torch.nn.Linear(60, 10)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    k = max(1, math.ceil(SETTINGS["fraction"] * n))
    gen = torch.Generator().manual_seed(0)
    bs, lr = SETTINGS["batch_size"], SETTINGS["lr"]
    for _ in range(SETTINGS["rounds"]):
        total = {name: torch.zeros_like(v) for name, v in global_state.items()}
        weight = 0
        for i in rng.choice(n, size=k, replace=False):
            a, b = int(off[i]), int(off[i + 1])
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            for _ in range(SETTINGS["local_epochs"]):
                perm = torch.randperm(b - a, generator=gen) + a
                for s in range(0, b - a, bs):
                    idx = perm[s : s + bs]
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
                    opt.step()
            for name, v in model.state_dict().items():
                total[name] += (b - a) * v
            weight += b - a
        global_state = {name: v / weight for name, v in total.items()}
    model.load_state_dict(global_state)
    with torch.no_grad():
        pred = model(torch.from_numpy(x[test_rows])).argmax(1).numpy()
    return {"accuracy": float((pred == y[test_rows]).mean())}


def measure(cmd: list[str], env: dict[str, str]) -> None:
    """Run ``cmd``; print its wall time and peak RSS (this wrapper's only child)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    out = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0:
        out["error"] = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    out.update(process_s=wall, peak_rss_mb=rss)
    print(json.dumps(out))


# -- orchestration -----------------------------------------------------------------------------


def run(system: str, fmt: str, n: int, path: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(args.src).resolve()), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    if system == "consortium":
        run_dir = Path(args.work) / f"run-{fmt}-{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        toml = Path(args.work) / f"w1-{n}-{fmt}.toml"
        toml.write_text(_experiment(n, fmt, path))
        cmd = [sys.executable, "-c", "import sys; from consortium.cli import main; "
               "sys.exit(main(sys.argv[1:]))", "run", str(toml), "--out", str(run_dir)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, fmt, str(path)]
    wrapped = [sys.executable, str(Path(__file__).resolve()), "--measure", "--", *cmd]
    proc = subprocess.run(wrapped, env=env, capture_output=True, text=True, check=False)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if system == "consortium" and "error" not in out:
        summary = json.loads((run_dir / "summary.json").read_text())
        out["accuracy"] = summary["final"].get("accuracy")
    out.update(system=system, format=fmt, clients=n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1000,10000", help="W1 client counts (Parquet)")
    parser.add_argument("--csv-n", default="1000", help="W1 client counts as CSV per site")
    parser.add_argument("--systems", default="consortium,plain,load")
    parser.add_argument("--src", default=str(ROOT / "src"), help="consortium source tree")
    parser.add_argument("--work", default=str(HERE / "out" / "user_path"))
    parser.add_argument("--out", default=str(HERE / "results" / "user_path.json"))
    parser.add_argument("--big", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--worker", nargs=3, metavar=("SYSTEM", "FORMAT", "PATH"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.cmd, dict(os.environ))
        return
    if args.worker:
        system, fmt, path = args.worker
        result = worker_load(fmt, path) if system == "load" else worker_plain(fmt, path)
        print(json.dumps(result))
        return

    work = Path(args.work)
    (work / "data").mkdir(parents=True, exist_ok=True)
    systems = [s for s in args.systems.split(",") if s]
    cases = [("parquet", int(v)) for v in args.n.split(",") if v]
    cases += [("csv", int(v)) for v in args.csv_n.split(",") if v]
    header = (f"{'format':<8} {'N':>6}  {'system':<11} {'process s':>9} {'load s':>7} "
              f"{'RSS MB':>7} {'accuracy':>8} {'plain/this':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    for fmt, n in cases:
        path = write_w1(n, work / "data", fmt=fmt)
        results = {s: run(s, fmt, n, path, args) for s in systems}
        plain = results.get("plain", {}).get("process_s")
        for s in systems:
            r = results[s]
            rows.append(r)
            if "error" in r:
                print(f"{fmt:<8} {n:>6}  {s:<11} failed: {r['error'][:100]}")
                continue
            r["speedup_vs_plain"] = plain / r["process_s"] if plain and s != "load" else None
            acc, load, ratio = r.get("accuracy"), r.get("load_s"), r["speedup_vs_plain"]
            print(f"{fmt:<8} {n:>6}  {s:<11} {r['process_s']:>9.2f} "
                  f"{'—' if load is None else format(load, '>7.2f'):>7} {r['peak_rss_mb']:>7.0f} "
                  f"{'—' if acc is None else format(acc, '>8.3f'):>8} "
                  f"{'—' if ratio is None else format(ratio, '>9.1f') + '×':>10}")
    if args.big:
        path = write_big(work / "data")
        r = run("load", "parquet", 100, path, args)
        r.update(case="10M rows x 30 columns")
        rows.append(r)
        print(f"\n10M rows × 30 columns, Parquet: load + encode {r.get('load_s', float('nan')):.1f} s "
              f"in-process, {r['process_s']:.1f} s whole process, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"{r.get('error', '')}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                                          "src": args.src, "results": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
