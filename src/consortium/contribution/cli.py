"""``consortium contribution RUN_DIR``: score a finished run's sites from its recorded updates."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from consortium.contribution.recording import (
    METHODS,
    ModelUtility,
    Settings,
    benefit,
    combine_rounds,
    load_rounds,
    score_round,
    validation_data,
)
from consortium.contribution.shapley import MAX_EXACT_PLAYERS
from consortium.errors import CheckpointError, ConfigError

__all__ = ["add_parser", "contribution_of_run", "run_command"]


def contribution_of_run(run_dir: str | Path, *, method: str | None = None,
                        dataset: Any = None, retrain: bool = False,
                        **overrides: Any) -> dict[str, Any]:
    """Score the sites of the run in ``run_dir`` with ``method`` (default: the run's own
    ``contribution.method``) from the updates it recorded (``contribution.record = true``);
    ``overrides`` replace ``[contribution]`` keys (``utility``, ``permutations`` ...);
    ``dataset``: the data set the run was given (default: the one its config loads).
    ``retrain``: leave-one-out by n + 1 new federations of the run's config instead
    (:func:`~consortium.contribution.retrain.leave_one_out_by_runs`; works under secure
    aggregation, needs no recorded updates). Writes
    ``RUN_DIR/contribution.json`` and returns it.

    Raises:
        CheckpointError: not a run directory, or no recorded rounds.
        ConfigError: an unknown method, or exact Shapley over more than 10 clients a round.
    """
    from consortium.config import ExperimentConfig, read_toml
    from consortium.federation import Federation, Given, build_data, build_model

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory: it has no config.toml")
    cfg = ExperimentConfig.from_dict(read_toml(run_dir / "config.toml"))
    c = dataclasses.replace(cfg.contribution, **{k: v for k, v in overrides.items() if v is not None})
    method = method or ("leave-one-out" if retrain else
                        c.method if c.method != "none" else "gtg-shapley")
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not one of {', '.join(METHODS)}")
    cfg = cfg.replace(contribution=c)
    summary_path = run_dir / "summary.json"
    per_client = json.loads(summary_path.read_text())["per_client"] if summary_path.exists() else {}
    if retrain:
        if method != "leave-one-out":
            raise ConfigError(f"--retrain computes leave-one-out (n + 1 federations); {method} "
                              "needs recorded updates (contribution.record = true)")
        from consortium.contribution.retrain import leave_one_out_by_runs

        out = leave_one_out_by_runs(cfg, dataset=dataset)
        out["benefit"], out["benefit_basis"] = benefit(per_client)
        (run_dir / "contribution.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
        return out
    rounds = load_rounds(run_dir / "contribution")
    most = max(len(r.clients) for r in rounds)
    if method == "exact-shapley" and most > MAX_EXACT_PLAYERS:
        raise ConfigError(
            f"exact Shapley over {most} clients in a round needs 2^{most} model evaluations "
            f"per round (offered up to {MAX_EXACT_PLAYERS}); use --method gtg-shapley, "
            "tmc-shapley or leave-one-out"
        )
    f = Federation(cfg, Given(dataset=dataset))
    build_data(f)
    build_model(f)
    settings = Settings.of(c, seed=cfg.seed, method=method)
    evaluate = ModelUtility(f.factory, f.init, validation_data(f.dataset, c.validation),
                            utility=c.utility)
    scored = [score_round(r, evaluate, settings) for r in rounds]
    sites = list(dict.fromkeys(c for r in rounds for c in r.clients))
    out = combine_rounds(scored, sites + [c for c in f.dataset.client_ids if c not in sites],
                         settings)
    out["benefit"], out["benefit_basis"] = benefit(per_client)
    (run_dir / "contribution.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


def add_parser(sub: Any) -> None:
    """The ``contribution`` subcommand's arguments."""
    p = sub.add_parser("contribution", help="score a finished run's sites (Shapley values) from "
                       "its recorded updates (contribution.record = true)")
    p.add_argument("run_dir", help="a run directory of `consortium run`")
    p.add_argument("--method", choices=METHODS, help="default: the run's contribution.method, "
                   "else gtg-shapley")
    p.add_argument("--utility", choices=("accuracy", "loss"))
    p.add_argument("--validation", choices=("sites", "server"))
    p.add_argument("--permutations", type=int, help="TMC's permutations, GTG's most")
    p.add_argument("--retrain", action="store_true",
                   help="leave-one-out by training n + 1 new federations of the run's config "
                   "(works under secure aggregation; costs n + 1 trainings)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of a table")


def run_command(args: argparse.Namespace) -> int:
    """Run ``consortium contribution`` and print its table (or JSON)."""
    out = contribution_of_run(args.run_dir, method=args.method, utility=args.utility,
                              validation=args.validation, permutations=args.permutations,
                              retrain=args.retrain)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    se, ben = out["standard_error"], out["benefit"]
    print(f"{out['method']} ({out['utility']}), {out['rounds']} rounds, "
          f"{out['evaluations']} model evaluations, {out['seconds']:.2f} s; "
          f"Σ v(N) − v(∅) = {out['total']:.4f}")
    print(f"{'site':<20} {'score':>9} {'± se':>8} {'benefit':>8}  flag")
    for site in out["ranking"]:
        b = f"{ben[site]:+.3f}" if site in ben else "-"
        flag = "low/free-rider" if site in out["flagged"] else ""
        print(f"{site:<20} {out['scores'][site]:>+9.4f} {se[site]:>8.4f} {b:>8}  {flag}")
    return 0
