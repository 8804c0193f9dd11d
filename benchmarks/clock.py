"""Synchronous policies on one simulated trace: simulated time to a target accuracy.

Issue 18's trace: 30 % of the clients compute and transfer 10x slower (``slow_fraction``,
``slow_factor``) and every client is online half of the time (``availability = "diurnal"``,
``duty = 0.5``, a ``--period`` in simulated seconds, each client its own phase). On it, with
the same seed (so the same data, initial model and trace), synchronous FedAvg runs with:

- ``wait for all``: the round ends when its slowest sampled client has finished;
- ``deadline D``: clients not finished ``D`` simulated seconds after the round began are
  dropped (``server.deadline_s``);
- ``over-select 30 %``: 1.3x the clients are sampled and the first ``clients_per_round`` to
  finish are kept (``sampling.over_select = 0.3``; Bonawitz et al. 2019);
- ``stragglers 30 %``: wait for all, but 30 % of each round's clients do a random share of
  their local work (``simulation.stragglers``; Li et al. 2020), which shortens their time.

and asynchronously (``server.mode``; each server step is a "round" of the log):

- ``fedbuff``: ``--concurrency`` clients (default ``--per-round``) train at once, the server
  steps on every ``--buffer`` updates (default half of ``--per-round``), staleness-weighted
  (Nguyen et al. 2022);
- ``fedasync``: the same clients, a step on every update (Xie et al. 2019).

Workload W1: logistic regression on FedProx Synthetic(1, 1) over ``--n`` clients (default
1,000), ``--per-round`` a round, batch 10, lr 0.01, one local epoch. Each policy runs until
the federated accuracy (on every client, ``evaluation.include_offline``; ``--online-only``:
on the clients online at the round's end) first reaches ``--target``,
or ``--budget`` simulated seconds, or ``--max-rounds``. The table gives the simulated time
(``sim_time_s``) and client updates until the target (``consortium.server.clock.
time_to_target``, what ``summary.json`` reports with ``evaluation.target_accuracy``), the
rounds, the accuracy at the stop, and the updates dropped (``failed``).

``--set SECTION.KEY=VALUE`` changes the config of every policy (e.g.
``--set algorithm.local_steps=20``: a fixed number of local steps instead of one epoch), and
``--async-set`` that of FedBuff and FedAsync only (e.g. ``--async-set
server.async_weighting=time``, ``--async-set algorithm.local_steps=20``: FedBuff's paper
trains a fixed number of local steps). ``--out DIR`` writes each policy's run directory with
its report (accuracy against simulated time).

``--period`` sets ``simulation.period_s``: issue 18's diurnal day is 3,600 s here; a short
period (``--period 120``: each client 60 s on, 60 s off, its own phase) makes the online half a
fair sample of the clients at every moment of a run (RESULTS.md, "a short availability period").

Run:  OMP_NUM_THREADS=1 python benchmarks/clock.py [--n 1000] [--target 0.4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


WORKLOADS = {
    "w1": lambda n: {
        "data": {"dataset": "synthetic", "clients": n, "alpha": 1.0, "beta": 1.0},
        "model": {"name": "logistic"},
        "algorithm": {"lr": 0.01, "batch_size": 10, "local_epochs": 1},
    },
    "digits": lambda n: {
        "data": {"dataset": "digits", "clients": n, "partition": "dirichlet", "alpha": 0.3},
        "model": {"name": "mlp"},
        "algorithm": {"lr": 0.05, "batch_size": 16, "local_epochs": 1},
    },
}
"""``--workload``: W1 (issue 18's), or an MLP on digits split Dirichlet(0.3)."""


def policies(per_round: int, deadlines: list[float], *, buffer: int = 0, concurrency: int = 0,
             max_staleness: int = 0, staleness: str = "polynomial",
             server_lr: float = 0.0) -> dict[str, dict[str, Any]]:
    over = round(per_round * 1.3)
    k = buffer or max(1, per_round // 2)
    asynchronous: dict[str, Any] = {"concurrency": concurrency or per_round,
                                    "max_staleness": max_staleness, "staleness": staleness}
    if server_lr:
        asynchronous["lr"] = server_lr
    return {
        "wait for all": {},
        **{f"deadline {d:g} s": {"server": {"deadline_s": d}} for d in deadlines},
        "over-select 30 %": {"sampling": {"clients_per_round": over, "over_select": 0.3}},
        "stragglers 30 %": {"simulation": {"stragglers": 0.3}},
        # asynchronous (issue 18, slice 2): each server step is one "round" of the log
        "fedbuff": {"server": {"mode": "fedbuff", "buffer_size": k, **asynchronous}},
        "fedasync": {"server": {"mode": "fedasync", **asynchronous}},
    }


def config(args: argparse.Namespace, policy: dict[str, Any]) -> dict[str, Any]:
    sim = {"availability": "diurnal", "duty": 0.5, "period_s": args.period,
           "slow_fraction": 0.3, "slow_factor": 10.0, "speed": args.speed}
    cfg: dict[str, Any] = {
        "seed": args.seed, "rounds": args.max_rounds, **WORKLOADS[args.workload](args.n),
        "sampling": {"clients_per_round": args.per_round},
        "simulation": sim,
        "evaluation": {"baselines": [], "target_accuracy": args.target,
                       "every": args.eval_every, "include_offline": args.all_clients},
        "executor": {"kind": "vectorized"},
    }
    for section, values in policy.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    asynchronous = policy.get("server", {}).get("mode", "sync") != "sync"
    for item in args.set + (args.async_set if asynchronous else []):
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not name or not _:
            raise SystemExit(f"--set {item!r}: use SECTION.KEY=VALUE (a TOML value)")
        cfg[section] = {**cfg.get(section, {}), name: _toml_value(value)}
    return cfg


def _toml_value(text: str) -> Any:
    """``VALUE`` of ``--set SECTION.KEY=VALUE`` read as TOML (a bare word is a string)."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


class _Reached(Exception):
    pass


class Until:
    """Stops a run once the target is reached or the simulated budget spent."""

    def __init__(self, target: float, budget: float) -> None:
        self.target, self.budget = target, budget
        self.history: list[dict[str, Any]] = []

    def on_round_end(self, record: dict[str, Any], state: Any) -> None:
        self.history.append(dict(record))
        acc = record.get("accuracy")
        if (acc is not None and acc >= self.target) or record["sim_time_s"] >= self.budget:
            raise _Reached


def run(args: argparse.Namespace, name: str, policy: dict[str, Any]) -> dict[str, Any]:
    import consortium
    from consortium.server.clock import time_to_target

    out = Path(args.out) / name.replace(" ", "_").replace("%", "pc") if args.out else None
    until = Until(args.target, args.budget)
    start = time.perf_counter()
    try:
        consortium.simulate(config(args, policy), out=out, report=False, callbacks=[until])
    except _Reached:
        pass
    if out is not None:  # the report of the rounds run (accuracy against simulated time)
        from consortium.reporting.report import write_report

        summary = {"name": name, "rounds": len(until.history), "final": {}, "clock": {"on": 1},
                   **time_to_target(until.history, args.target)}
        (out / "summary.json").write_text(json.dumps(summary))
        write_report(out)
    h = until.history
    reached = time_to_target(h, args.target)
    failed = sum(len(r.get("failed", {})) for r in h)
    return {
        "policy": name, "time_to_target_s": reached["time_to_target_s"],
        "updates_to_target": reached["updates_to_target"],
        "round_to_target": reached["round_to_target"], "rounds": len(h),
        "final_accuracy": next((r["accuracy"] for r in reversed(h)
                                if r.get("accuracy") is not None), float("nan")),
        "sim_time_s": h[-1]["sim_time_s"], "updates": sum(
            r["clients"] for r in h if r.get("aborted") is None),
        "failed": failed, "aborted": sum(1 for r in h if r.get("aborted")),
        "wall_s": time.perf_counter() - start,
        "curve": [[r["sim_time_s"], r.get("accuracy")] for r in h],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="w1")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--max-rounds", type=int, default=2000)
    parser.add_argument("--budget", type=float, default=20000.0, help="simulated seconds")
    parser.add_argument("--target", type=float, default=0.4)
    parser.add_argument("--deadline", default="1,5", help="deadlines (s), comma-separated")
    parser.add_argument("--period", type=float, default=3600.0,
                        help="simulation.period_s: the diurnal on/off period (simulated s)")
    parser.add_argument("--speed", type=float, default=1000.0)
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--online-only", dest="all_clients", action="store_false",
                        help="evaluate only the clients online (default: every client, a "
                        "steadier measure of the model)")
    parser.add_argument("--policies", default="", help="comma-separated subset (by name)")
    parser.add_argument("--buffer", type=int, default=0,
                        help="fedbuff's buffer_size K (default: half of --per-round)")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="fedbuff/fedasync: clients training at once (default: --per-round)")
    parser.add_argument("--max-staleness", type=int, default=0, help="0: no bound")
    parser.add_argument("--staleness", default="polynomial",
                        choices=["polynomial", "constant", "hinge"])
    parser.add_argument("--server-lr", type=float, default=0.0,
                        help="fedbuff/fedasync's server learning rate (0: the default, 1)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config value for every policy (repeatable), e.g. "
                        "algorithm.local_steps=20")
    parser.add_argument("--async-set", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="as --set, for fedbuff/fedasync only (e.g. "
                        "server.async_weighting=time)")
    parser.add_argument("--out", default="", help="run directories (with reports) under this")
    parser.add_argument("--json", default=str(HERE / "results" / "clock.json"))
    parser.add_argument("--plot", default=str(HERE / "results" / "clock.png"),
                        help="every policy's accuracy against simulated time ('' for none)")
    args = parser.parse_args()
    rows = []
    print(f"{args.workload} N={args.n}, {args.per_round} a round, at most {args.max_rounds} rounds, target "
          f"{args.target}, 30 % 10x slower, diurnal 50 % (period {args.period:g} s)")
    print("| policy | time to target (sim s) | updates to target | round | acc at stop | "
          "sim time (s) | updates | failed | aborted | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    chosen = [p for p in args.policies.split(",") if p]
    deadlines = [float(d) for d in args.deadline.split(",") if d]
    for name, policy in policies(args.per_round, deadlines, buffer=args.buffer,
                                 concurrency=args.concurrency,
                                 max_staleness=args.max_staleness, staleness=args.staleness,
                                 server_lr=args.server_lr).items():
        if chosen and name not in chosen:
            continue
        row = run(args, name, policy)
        rows.append(row)
        ttt = row["time_to_target_s"]
        print(f"| {name} | {'—' if ttt is None else f'{ttt:.1f}'} | "
              f"{row['updates_to_target'] or '—'} | {row['round_to_target'] or '—'} | "
              f"{row['final_accuracy']:.3f} | {row['sim_time_s']:.1f} | {row['updates']} | "
              f"{row['failed']} | {row['aborted']} | {row['wall_s']:.1f} |", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    if args.plot:
        plot(rows, args, Path(args.plot))


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """Every policy's accuracy against simulated time in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7.0, 4.2))
    for row in rows:
        points = [(t, a) for t, a in row["curve"] if a is not None]
        axes.plot([t for t, _ in points], [a for _, a in points], label=row["policy"])
    axes.axhline(args.target, linestyle="--", color="tab:gray", linewidth=1.0, label="target")
    axes.set_xscale("log")
    axes.set_xlabel("simulated time (s, log scale)")
    axes.set_ylabel("accuracy" + (" (every client)" if args.all_clients else " (clients online)"))
    axes.set_title(f"{args.workload}, N = {args.n}: 30 % 10x slower, online 50 % of the time")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


if __name__ == "__main__":
    main()
