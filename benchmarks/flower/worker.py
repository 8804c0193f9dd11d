#!/usr/bin/env python3
"""Flower column of benchmarks/simulation.py: FedAvg in Flower's simulation engine (Ray).

Usage:  VENV/bin/python benchmarks/flower/worker.py DATA.npz [--verbose] [--num-cpus K]
                                                    [--save-model OUT.npz]

Prints one JSON line on stdout when done; everything else (Flower, Ray, warnings) goes to
stderr. The file descriptor 1 itself is pointed at stderr for the whole run, so not even a
subprocess can write to stdout; the JSON line goes to a saved copy of the original stdout.

Which Flower API
----------------
``flwr.simulation.run_simulation(server_app=..., client_app=..., num_supernodes=N,
backend_config=...)`` with a ``ServerApp`` whose main runs the message-API strategy
``flwr.serverapp.strategy.FedAvg`` and a ``ClientApp`` with a ``@app.train()`` function
(in ``flower_task.py``). This is the in-process form of the current API: the ServerApp runs
in a thread of this process and the ClientApps in a pool of Ray actors, so the final global
weights can be read straight from ``Strategy.start``'s result, and no ``flwr run`` /
``pyproject.toml`` app package is needed. Flower 1.41 marks ``run_simulation`` as deprecated
in favour of the ``flwr run`` CLI, but it works and is the way to run a simulation from a
script; the legacy ``start_simulation`` (NumPyClient + old strategies) was not needed.

The math
--------
``num_supernodes`` = number of clients (one virtual SuperNode per client; partition id i owns
rows ``train_offsets[i]:train_offsets[i+1]``). Each round FedAvg samples exactly
``clients_per_round`` of them uniformly without replacement (``random.sample`` over all node
ids: ``fraction_train = k/N`` with ``min_train_nodes = k``, and ``min_available_nodes = N`` so
it waits until all N are registered). Each client loads the global weights, runs
``local_epochs`` epochs of plain SGD (lr, no momentum, no weight decay), batch ``batch_size``,
freshly shuffled each epoch, cross-entropy; FedAvg averages the returned weights weighted by
the clients' training-row counts. ``fraction_evaluate = 0``: no federated evaluation at all.
The initial weights come from ``torch.manual_seed(seed)`` then the model's constructor, as in
consortium's ``build_model``. Accuracy is measured afterwards, in this process, on every
client's test rows pooled.

What is timed
-------------
- ``setup_s``: from the start of this script through importing numpy, torch, ray and flwr
  and loading the settings and test rows (the driver never loads the training rows: each Ray
  actor loads them itself, once, on its first message, which falls inside the timed part).
- ``ray_init_s``: ``ray.init`` alone. This worker starts Ray itself, with the arguments
  Flower's Ray backend would use (``include_dashboard=False``, the same ``PYTHONPATH``
  runtime env, ``log_to_driver=False``) plus ``num_cpus`` = all cores and the loopback
  address, so that Ray's start-up can be measured on its own; Flower then finds Ray running
  and uses it (and still shuts it down itself).
- ``simulation_s``: the ``run_simulation`` call: registering N nodes, creating the actor pool,
  every round, and Flower's own ``ray.shutdown()`` at the end.
- ``train_s`` = ``ray_init_s + simulation_s``: the whole simulation including Ray's start-up,
  which is what someone who calls Flower's simulation pays.
- ``rounds_s``: the rounds alone, measured inside the ServerApp around ``Strategy.start``
  (still includes the actors' first import of torch and the first data load).

Also reported: ``peak_rss_mb``, the peak over the run of the summed PSS (proportional set
size: shared pages split between the processes sharing them) of this process and every
process it started (Ray's GCS, raylet, workers and actors), sampled every 0.5 s; summing PSS
counts shared libraries once, so it is comparable with one process's RSS.
``driver_peak_rss_mb`` is this process's own peak RSS.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

# Before flwr and ray are imported: no telemetry or usage reports (no network here), fewer logs.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PYTHONWARNINGS", "ignore")  # for Ray's worker processes
# Loopback only: Ray's single-machine mode (as on macOS/Windows) takes 127.0.0.1 as the node's
# address instead of looking up the machine's outward-facing IP.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

HERE = Path(__file__).resolve().parent


# -- stdout discipline --------------------------------------------------------------------------


def _claim_stdout() -> Any:
    """Keep the real stdout for the JSON line; point fd 1 (and sys.stdout) at stderr."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return real


# -- the process tree (memory, and making sure nothing is left behind) ---------------------------


def _descendants(root: int) -> list[int]:
    """PIDs of every live process below ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie holds no memory and is reaped by its parent
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the summed PSS of this process and its descendants; keeps the peak.

    Also remembers every descendant it saw (PID and start time), so that processes Ray
    orphaned on the way out (re-parented away from this one) can still be checked after.
    """

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak_kb = interval, 0
        self.seen: dict[int, str] = {}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        me = os.getpid()
        below = _descendants(me)
        for pid in below:
            if pid not in self.seen and (start := _start_time(pid)) is not None:
                self.seen[pid] = start
        total = sum(_pss_kb(pid) for pid in [me, *below])
        self.peak_kb = max(self.peak_kb, total)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


def _reap_leftovers(seen: dict[int, str], timeout: float = 15.0) -> list[int]:
    """Wait for the processes this worker started (via Ray) to exit; end stragglers by PID.

    Checked: this process's descendants now, and every descendant seen during the run that
    is still the same process (same start time), wherever it has been re-parented.
    """
    me = os.getpid()

    def alive() -> list[int]:
        now = set(_descendants(me))
        now |= {pid for pid, start in seen.items() if _start_time(pid) == start}
        return sorted(now)

    deadline = time.monotonic() + timeout
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not left:
            break
        print(f"[flower worker] ending leftover processes {left} with {sig.name}", file=sys.stderr)
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2.0)
        left = alive()
    return left


# -- the run ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FedAvg in Flower's simulation engine")
    parser.add_argument("data", help="the benchmark's .npz file")
    parser.add_argument("--verbose", action="store_true", help="keep Flower's and Ray's logs")
    parser.add_argument("--save-model", metavar="OUT.npz",
                        help="also save the final global weights (for checking the math)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs given to Ray (default: all); each client takes one")
    args = parser.parse_args(argv)
    out = _claim_stdout()
    if not args.verbose:
        warnings.filterwarnings("ignore")  # e.g. Ray's FutureWarning about GPU env vars
    path = str(Path(args.data).resolve())

    import flwr
    import numpy as np
    import ray
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    sys.path.insert(0, str(HERE))
    from flower_task import app as client_app
    from flower_task import build_model, load_meta

    level = logging.INFO if args.verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    logging.getLogger("ray").setLevel(level)

    with np.load(path) as data:
        meta = load_meta(data)
        num_clients = len(data["train_offsets"]) - 1
        x_test = torch.from_numpy(data["x_test"])
        y_test = torch.from_numpy(data["y_test"])
    rounds = int(meta["rounds"])
    per_round = int(meta.get("clients_per_round")
                    or max(1, math.ceil(float(meta["fraction"]) * num_clients)))
    if not 1 <= per_round <= num_clients:
        raise SystemExit(f"clients_per_round={per_round} is not within 1..{num_clients}")
    model = build_model(meta)
    initial = ArrayRecord(model.state_dict())
    setup_s = time.perf_counter() - _T0

    # The ServerApp runs in a thread of this process: it leaves its results here.
    box: dict[str, Any] = {"replies": []}

    def count_replies(records: list[RecordDict], weight_key: str) -> MetricRecord:
        box["replies"].append(len(records))  # called once per round with the good replies
        return MetricRecord({"clients": len(records)})

    server_app = ServerApp()

    @server_app.main()
    def _server(grid: Grid, context: Context) -> None:
        random.seed(int(meta["seed"]))  # FedAvg samples with the `random` module
        strategy = FedAvg(
            fraction_train=per_round / num_clients,
            min_train_nodes=per_round,  # makes the count exact whatever int(N·fraction) gives
            min_available_nodes=num_clients,
            fraction_evaluate=0.0,
            min_evaluate_nodes=0,
            train_metrics_aggr_fn=count_replies,
        )
        start = time.perf_counter()
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=rounds,
            timeout=7 * 24 * 3600.0,
            train_config=ConfigRecord({"data": path}),
        )
        box["rounds_s"] = time.perf_counter() - start
        box["arrays"] = result.arrays

    memory = TreeMemory()
    memory.start()
    pythonpath = os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)
    os.environ["PYTHONPATH"] = pythonpath  # what Flower's Ray backend would set, too
    try:
        start = time.perf_counter()
        ray.init(
            num_cpus=args.num_cpus,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level=level,
            log_to_driver=args.verbose,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        )
        ray_init_s = time.perf_counter() - start

        start = time.perf_counter()
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"logging_level": level, "log_to_driver": args.verbose},
            },
            verbose_logging=args.verbose,
        )
        simulation_s = time.perf_counter() - start
    finally:
        if ray.is_initialized():  # Flower shuts Ray down itself; this covers a failure
            ray.shutdown()
        memory.stop()
    left = _reap_leftovers(memory.seen)

    if box.get("arrays") is None or len(box["replies"]) != rounds:
        raise SystemExit(f"the simulation did not finish its {rounds} rounds: {box['replies']}")
    if any(n != per_round for n in box["replies"]):
        raise SystemExit(f"some rounds lost clients (replies per round: {box['replies']})")

    state = box["arrays"].to_torch_state_dict()
    model.load_state_dict(state)
    if args.save_model:
        np.savez(args.save_model, **{k: v.numpy() for k, v in state.items()})
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(y_test), 65536):
            logits = model(x_test[s : s + 65536])
            correct += int((logits.argmax(1) == y_test[s : s + 65536]).sum())
    accuracy = correct / max(1, len(y_test))

    result = {
        "system": "flower",
        "train_s": ray_init_s + simulation_s,
        "setup_s": setup_s,
        "accuracy": accuracy,
        "rounds": rounds,
        "flwr": flwr.__version__,
        "ray_init_s": ray_init_s,
        "simulation_s": simulation_s,
        "rounds_s": box["rounds_s"],
        "clients": num_clients,
        "clients_per_round": per_round,
        "ray": ray.__version__,
        "peak_rss_mb": memory.peak_kb / 1024,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if left:
        result["leftover_pids"] = left
    out.write(json.dumps(result) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
