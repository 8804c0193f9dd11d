"""``evaluation.clients`` at 10,000 clients: round time with every client evaluated each round
against a sampled evaluation, and whether the stated standard error is honest.

Training is the same in every run (the evaluation sample draws from its own seed), so each
sampled round's weighted accuracy can be compared with the full evaluation of the same model
in the same round: ``z = (sampled − full) / se``. An honest standard error puts about 95 % of
the rounds within |z| ≤ 1.96 (*covered*), and of 1,000 independent draws on the final
model's per-client accuracies, where the census is known (*cov×1000*). *eval s* is ``Evaluator.evaluate`` alone (median over the
sampled rounds); *round s* is the whole round (training included).

    python benchmarks/evaluation_sampling.py --clients 10000 --rounds 20 \\
        --out benchmarks/results/evaluation_sampling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import consortium
from consortium.config import ExperimentConfig
from consortium.data import load_dataset
from consortium.server.evaluation import Evaluator, draw_clients, evaluation_draws, pps_estimate


class EvaluationTimer:
    """Times ``Evaluator.evaluate`` (the federated evaluation of a round, all it costs)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._evaluate = Evaluator.evaluate

    def __enter__(self) -> EvaluationTimer:
        timer = self

        def timed(evaluator, *args, **kwargs):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return timer._evaluate(evaluator, *args, **kwargs)
            finally:
                timer.seconds.append(time.perf_counter() - t)

        Evaluator.evaluate = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Evaluator.evaluate = self._evaluate  # type: ignore[method-assign]


def _config(clients: int, rounds: int, evaluated: float) -> dict:
    return {
        "rounds": rounds, "seed": 0,
        "data": {"dataset": "synthetic", "clients": clients, "alpha": 1.0, "beta": 1.0},
        "sampling": {"clients_per_round": 100},
        "executor": {"kind": "vectorized"},
        "evaluation": {"baselines": [], "clients": evaluated},
    }


def _coverage(full, dataset, evaluated: float, repeats: int = 1000) -> float:
    """Share of ``repeats`` independent draws whose 95 % interval holds the full evaluation's
    weighted accuracy, on the final model's per-client accuracies (a census is known there)."""
    ids = [c for c in full.per_client if "accuracy" in full.per_client[c]]
    sizes = [len(dataset.clients[c].test) for c in ids]
    accuracy = [full.per_client[c]["accuracy"] for c in ids]
    truth = sum(a * n for a, n in zip(accuracy, sizes)) / sum(sizes)
    k = evaluation_draws(evaluated, len(ids))
    hits = 0
    for seed in range(repeats):
        estimate, se = pps_estimate([accuracy[i] for i in draw_clients(sizes, k, seed=seed)])
        hits += abs(estimate - truth) <= 1.96 * se
    return hits / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sample", type=float, nargs="+", default=[1000, 100])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluation_sampling.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; one thread is steadier (docs/progress.md)

    started = time.perf_counter()
    dataset = load_dataset(ExperimentConfig.from_dict(_config(args.clients, 1, 0)).data, seed=0)
    load_s = time.perf_counter() - started

    runs = {}
    for evaluated in [0.0, *args.sample]:
        with EvaluationTimer() as timer:
            t = time.perf_counter()
            result = consortium.simulate(_config(args.clients, args.rounds, evaluated),
                                         dataset=dataset)
            runs[evaluated] = (time.perf_counter() - t, result, timer.seconds)

    full_s, full, full_eval = runs[0.0]
    rows = []
    for evaluated, (seconds, result, eval_s) in runs.items():
        assert torch.equal(result.params.vector, full.params.vector), "training must not change"
        sampled = result.history[:-1]  # the last round evaluates every client
        z = [
            (r["accuracy"] - f["accuracy"]) / r["accuracy_se"]
            for r, f in zip(sampled, full.history)
            if r.get("accuracy_se")
        ]
        rows.append({
            "evaluated": "all" if evaluated == 0 else int(evaluated),
            "run_s": seconds,
            "round_s_median": statistics.median(r["wall_s"] for r in sampled),
            "eval_s_median": statistics.median(eval_s[:-1]),
            "eval_speedup_vs_all": statistics.median(full_eval[:-1]) / statistics.median(eval_s[:-1]),
            "speedup_vs_all": full_s / seconds,
            "accuracy_se_median": statistics.median(r["accuracy_se"] for r in sampled)
            if z else None,
            "abs_error_median": statistics.median(
                abs(r["accuracy"] - f["accuracy"]) for r, f in zip(sampled, full.history)),
            "covered_95": sum(abs(v) <= 1.96 for v in z) / len(z) if z else None,
            "rounds_compared": len(z),
            "final_accuracy": result.summary["final"]["accuracy"],
            "covered_95_repeated": _coverage(full, dataset, evaluated) if evaluated else None,
        })

    print(f"N = {args.clients} clients, {args.rounds} rounds, 100 trained per round; "
          f"data load {load_s:.1f} s (not in the run times)")
    print(f"{'evaluated':>9} {'run s':>7} {'round s':>8} {'eval s':>7} {'eval ×':>7} "
          f"{'se':>7} {'|err|':>7} {'covered':>8} {'cov×1000':>8} {'final acc':>9}")
    for r in rows:
        se = "—" if r["accuracy_se_median"] is None else f"{r['accuracy_se_median']:.4f}"
        cov = "—" if r["covered_95"] is None else f"{r['covered_95']:.2f}"
        rep = "—" if r["covered_95_repeated"] is None else f"{r['covered_95_repeated']:.3f}"
        print(f"{r['evaluated']!s:>9} {r['run_s']:7.1f} {r['round_s_median']:8.3f} "
              f"{r['eval_s_median']:7.3f} {r['eval_speedup_vs_all']:7.1f} {se:>7} "
              f"{r['abs_error_median']:7.4f} {cov:>8} {rep:>8} {r['final_accuracy']:9.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "clients": args.clients, "rounds": args.rounds, "load_s": load_s, "rows": rows,
        "torch": torch.__version__, "threads": 1,
    }, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
