"""The ``consortium`` command. Exit codes live only here.

Exit codes: 0 success; 1 an unexpected internal error (a bug: please report it);
2 bad input (configuration, data, model, checkpoint) with a one-line message; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consortium.errors import ConsortiumError

__all__ = ["main"]

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

# Subcommands whose parser lives beside their code, which loads torch: name -> (module with
# ``add_parser(sub)``, the one-line help of ``consortium --help``). Their module is imported
# only when the command line names them, so ``--help`` and ``--version`` stay instant.
_LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "contribution": ("consortium.contribution.cli", "score a finished run's sites (Shapley "
                     "values) from its recorded updates (contribution.record = true)"),
}


class _VersionAction(argparse.Action):
    """``--version``: the installed package's version (importlib.metadata, read only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"consortium {version()}")
        parser.exit()


def version() -> str:
    """The installed consortium's version, from its package metadata (no torch import)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("consortium")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from consortium import __version__

        return __version__


def _command_of(argv: Sequence[str] | None) -> str | None:
    """The subcommand that ``argv`` names (the first word that is not an option)."""
    words = sys.argv[1:] if argv is None else argv
    return next((w for w in words if not w.startswith("-")), None)


def _parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command-line parser. Building it imports no torch (tests/test_cli_startup.py):
    every subcommand's module loads in its ``_cmd_*`` function, and the ``_LAZY_COMMANDS``
    parsers only when ``argv`` names their command."""
    p = argparse.ArgumentParser(
        prog="consortium",
        description="Federated learning and analytics: simulate on a laptop, deploy between sites.",
    )
    p.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a simulation (no CONFIG: heart disease across four hospitals)",
        description="Run a federated simulation. Without CONFIG, the embedded default runs: "
        "heart-disease prediction across the four hospitals of the UCI Heart Disease data.",
    )
    run.add_argument("config", nargs="?", help="experiment TOML file")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, read as TOML (--set rounds=5 --set model.name=mlp)",
    )
    run.add_argument("--out", help="run directory (default runs/<name>-<timestamp>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--no-report", action="store_true", help="skip report.html and plots")
    run.add_argument(
        "--seeds", metavar="SEEDS",
        help="run once per seed (0-4, or 0,3,7) into OUT/seed-N/ and report the mean over seeds "
        "with a 95%% Student t interval (OUT/seeds.json)",
    )
    ana = sub.add_parser(
        "analyze",
        help="federated statistics: a Table 1 by site and overall, and the bias report",
        description="Describe the sites' data without pooling it: per-site sums with small "
        "cells withheld at each site, combined into a Table 1 (analysis.json, table1.csv, "
        "analysis.html). [data] says where the data are (no CONFIG: the four heart-disease "
        "hospitals), [analysis] what to compute.",
    )
    ana.add_argument("config", nargs="?", help="experiment TOML file")
    ana.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value (--set analysis.where=\"age >= 50\")")
    ana.add_argument("--bias", action="store_true",
                     help="also write the bias and representation report (bias.json, bias.html)")
    ana.add_argument("--out", required=True, help="directory for analysis.json, table1.csv, …")
    priv = sub.add_parser("privacy", help="privacy accounting: epsilon of a mechanism, or calibrate noise")
    psub = priv.add_subparsers(dest="privacy_command", required=True)
    eps = psub.add_parser(
        "epsilon", help="epsilon of T releases of a Poisson-sampled Gaussian, with both accountants"
    )
    eps.add_argument("--noise", type=float, required=True, help="noise multiplier z")
    eps.add_argument("--rate", type=float, required=True, help="Poisson sampling rate q")
    eps.add_argument("--steps", type=int, required=True, help="number of releases (rounds)")
    eps.add_argument("--delta", type=float, default=1e-5)
    cal = psub.add_parser("calibrate", help="the noise multiplier that reaches a target epsilon")
    cal.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    cal.add_argument("--rate", type=float, required=True, help="Poisson sampling rate q")
    cal.add_argument("--steps", type=int, required=True, help="number of releases (rounds)")
    cal.add_argument("--delta", type=float, default=1e-5)
    cal.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    rob = sub.add_parser(
        "robustness",
        help="aggregation rules × attacks: final accuracy (and backdoor success) of each pair",
        description="Run the experiment once per (rule, attack) pair with the same seed, data and "
        "malicious clients; write robustness.json, robustness.md and robustness.png into --out.",
    )
    rob.add_argument("config", nargs="?", help="experiment TOML file (default: the heart-disease demo)")
    rob.add_argument(
        "--rules", default="mean,median,trimmed-mean,krum,geometric-median,centered-clipping,norm-bound",
        help="comma-separated rules, parameters after a colon: trimmed-mean:f=2 (mean = FedAvg)",
    )
    rob.add_argument(
        "--attacks", default="none,sign-flip,ipm:epsilon=10,alie",
        help="comma-separated attacks with their strength: none,sign-flip:scale=4,ipm:epsilon=10,alie",
    )
    rob.add_argument("--fraction", type=float, default=0.2, help="share of malicious clients")
    rob.add_argument(
        "--no-f", dest="give_f", action="store_false",
        help="leave every rule at its own f (default: rules taking f get the expected attackers)",
    )
    rob.add_argument("--out", help="directory for robustness.json/.md/.png; each cell is saved "
                     "there as it finishes, and the same command again continues where it stopped")
    rob.add_argument("--resume", metavar="DIR",
                     help="continue an interrupted matrix in DIR with the arguments it was started with")
    rob.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key for every cell (repeatable)",
    )
    prov = sub.add_parser(
        "provision",
        help="create a consortium CA, the server's certificate and one certificate + token per site",
        description="Write DIR/ca.pem and ca.key (keep private), DIR/server/ (for the server's "
        "--certs) and DIR/sites/<site>/ (hand each site only its own folder).",
    )
    prov.add_argument("--sites", help="comma-separated site names, e.g. cleveland,hungary,va")
    prov.add_argument("--out", required=True, help="folder to write (must be empty or new)")
    prov.add_argument("--server-name", action="append", default=[], metavar="HOST",
                      help="extra DNS name or IP of the server (localhost and 127.0.0.1 always)")
    prov.add_argument("--days", type=int, default=365, help="certificate lifetime")
    prov.add_argument("--overwrite", action="store_true", help="replace credentials in --out")
    prov.add_argument("--revoke", metavar="SITE", help="revoke SITE in an existing --out instead")
    prov.add_argument("--add-site", metavar="SITE", help="issue credentials for one more site")
    srv = sub.add_parser(
        "server", help="run an experiment with sites that connect over gRPC (TLS by default)",
        description="The simulation's round loop, with the sites as clients over gRPC: they dial "
        "out to --listen, authenticate with their provisioned certificate, pull tasks and push "
        "results. Writes the same run directory as `consortium run`, plus audit.jsonl.",
    )
    srv.add_argument("config", nargs="?", help="experiment TOML file")
    srv.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to listen on")
    srv.add_argument("--certs", help="the provisioned server folder (consortium provision ... /server)")
    srv.add_argument("--insecure", action="store_true", help="no TLS, no authentication (local tests only)")
    srv.add_argument("--out", help="run directory (new run)")
    srv.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or killed run from its checkpoint")
    srv.add_argument("--min-sites", type=int, default=None,
                     help="start round 1 once this many sites connected (default: every "
                     "provisioned, unrevoked site; with --insecure, sampling.clients_per_round)")
    srv.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for results")
    srv.add_argument("--min-results", type=int, default=1, metavar="N",
                     help="a round with fewer results by its deadline is skipped (model kept)")
    srv.add_argument("--heartbeat", type=int, default=30, metavar="S",
                     help="sites report every S seconds while they work; a site silent for 3·S "
                     "fails its task then instead of at the round's deadline")
    srv.add_argument("--over-select", type=float, default=0.0, metavar="X",
                     help="the sampled sites are an over-selection by X (e.g. 0.3): a round "
                     "closes once n/(1+X) of its n sites answered; the slowest are dropped")
    srv.add_argument("--update-bound", type=float, default=None, metavar="X",
                     help="scale every site's update to at most X times the round's median "
                     "update norm (default: aggregation.update_bound, else 3); 0 turns the "
                     "bound off (a warning)")
    srv.add_argument("--closed-roster", action="store_true",
                     help="refuse sites that connect after round 1 (default: a provisioned "
                     "site that connects late joins from the next round)")
    srv.add_argument("--register-timeout", type=float, default=600.0, help="seconds to wait for the sites")
    srv.add_argument("--stream-idle-timeout", type=float, default=30.0, metavar="S",
                     help="a site's upload or task stream that moves no frame for S seconds is "
                     "dropped and its memory released")
    srv.add_argument("--stream-min-rate", type=float, default=16384.0, metavar="BYTES",
                     help="after the first S seconds a stream must average BYTES a second "
                     "(0: no floor)")
    srv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    srv.add_argument("--no-progress", action="store_true", help="no progress bar")
    srv.add_argument("--analyze", action="store_true",
                     help="run the experiment's [analysis] with the sites instead of training: "
                     "writes analysis.json, table1.csv and analysis.html into --out, as "
                     "`consortium analyze` does (--round-timeout: seconds per phase)")
    srv.add_argument("--bias", action="store_true",
                     help="with --analyze: also the bias and representation report")
    cli_ = sub.add_parser("client", help="serve one site's data to a consortium server")
    cli_.add_argument("--server", required=True, help="HOST:PORT of the server")
    cli_.add_argument("--site", required=True, help="this site's provisioned name")
    cli_.add_argument("--data", required=True, help="the site's CSV file (read here, never sent)")
    cli_.add_argument("--certs", help="this site's provisioned folder (sites/<name>)")
    cli_.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    cli_.add_argument("--target", default="", help="label column (default: the experiment's data.target)")
    cli_.add_argument("--policy", metavar="FILE",
                      help="this site's policy (TOML: max_epsilon, delta, min_sites, approve, "
                      "models, algorithms, require_dp, require_secure_aggregation, "
                      "trust_server_noise, send_metrics, secagg_threshold, secagg_neighbours, "
                      "min_count); "
                      "experiments and tasks that would break it are refused")
    cli_.add_argument("--harmonize", metavar="FILE",
                      help="this site's harmonize.toml: code maps, renames and unit conversions "
                      "applied to its file before anything is computed or sent")
    cli_.add_argument("--state", metavar="DIR",
                      help="where the site keeps its privacy spend and client state across "
                      "restarts (default: <certs>/state)")
    cli_.add_argument("--receipts", metavar="FILE",
                      help="the site's receipt log: the server's signed audit head with each "
                      "task and the digest of what was sent (default: <state>/receipts.jsonl); "
                      "check a server with `consortium audit verify RUN --against FILE`")
    cli_.add_argument("--approve", action="append", default=[], metavar="MANIFEST_HASH",
                      help="join the experiment with this manifest hash (`consortium manifest "
                           "EXPERIMENT.toml` prints it); repeatable")
    cli_.add_argument("--allow-model", action="append", default=[], metavar="PKG.MOD:FACTORY",
                      help="a model factory this site trusts to import (built-in models need "
                           "none); repeatable")
    cli_.add_argument("--give-up-after", type=float, default=600.0, metavar="S",
                      help="stop reconnecting after S seconds without the server and exit with "
                      "an error (default 600: ten minutes; 0: retry forever)")
    man = sub.add_parser("manifest", help="what an experiment asks of each site, and its hash "
                         "(for consortium client --approve)")
    man.add_argument("config", nargs="?", help="experiment TOML file (default: the demo)")
    man.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    man.add_argument("--json", action="store_true", help="print JSON (manifest and sha256)")
    man.add_argument("--hash", action="store_true", help="print only the hash (for --approve)")
    man.add_argument("--analyze", action="store_true",
                     help="the manifest of the experiment's analysis (consortium server --analyze)")
    audit = sub.add_parser("audit", help="check a run's hash-chained audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    aver = asub.add_parser("verify", help="verify every link of RUN_DIR/audit.jsonl")
    aver.add_argument("run_dir", help="the server's run directory")
    aver.add_argument("--expect-hash", help="the last entry's hash recorded elsewhere (detects truncation)")
    aver.add_argument("--against", nargs="+", metavar="RECEIPTS", default=[],
                      help="the sites' receipt logs (<state>/receipts.jsonl): the log must hold "
                      "every signed head and accepted result they record (detects a rewritten, "
                      "re-hashed or truncated log)")
    aver.add_argument("--server-cert", metavar="PEM",
                      help="the server certificate that signed the heads (default: the one the "
                      "sites recorded)")
    ds = sub.add_parser("datasets", help="list the built-in data sets and partitioners")
    ds.add_argument("--export-heart-disease", metavar="DIR",
                    help="write the four hospitals' files into DIR (one per site, for a deployment)")
    ds.add_argument("--export-triage", metavar="DIR",
                    help="write the four triage sites' notes into DIR as CSV (one per site, for a "
                    "deployment; the notes of seed 0 with 120 a site, as the default experiment)")
    sub.add_parser("algorithms", help="list algorithms, server optimisers, models and executors")
    chosen = _command_of(argv)
    for name, (module, help_line) in _LAZY_COMMANDS.items():
        if name == chosen:
            import importlib

            importlib.import_module(module).add_parser(sub)
        else:  # listed in --help; its own arguments load when the command is named
            sub.add_parser(name, help=help_line)
    return p


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, text in rows:
        table.add_row(escape(name), escape(text))
    Console().print(table)


def _cmd_datasets(args: argparse.Namespace) -> int:
    from consortium.data import DATASETS, PARTITIONS

    if args.export_heart_disease:
        from importlib.resources import files

        from consortium.data.heart_disease import SITES

        out = Path(args.export_heart_disease)
        out.mkdir(parents=True, exist_ok=True)
        source = files("consortium.data") / "_heart_disease"
        for site, name in SITES.items():
            (out / f"{site}.data").write_bytes((source / name).read_bytes())
            print(f"{site}: {out / f'{site}.data'}  (consortium client --site {site} --data ...)")
        (out / "README.md").write_bytes((source / "README.md").read_bytes())
        print(f"attribution (CC BY 4.0): {out / 'README.md'}")
        return EXIT_OK
    if args.export_triage:
        from consortium.data.triage import SITES as NOTE_SITES
        from consortium.data.triage import write_site_notes

        out = Path(args.export_triage)
        out.mkdir(parents=True, exist_ok=True)
        for site in NOTE_SITES:
            path = write_site_notes(out / f"{site}.csv", site, seed=0)
            print(f"{site}: {path}  (consortium client --site {site} --data ...)")
        return EXIT_OK

    _print_table("data sets", list(DATASETS.items()))
    _print_table("partitioners", list(PARTITIONS.items()))
    return EXIT_OK


def _cmd_privacy(args: argparse.Namespace) -> int:
    from consortium.privacy.accountant import (
        RoundMechanism,
        calibrate_noise,
        epsilon,
        epsilon_without_sampling,
    )

    if args.privacy_command == "epsilon":
        m = RoundMechanism(args.noise, "poisson", rate=args.rate)
        rows = [
            (f"{name}, secret sample", f"ε = {epsilon(m, args.steps, args.delta, name):.6g} at "
             f"δ = {args.delta:g}: holds if no one but the server knows who took part")
            for name in ("rdp", "pld")
        ] + [
            (f"{name}, known sample", f"ε = {epsilon_without_sampling(m, args.steps, args.delta, name):.6g}"
             f" at δ = {args.delta:g}: holds against anyone who knows who took part")
            for name in ("rdp", "pld")
        ]
        _print_table(
            f"Poisson-sampled Gaussian: z = {args.noise:g}, q = {args.rate:g}, {args.steps} steps",
            rows,
        )
        return EXIT_OK
    z = calibrate_noise(args.epsilon, args.delta, args.steps, accountant=args.accountant,
                        rate=args.rate)
    m = RoundMechanism(z, "poisson", rate=args.rate)
    reached = epsilon(m, args.steps, args.delta, args.accountant)
    print(f"noise multiplier {z:.6g} gives ε = {reached:.6g} at δ = {args.delta:g} "
          f"({args.accountant}, q = {args.rate:g}, {args.steps} steps)")
    return EXIT_OK


def _cmd_algorithms() -> int:
    from consortium.aggregation.optimizers import SERVER_OPTIMIZERS
    from consortium.algorithms import ALGORITHMS
    from consortium.executors import EXECUTORS
    from consortium.models import MODELS

    _print_table("algorithms", list(ALGORITHMS.items()))
    _print_table("server optimisers", list(SERVER_OPTIMIZERS.items()))
    _print_table("models", list(MODELS.items()))
    _print_table("executors", list(EXECUTORS.items()))
    _print_table("aggregation rules ([aggregation] rule)", _first_lines(_rules()))
    _print_table("attacks ([attack] kind, simulation only)", _first_lines(_attacks()))
    return EXIT_OK


def _rules() -> dict[str, Any]:
    from consortium.aggregation.robust import RULES

    return {"mean": None, **RULES}


def _attacks() -> dict[str, Any]:
    from consortium.attacks.registry import attack_factories

    return attack_factories()


def _first_lines(factories: dict[str, Any]) -> list[tuple[str, str]]:
    """Name → signature and the first docstring line (the paper, the default strength)."""
    import inspect

    rows = []
    for name, factory in factories.items():
        if factory is None:
            rows.append((name, "the sample-weighted mean (FedAvg), the default"))
            continue
        doc = (inspect.getdoc(factory) or "").strip().splitlines()
        params = ", ".join(
            f"{p.name}={p.default!r}" for p in inspect.signature(factory).parameters.values()
            if p.default is not inspect.Parameter.empty
        )
        if name == "fltrust":  # its root update is built by the run from root_examples
            params = "root_examples=100"
        rows.append((name, f"{doc[0] if doc else ''} ({params or 'no parameters'})"))
    return rows


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}"


def _print_results(summary: dict[str, Any], run_dir: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from consortium.reporting.report import result_intervals, results_table_rows

    table = Table(title=f"{summary['name']}: {summary['rounds']} rounds, {summary['clients']} clients")
    personal = summary.get("personalized") or {}
    intervals = result_intervals(summary)  # bootstrap over test examples, when the run has them
    columns = ["federated", *(["personalised"] if personal else []), "local only", "pooled"]
    # a baseline that did not run (a deployment has no pooled data) gets no empty column
    ran = [name for name, metrics in (summary.get("baselines") or {}).items()
           if any(isinstance(v, float) for v in (metrics or {}).values())]
    shown = [c for c in columns if {"local only": "local", "pooled": "pooled"}.get(c, "") in
             ("", *ran)]
    table.add_column("metric")
    for column in shown:
        table.add_column(column, justify="right")
    for row in results_table_rows(summary):
        name = row[0]
        if name.endswith(("_p10", "_median")) or (name.endswith("_min") and name != "accuracy_min"):
            continue  # the full distribution is in summary.json and report.html
        label = "accuracy, worst site" if name == "accuracy_min" else name
        values = [row[1], personal.get(name), *row[2:]] if personal else list(row[1:])
        numbers = [v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
                   for v in values]
        if all(number is None for number in numbers):
            continue  # not a metric (a baseline's budget) or measured by nothing here
        numbers = [n for n, c in zip(numbers, columns, strict=True) if c in shown]
        table.add_row(label, *(_fmt(number) for number in numbers))
        bounds = [intervals.get(column, {}).get(name) if number is not None else None
                  for column, number in zip(shown, numbers, strict=True)]
        if any(b is not None for b in bounds):  # on its own row: the table fits 80 columns
            table.add_row("  95% CI", *(
                "" if b is None else f"{b[0]:.2f}–{b[1]:.2f}" for b in bounds
            ), style="dim")
    console = Console()
    console.print(table)
    if intervals:
        ci = summary.get("ci") or {}
        console.print(escape(f"95% CI: {ci.get('method', 'bootstrap over test examples')}"))
    privacy = summary.get("privacy") or {}
    if privacy.get("epsilon") is not None:
        console.print(
            f"privacy: (ε = {privacy['epsilon']:.3g}, δ = {privacy['delta']:g}) with the "
            f"{privacy['accountant']} accountant — releases in {run_dir / 'privacy.json'}"
        )
        if privacy.get("reading"):
            from consortium.privacy.reading import WEAK_EPSILON

            weak = privacy["epsilon"] > WEAK_EPSILON
            console.print(escape(("WARNING: " if weak else "") + privacy["reading"]),
                          style="bold yellow" if weak else None)
    from consortium.reporting.clinical_report import majority_warning

    below = majority_warning(summary)  # sites where the model loses to "always the majority"
    if below:
        console.print(escape(below), style="yellow")
    console.print(f"run directory: {run_dir}")


def _cmd_run(args: argparse.Namespace) -> int:
    from consortium.config import load_config
    from consortium.simulation import simulate

    if args.seeds is not None:
        return _cmd_run_seeds(args)
    if args.resume:
        if args.config or args.overrides or args.out:
            raise ConsortiumError(
                "--resume continues a run exactly as it was configured; do not combine it with "
                "a CONFIG, --set or --out"
            )
        from consortium.seed_runs import is_multi_seed_dir

        if is_multi_seed_dir(args.resume):
            raise ConsortiumError(
                f"{args.resume!r} holds a multi-seed run (--seeds), which cannot be resumed as a "
                f"whole; resume one seed's run with --resume {Path(args.resume) / 'seed-N'} (its "
                "seeds.json is not updated), or rerun --seeds with a new --out"
            )
        try:
            result = simulate(resume=args.resume, progress=not args.no_progress, report=not args.no_report)
        except KeyboardInterrupt:
            return _interrupted_run(Path(args.resume))
    else:
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            result = simulate(cfg, out=out, progress=not args.no_progress, report=not args.no_report)
        except KeyboardInterrupt:
            return _interrupted_run(out)
    assert result.run_dir is not None
    _print_results(result.summary, result.run_dir)
    return EXIT_OK


def _interrupted_run(run_dir: Path, command: str = "consortium run") -> int:
    """Ctrl-C during a run: say how to continue it, with its real directory."""
    import shlex

    if (run_dir / "checkpoint" / "state.json").exists():
        print(f"consortium: interrupted; the run is saved up to its last finished round in "
              f"{run_dir}; continue with: {command} --resume {shlex.quote(str(run_dir))}",
              file=sys.stderr)
    else:
        print(f"consortium: interrupted before the first round finished; nothing to resume in "
              f"{run_dir}: start the run again (the same --out may be given)", file=sys.stderr)
    return EXIT_INTERRUPTED


def _cmd_run_seeds(args: argparse.Namespace) -> int:
    from consortium.config import load_config
    from consortium.seed_runs import parse_seeds, simulate_seeds

    if args.resume:
        raise ConsortiumError(
            "--resume does not combine with --seeds: a multi-seed run cannot be resumed as a "
            "whole; resume one seed's run with --resume OUT/seed-N, or rerun --seeds with a new --out"
        )
    seeds = parse_seeds(args.seeds)
    if any(o.split("=", 1)[0].strip() == "seed" for o in args.overrides):
        raise ConsortiumError("--set seed=… and --seeds both choose the seed; give --seeds only")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = simulate_seeds(
        cfg, seeds=seeds, out=out, progress=not args.no_progress, report=not args.no_report,
        on_run=lambda seed, summary: print(
            f"seed {seed}: accuracy {_fmt((summary.get('final') or {}).get('accuracy'))} "
            f"({out / f'seed-{seed}'})", flush=True,
        ),
    )
    _print_seeds(result.report, out)
    return EXIT_OK


def _print_seeds(report: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from consortium.seed_runs import seed_rows

    seeds = report["seeds"]
    table = Table(title=f"{report['name']}: mean over {len(seeds)} seeds, 95% Student t interval")
    for column in ("model", "metric", "mean", "95% CI"):
        table.add_column(column, justify="right" if column in ("mean", "95% CI") else "left")
    table.add_column("per seed (" + ", ".join(str(s) for s in seeds) + ")", justify="right")
    for model, metric, entry in seed_rows(report["results"]):
        low, high = entry["ci"]
        interval = "—" if low is None else f"[{low:.3f}, {high:.3f}]"
        label = "accuracy, worst site" if metric == "accuracy_min" else metric
        table.add_row(model, label, _fmt(entry["mean"]), interval,
                      " ".join(f"{v:.3f}" for v in entry["values"]))
    console = Console()
    console.print(table)
    console.print(f"seeds: {out / 'seeds.json'} (runs in {out}/seed-N/)")


def _cmd_analyze(args: argparse.Namespace) -> int:
    from consortium.analytics.analysis import analyze
    from consortium.analytics.report import table1_text
    from consortium.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    result = analyze(cfg, out=out, bias=args.bias)
    print(table1_text(result.result))
    written = "analysis.json, table1.csv, analysis.html"
    if result.bias is not None:
        findings = result.bias["findings"]
        print(f"\nbias report: {len(findings)} findings, most important first:")
        for f in findings[:10]:
            where = f"{f['site']}" + (f" / {f['column']}" if f["column"] else "")
            print(f"  [{f['kind']}] {where}: {f['detail']}")
        written += ", bias.json, bias.html"
    print(f"\nwrote {written} in {out}")
    return EXIT_OK


def _cmd_provision(args: argparse.Namespace) -> int:
    from consortium.deploy.provision import add_site, provision, revoke

    out = Path(args.out)
    if args.revoke:
        revoke(out, args.revoke)
        print(f"revoked site {args.revoke!r} in {out}; a server running from this folder applies "
              "it within a second (elsewhere, copy server/sites.json to the server)")
        if (out / "crl.pem").exists():
            print(f"hand {out / 'crl.pem'} to every site (into its certs folder): sites refuse "
                  "the revoked site's keys in secure aggregation")
        return EXIT_OK
    if args.add_site:
        folder = add_site(out, args.add_site, days=args.days)
        print(f"site {args.add_site!r}: hand over {folder}")
        return EXIT_OK
    if not args.sites:
        raise ConsortiumError("give --sites a,b,c (or --revoke SITE / --add-site SITE with --out)")
    names = [s.strip() for s in args.sites.split(",")]
    made = provision(
        names, out, server_names=("localhost", "127.0.0.1", *args.server_name), days=args.days,
        overwrite=args.overwrite,
    )
    print(f"consortium CA: {made.root / 'ca.pem'} (fingerprint {made.ca_fingerprint}); keep "
          f"{made.root / 'ca.key'} offline")
    print(f"server: --certs {made.server_dir}")
    for site, folder in made.site_dirs.items():
        print(f"site {site}: hand over {folder}")
    return EXIT_OK


def _secure_or_insecure(args: argparse.Namespace) -> str | None:
    if bool(args.certs) == bool(args.insecure):
        raise ConsortiumError(
            "give --certs DIR (the provisioned folder; TLS) or --insecure (local tests only), "
            "exactly one of them"
        )
    return args.certs


def _cmd_server(args: argparse.Namespace) -> int:
    import logging

    from consortium.deploy.server import serve

    logging.basicConfig(level=logging.INFO, format="consortium server: %(message)s")
    certs = _secure_or_insecure(args)
    if args.analyze:
        return _cmd_server_analysis(args, certs)
    if args.bias:
        raise ConsortiumError("--bias goes with --analyze (the bias report of an analysis)")
    if bool(args.out) == bool(args.resume):
        raise ConsortiumError("give --out RUN_DIR for a new run or --resume RUN_DIR, exactly one")
    if args.config:
        from consortium.config import load_config

        data = load_config(args.config, args.overrides).data
        if (data.impute, data.impute_categorical) != ("mean", "indicator"):
            raise ConsortiumError(
                "data.impute = \"median\" and data.impute_categorical = \"mode\" need a second "
                "round of site counts that the deployment's encoding does not have yet; deploy "
                "with the federated mean and the missing indicators (the defaults)"
            )
    try:
        result = serve(
            args.config, listen=args.listen, certs=certs, out=args.out or args.resume,
            min_sites=args.min_sites, overrides=args.overrides,
            register_timeout=args.register_timeout, round_timeout=args.round_timeout,
            min_results=args.min_results, over_select=args.over_select, heartbeat_s=args.heartbeat,
            stream_idle_timeout=args.stream_idle_timeout, stream_min_rate=args.stream_min_rate,
            progress=not args.no_progress, resume=args.resume, update_bound=args.update_bound,
            closed_roster=args.closed_roster,
        )
    except KeyboardInterrupt:
        how = f"consortium server --listen {args.listen} " + (
            f"--certs {args.certs}" if args.certs else "--insecure")
        return _interrupted_run(Path(args.out or args.resume), how)
    assert result.run_dir is not None
    _print_results(result.summary, result.run_dir)
    return EXIT_OK


def _cmd_server_analysis(args: argparse.Namespace, certs: str | None) -> int:
    from consortium.analytics.report import table1_text
    from consortium.deploy.analytics import serve_analysis

    if not args.out or args.resume:
        raise ConsortiumError("--analyze writes a new analysis: give --out DIR (no --resume)")
    result = serve_analysis(
        args.config, listen=args.listen, certs=certs, out=args.out, bias=args.bias,
        min_sites=args.min_sites, overrides=args.overrides,
        register_timeout=args.register_timeout, round_timeout=args.round_timeout,
        heartbeat_s=args.heartbeat, stream_idle_timeout=args.stream_idle_timeout,
        stream_min_rate=args.stream_min_rate,
    )
    print(table1_text(result.result))
    excluded = result.result["sites"]["excluded"]
    for site, why in excluded.items():
        print(f"left out: {site}: {why}")
    written = "analysis.json, table1.csv, analysis.html" + (
        ", bias.json, bias.html" if result.bias is not None else "")
    print(f"\nwrote {written} in {args.out}")
    return EXIT_OK


def _cmd_client(args: argparse.Namespace) -> int:
    import logging

    from consortium.deploy.client import run_client

    logging.basicConfig(level=logging.INFO, format="consortium client: %(message)s")
    certs = _secure_or_insecure(args)
    answered = run_client(args.server, site=args.site, data=args.data, certs=certs,
                          target=args.target, give_up_after_s=args.give_up_after,
                          policy=args.policy, state_dir=args.state, approve=args.approve,
                          allow_models=args.allow_model, receipts=args.receipts,
                          harmonize=args.harmonize)
    print(f"consortium client: the run is over; {answered} tasks answered", file=sys.stderr)
    return EXIT_OK


def _cmd_manifest(args: argparse.Namespace) -> int:
    from consortium.client.approval import experiment_manifest, format_manifest, manifest_hash
    from consortium.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    if cfg.model.name == "minilm-lora" and not args.analyze:
        from consortium.models.peft import with_base_hash

        cfg = with_base_hash(cfg)  # as `consortium server` fills it: the hash the sites receive
    if args.analyze:
        from consortium.deploy.analysis_site import analysis_manifest, format_analysis_manifest

        manifest = analysis_manifest(cfg)
        if args.hash:
            print(manifest_hash(manifest))
        elif args.json:
            print(json.dumps({"manifest": manifest, "sha256": manifest_hash(manifest)}, indent=2))
        else:
            print(format_analysis_manifest(manifest))
        return EXIT_OK
    manifest = experiment_manifest(cfg)
    if args.hash:
        print(manifest_hash(manifest))
    elif args.json:
        print(json.dumps({"manifest": manifest, "sha256": manifest_hash(manifest)}, indent=2))
    else:
        print(format_manifest(manifest))
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    from consortium.deploy.audit import verify_run

    if args.against:
        from consortium.deploy.audit import AuditError, verify_against

        cert = None
        if args.server_cert:
            try:
                cert = Path(args.server_cert).read_bytes()
            except OSError as exc:
                raise AuditError(f"--server-cert {args.server_cert!r}: {exc.strerror}") from None
        verify_run(Path(args.run_dir))  # the folder and its log exist (one clear error if not)
        checked = verify_against(Path(args.run_dir), args.against, server_cert=cert)
        print(checked.summary())
        return EXIT_OK if checked.ok else 1
    report = verify_run(Path(args.run_dir), expected_last_hash=args.expect_hash)
    print(report.summary())
    return EXIT_OK if report.ok else 1


def _cmd_robustness(args: argparse.Namespace) -> int:
    import shlex

    from consortium.robustness import (
        check_out,
        format_table,
        load_cells,
        load_invocation,
        robustness_matrix,
        save_invocation,
        write_report,
    )

    reused: list[str] = []

    def show(rule: str, attack: str, cell: dict[str, Any], note: str = "") -> None:
        acc = cell.get("accuracy")
        extra = f"  backdoor {cell['backdoor_success']:.2f}" if cell.get("backdoor_success") is not None else ""
        text = f"error: {cell['error']}" if cell.get("error") else f"accuracy {acc:.3f}{extra}"
        print(f"  {rule:<24} {attack:<24} {text}{note}", file=sys.stderr, flush=True)

    def show_reused(rule: str, attack: str, cell: dict[str, Any]) -> None:
        reused.append(rule)
        show(rule, attack, cell, "  (saved earlier)")

    if args.resume:
        defaults = _parser().parse_args(["robustness", "--resume", "x"])
        given = [name for name in ("config", "out", "overrides", "rules", "attacks", "fraction",
                                   "give_f") if getattr(args, name) != getattr(defaults, name)]
        if given:
            raise ConsortiumError(
                f"--resume continues the matrix with the arguments it was started with; drop "
                f"{', '.join('--' + g.replace('_', '-') for g in given)} (or start a new --out)"
            )
        out = Path(args.resume)
        saved = load_invocation(out)
        try:
            args.config, args.rules, args.attacks = saved["config"], saved["rules"], saved["attacks"]
            args.fraction, args.overrides = float(saved["fraction"]), list(saved["overrides"])
            args.give_f = bool(saved["give_f"])
        except (KeyError, TypeError, ValueError):
            raise ConsortiumError(
                f"--resume {str(out)!r}: its robustness-args.json is damaged; start the matrix "
                "again with its arguments and --out"
            ) from None
    elif args.out:
        out = Path(args.out)
    else:
        raise ConsortiumError("give --out DIR for the report (or --resume DIR to continue one)")
    check_out(out)
    config = str(Path(args.config).resolve()) if args.config else None
    started = time.perf_counter()
    try:
        table = robustness_matrix(
            config, rules=args.rules, attacks=args.attacks, fraction=args.fraction,
            overrides=args.overrides, on_cell=show, give_f=args.give_f, out=out,
            on_reused=show_reused,
            on_start=lambda: save_invocation(out, {
                "config": config, "rules": args.rules, "attacks": args.attacks,
                "fraction": args.fraction, "overrides": list(args.overrides),
                "give_f": args.give_f,
            }),
        )
    except KeyboardInterrupt:
        done = len(load_cells(out))
        if done:
            print(f"consortium: interrupted; {done} finished cell{'s' * (done != 1)} saved in "
                  f"{out / 'cells.jsonl'}; continue with: consortium robustness --resume "
                  f"{shlex.quote(str(out))}", file=sys.stderr)
        else:
            print("consortium: interrupted before the first cell finished; nothing was saved",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    write_report(table, out, meta={
        "config": args.config or "(the heart-disease demo)", "rules": args.rules,
        "attacks": args.attacks, "fraction": args.fraction,
        "overrides": " ".join(args.overrides) or "none",
        "f": "expected attackers per round" if args.give_f else "each rule's default (--no-f)",
        "wall_s": round(time.perf_counter() - started, 1),
        **({"cells taken from an earlier run (cells.jsonl)": len(reused)} if reused else {}),
    })
    print(format_table(table))
    print(f"\nwrote {out / 'robustness.json'}, robustness.md and robustness.png")
    return EXIT_OK


def run() -> None:
    """The ``consortium`` command: :func:`main`, then exit without a last garbage collection
    over the whole torch/grpc heap (3-10 s for a server that held a run): everything left is
    freed wholesale at exit anyway."""
    code = main()
    import gc

    gc.freeze()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser(argv).parse_args(argv)
    try:
        if args.command == "datasets":
            return _cmd_datasets(args)
        if args.command == "algorithms":
            return _cmd_algorithms()
        if args.command == "privacy":
            return _cmd_privacy(args)
        if args.command == "robustness":
            return _cmd_robustness(args)
        if args.command == "analyze":
            return _cmd_analyze(args)
        if args.command == "provision":
            return _cmd_provision(args)
        if args.command == "server":
            return _cmd_server(args)
        if args.command == "client":
            return _cmd_client(args)
        if args.command == "audit":
            return _cmd_audit(args)
        if args.command == "manifest":
            return _cmd_manifest(args)
        if args.command == "contribution":
            from consortium.contribution.cli import run_command

            return run_command(args)
        return _cmd_run(args)
    except ConsortiumError as exc:
        print(f"consortium: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("consortium: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    run()
