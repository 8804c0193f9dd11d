"""Simulation speed: consortium's executors beside a plain PyTorch loop, Flower and a centralised pass.

Workloads (issue 3, fixed so anyone can rerun them):

- W1: FedProx Synthetic(1, 1), 60 features, 10 classes; per-client sizes
  ``max(10, LogNormal(ln 50 − ½, 1))`` (mean ≈ 50), 80/20 train/test per client, seed 0;
  logistic regression; FedAvg weighted by samples; 10 % of clients a round, 1 local epoch,
  batch 10, SGD lr 0.01, 20 rounds; N = 100, 1,000, 10,000 clients.
- W2: ``cnn`` on ``digits``, Dirichlet(0.3) over 100 clients, 10 a round, 1 local epoch,
  batch 16, SGD lr 0.05, 30 rounds.

The user's path — the same W1 written as a Parquet file (and as CSV files), loaded by
`consortium run` itself — is benchmarks/user_path.py.

Every system runs in its own process (so peak RSS and start-up are its own), on the same
data file, and reports the wall time of its training phase (rounds only: no evaluation, no
data loading), the whole process's wall time, peak RSS and the final global model's accuracy
on every client's test rows. Ratios are taken within one run, because this machine is shared.

Run:  python benchmarks/simulation.py                      # everything (Flower set up on first use)
      python benchmarks/simulation.py --workloads w1 --n 1000 --systems vectorized,plain
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEMS = ("vectorized", "sequential", "plain", "flower", "central")
LABELS = {
    "vectorized": "consortium vectorised",
    "sequential": "consortium sequential",
    "plain": "plain PyTorch loop",
    "flower": "Flower simulation",
    "central": "centralised pass",
}


# -- data --------------------------------------------------------------------------------------


def make_data(workload: str, n: int, out: Path) -> Path:
    """Write the workload's data and settings to an .npz file that every system reads."""
    sys.path.insert(0, str(ROOT / "src"))
    from consortium.data.sklearn_sets import load_digits
    from consortium.data.synthetic import load_synthetic

    if workload == "w1":
        rng = np.random.default_rng(0)
        sizes = np.maximum(10, rng.lognormal(math.log(50) - 0.5, 1.0, n).astype(int))
        ds = load_synthetic(alpha=1.0, beta=1.0, num_clients=n, seed=0, sizes=sizes.tolist(),
                            test_fraction=0.2)
        meta = {"model": "logistic", "rounds": 20, "fraction": 0.1, "local_epochs": 1,
                "batch_size": 10, "lr": 0.01}
    else:
        ds = load_digits(num_clients=n, seed=0, partition="dirichlet", alpha=0.3)
        meta = {"model": "cnn", "rounds": 30, "fraction": 0.1, "local_epochs": 1,
                "batch_size": 16, "lr": 0.05}
    packed = ds.packed()
    from consortium.seeds import derive_seed

    meta.update(
        workload=workload, clients=n, clients_per_round=max(1, math.ceil(meta["fraction"] * n)),
        input_shape=list(ds.input_shape), num_classes=ds.num_classes, seed=0,
        # the initial weights every system starts from: what consortium.simulate uses
        init_seed=derive_seed(0, "init") % 2**31,
    )
    path = out / f"{workload}-{n}.npz"
    np.savez(
        path,
        x_train=packed.train.x.numpy(), y_train=packed.train.y.numpy(),
        train_offsets=packed.train_offsets.numpy(),
        x_test=packed.test.x.numpy(), y_test=packed.test.y.numpy(),
        test_offsets=packed.test_offsets.numpy(),
        meta=np.array(json.dumps(meta)),
    )
    return path


def load_npz(path: str):  # type: ignore[no-untyped-def]
    data = np.load(path)
    return data, json.loads(str(data["meta"]))


# -- workers: each runs in its own process and prints one JSON line -----------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss
    over from the parent across exec, which would charge the orchestrator's data to every
    worker."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_torch_model(meta: dict):  # type: ignore[no-untyped-def]
    """The model every system starts from: same architecture, same initial weights."""
    sys.path.insert(0, str(ROOT / "src"))
    from consortium.models import build_model

    return build_model(
        meta["model"], tuple(meta["input_shape"]), meta["num_classes"], seed=meta["init_seed"]
    )


def pooled_accuracy(model, data) -> float:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        x = torch.from_numpy(data["x_test"])
        y = torch.from_numpy(data["y_test"])
        return float((model(x).argmax(1) == y).double().mean())


def worker_consortium(kind: str, path: str) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    import consortium
    from consortium.data.base import FederatedDataset, PackedClients, Split
    from consortium.executors import build_executor

    data, meta = load_npz(path)
    offsets_train = torch.from_numpy(data["train_offsets"])
    packed = PackedClients(
        [str(i) for i in range(len(offsets_train) - 1)],
        train=Split(torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])),
        test=Split(torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])),
        train_offsets=offsets_train, test_offsets=torch.from_numpy(data["test_offsets"]),
    )
    dataset = FederatedDataset("bench", packed, meta["num_classes"], tuple(meta["input_shape"]))
    inner = build_executor(kind)
    timer = {"eval": 0.0}

    class Timed:
        """Times evaluation so that the training phase excludes it."""

        name = inner.name

        def fit(self, tasks, clients):  # type: ignore[no-untyped-def]
            return inner.fit(tasks, clients)

        def evaluate(self, tasks, clients):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            out = list(inner.evaluate(tasks, clients))
            timer["eval"] += time.perf_counter() - start
            return iter(out)

        def close(self) -> None:
            inner.close()

    config = {
        "seed": 0, "rounds": meta["rounds"],
        "model": {"name": meta["model"]},
        "algorithm": {"name": "fedavg", "local_epochs": meta["local_epochs"],
                      "batch_size": meta["batch_size"], "lr": meta["lr"]},
        "sampling": {"clients_per_round": meta["clients_per_round"]},
        "evaluation": {"every": meta["rounds"]},
    }
    result = consortium.simulate(config, dataset=dataset, executor=Timed())
    train_s = sum(r["wall_s"] for r in result.history) - timer["eval"]
    return {"train_s": train_s, "accuracy": pooled_accuracy(result.model, data)}


def _participants(meta: dict, n: int) -> list[np.ndarray]:
    """Each round's clients, drawn as consortium draws them, so every system trains on the
    same clients in the same rounds (only batch order differs)."""
    sys.path.insert(0, str(ROOT / "src"))
    from consortium.server.sampling import UniformSampler

    sampler = UniformSampler(count=meta["clients_per_round"])
    ids = [str(i) for i in range(n)]
    return [
        np.array([int(c) for c in sampler.sample(r, ids, seed=meta["seed"])])
        for r in range(1, meta["rounds"] + 1)
    ]


def worker_plain(path: str) -> dict:
    """What a researcher writes instead of using a framework: clients in sequence, same math."""
    import torch

    data, meta = load_npz(path)
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    off = data["train_offsets"]
    n = len(off) - 1
    model = build_torch_model(meta)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    rounds = _participants(meta, n)
    gen = torch.Generator().manual_seed(0)
    loss_fn = torch.nn.functional.cross_entropy
    start = time.perf_counter()
    for chosen in rounds:
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        weight = 0
        for i in chosen:
            a, b = int(off[i]), int(off[i + 1])
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=meta["lr"])
            for _ in range(meta["local_epochs"]):
                perm = torch.randperm(b - a, generator=gen) + a
                for s in range(0, b - a, meta["batch_size"]):
                    idx = perm[s : s + meta["batch_size"]]
                    opt.zero_grad()
                    loss_fn(model(x[idx]), y[idx]).backward()
                    opt.step()
            for k, v in model.state_dict().items():
                total[k] += (b - a) * v
            weight += b - a
        global_state = {k: v / weight for k, v in total.items()}
    train_s = time.perf_counter() - start
    model.load_state_dict(global_state)
    return {"train_s": train_s, "accuracy": pooled_accuracy(model, data)}


def worker_central(path: str) -> dict:
    """The compute limit: one model, the same samples each round, batch K × batch size."""
    import torch

    data, meta = load_npz(path)
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    off = data["train_offsets"]
    n = len(off) - 1
    k = meta["clients_per_round"]
    model = build_torch_model(meta)
    opt = torch.optim.SGD(model.parameters(), lr=meta["lr"])
    rounds = _participants(meta, n)
    gen = torch.Generator().manual_seed(0)
    bs = k * meta["batch_size"]
    start = time.perf_counter()
    for chosen in rounds:
        rows = torch.from_numpy(np.concatenate([np.arange(off[i], off[i + 1]) for i in chosen]))
        for _ in range(meta["local_epochs"]):
            perm = rows[torch.randperm(len(rows), generator=gen)]
            for s in range(0, len(perm), bs):
                idx = perm[s : s + bs]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    train_s = time.perf_counter() - start
    return {"train_s": train_s, "accuracy": pooled_accuracy(model, data)}


def run_worker(system: str, path: str) -> None:
    if system in ("vectorized", "sequential"):
        out = worker_consortium(system, path)
    elif system == "plain":
        out = worker_plain(path)
    elif system == "central":
        out = worker_central(path)
    else:
        raise SystemExit(f"unknown system {system!r}")
    out.update(system=system, peak_rss_mb=peak_rss_mb())
    print(json.dumps(out))


# -- orchestration -----------------------------------------------------------------------------


def flower_python(args: argparse.Namespace) -> str | None:
    py = Path(args.flower_venv) / "bin" / "python"
    if not py.exists():
        print(f"setting up Flower in {args.flower_venv} (first run only) ...", file=sys.stderr)
        subprocess.run(["bash", str(HERE / "flower" / "setup.sh"), args.flower_venv], check=True)
    return str(py)


def run_system(system: str, path: Path, args: argparse.Namespace) -> dict:
    if system == "flower":
        cmd = [flower_python(args) or "", str(HERE / "flower" / "worker.py"), str(path)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, str(path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    total = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"system": system, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    out = json.loads(lines[-1])
    out["total_s"] = total
    return out


def fmt(value: object, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="w1,w2")
    parser.add_argument("--n", default="100,1000,10000", help="W1 client counts")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out", default=str(HERE / "out" / "simulation.json"))
    parser.add_argument("--flower-venv", default=str(HERE / ".venv-flower"))
    parser.add_argument("--worker", nargs=2, metavar=("SYSTEM", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(*args.worker)
        return

    out_dir = Path(args.out).parent
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    systems = [s for s in args.systems.split(",") if s]
    cases = []
    for workload in args.workloads.split(","):
        counts = [int(v) for v in args.n.split(",")] if workload == "w1" else [100]
        cases += [(workload, n) for n in counts]
    rows = []
    header = (f"{'workload':<8} {'N':>6}  {'system':<22} {'train s':>8} {'process s':>9} "
              f"{'RSS MB':>7} {'accuracy':>8}  {'vs flower':>9} {'vs plain':>8}")
    print(header)
    print("-" * len(header))
    for workload, n in cases:
        path = make_data(workload, n, out_dir / "data")
        results = {s: run_system(s, path, args) for s in systems}
        for s in systems:
            r = results[s]
            r.update(workload=workload, clients=n)
            rows.append(r)
            if "error" in r:
                print(f"{workload:<8} {n:>6}  {LABELS[s]:<22} failed: {r['error'][:90]}")
                continue
            ratio = {}
            for ref in ("flower", "plain"):
                base = results.get(ref, {}).get("train_s")
                ratio[ref] = base / r["train_s"] if base and r["train_s"] else None
            r["speedup_vs_flower"], r["speedup_vs_plain"] = ratio["flower"], ratio["plain"]
            print(
                f"{workload:<8} {n:>6}  {LABELS[s]:<22} {r['train_s']:>8.2f} {r['total_s']:>9.2f} "
                f"{r['peak_rss_mb']:>7.0f} {r['accuracy']:>8.3f}  "
                f"{fmt(ratio['flower'], '>8.1f')}× {fmt(ratio['plain'], '>7.1f')}×"
            )
    Path(args.out).write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                                          "results": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
